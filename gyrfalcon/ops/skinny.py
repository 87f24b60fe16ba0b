"""Products of a few rows with weight matrices (a decode step at small batch), with the layer's glue fused in, each
with its pure-PyTorch reference. Inference only (no gradient).

    multi_linear(x, weights)                      x (M, K) @ cat(weights).T -> (M, sum N_i)   up to four weights
        (N_i, K): a decoder layer's in_proj, q_proj, k_proj and v_proj read the same normed input
    dual_linear_residual(res, x1, w1, s1, x2, w2, s2)   res + s1 x1 @ w1.T + s2 x2 @ w2.T -> (M, N)
        the Mamba out_proj and attention o_proj into the residual, with their µP factors
    linear_residual(res, x, w, s)                 res + s x @ w.T            down_proj into the residual
    linear_swiglu(x, w_gate, w_up, gate_multiplier)   (x @ w_up.T) * silu(gate_multiplier x @ w_gate.T)

Weights (N, K) contiguous, no bias; x rows with a contiguous last dim. The Triton kernels (skinny_triton.py) run
for M <= MAX_ROWS on CUDA, accumulate in fp32 and round once; the references round each product to the model
dtype first, as the layer's unfused path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES, kernels_enabled

MAX_ROWS = 4  # above this many rows cuBLAS's tensor-core kernels are the better choice


def multi_linear_ref(x, weights):
    return torch.cat([x @ w.T for w in weights], dim=-1)


def dual_linear_residual_ref(res, x1, w1, s1: float, x2, w2, s2: float):
    return res + ((x1 @ w1.T) * s1 + (x2 @ w2.T) * s2)


def linear_residual_ref(res, x, w, s: float):
    return res + (x @ w.T) * s


def linear_swiglu_ref(x, w_gate, w_up, gate_multiplier: float):
    return (x @ w_up.T) * F.silu((x @ w_gate.T) * gate_multiplier)


def skinny_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True where the kernels take these operands: CUDA (or the interpreter), no gradient, at most MAX_ROWS rows,
    one kernel dtype, contiguous weights and rows."""
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return (kernels_enabled(x, *weights) and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(-1) == 1
            and x.dtype in KERNEL_DTYPES and all(w.dtype == x.dtype and w.is_contiguous() for w in weights))


def multi_linear(x, weights):
    if skinny_ok(x, *weights) and 1 <= len(weights) <= 4 and len({w.shape[1] for w in weights}) == 1:
        from .skinny_triton import multi_linear_triton
        out = torch.empty(x.shape[0], sum(w.shape[0] for w in weights), dtype=x.dtype, device=x.device)
        return multi_linear_triton(x, weights, out)
    return multi_linear_ref(x, weights)


def dual_linear_residual(res, x1, w1, s1: float, x2, w2, s2: float):
    if skinny_ok(x1, w1, w2) and skinny_ok(x2, w2) and res.is_contiguous() and res.dtype == x1.dtype:
        from .skinny_triton import MODE_SUM, pair_linear_triton
        return pair_linear_triton(x1, w1, x2, w2, res, torch.empty_like(res), s1, s2, MODE_SUM)
    return dual_linear_residual_ref(res, x1, w1, s1, x2, w2, s2)


def linear_residual(res, x, w, s: float):
    if skinny_ok(x, w) and res.is_contiguous() and res.dtype == x.dtype:
        from .skinny_triton import MODE_SUM, pair_linear_triton
        return pair_linear_triton(x, w, None, None, res, torch.empty_like(res), s, 0.0, MODE_SUM)
    return linear_residual_ref(res, x, w, s)


def linear_swiglu(x, w_gate, w_up, gate_multiplier: float):
    if skinny_ok(x, w_gate, w_up) and w_gate.shape == w_up.shape:
        from .skinny_triton import MODE_SWIGLU, pair_linear_triton
        out = torch.empty(x.shape[0], w_gate.shape[0], dtype=x.dtype, device=x.device)
        return pair_linear_triton(x, w_gate, None, w_up, None, out, gate_multiplier, 0.0, MODE_SWIGLU)
    return linear_swiglu_ref(x, w_gate, w_up, gate_multiplier)
