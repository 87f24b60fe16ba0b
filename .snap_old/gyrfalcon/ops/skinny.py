"""Products of a few rows with weight matrices (a decode step at small batch), with the layer's glue fused in, each
with its pure-PyTorch reference. Inference only (no gradient).

    multi_linear(x, weights, norm_weight=None, eps=0.0)   n(x) @ cat(weights).T -> (M, sum N_i)   x (M, K), up
        to four weights (N_i, K): a decoder layer's in_proj, q_proj, k_proj and v_proj read the same normed input
    dual_linear_residual(res, x1, w1, s1, x2, w2, s2, norm_weight=None, eps=0.0)
        res + s1 n(x1) @ w1.T + s2 x2 @ w2.T -> (M, N): the Mamba out_proj and attention o_proj into the residual,
        with their µP factors (the norm, if any, on x1 only)
    linear_residual(res, x, w, s)                 res + s x @ w.T            down_proj into the residual
    linear_scaled(x, w, s, norm_weight=None, eps=0.0)   s n(x) @ w.T    the final norm, lm_head and its µP factor
    linear_swiglu(x, w_gate, w_up, gate_multiplier, norm_weight=None, eps=0.0)
        (n(x) @ w_up.T) * silu(gate_multiplier n(x) @ w_gate.T)

n(x) = rms_norm_ref(x, norm_weight, eps) (ops/norm.py) with norm_weight (K,), or x itself where norm_weight is None:
the RMSNorm before the product folded into it (the kernels read each whole x row anyway), saving the norm's own
launch; folded at one row only (FOLD_MAX_ROWS: measured), more rows run the norm kernel before the product.
Weights (N, K) contiguous, no bias; x rows with a contiguous last dim. The Triton kernels (skinny_triton.py) run for
M <= MAX_ROWS on CUDA (above CUDA_CORE_MAX_ROWS on the tensor cores, for 16-bit operands only: fp32 products of more
rows keep the reference, which never rounds them to tf32), accumulate in fp32 and round each product once (a norm
folded at one row is not rounded at all; with more rows the norm kernel's output is); the references round the
normed x and each product to the model dtype first, as the layer's unfused path does. The kernels take a norm weight
of any kernel dtype (read in fp32), contiguous, on x's device (norm_ok); another runs the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES, kernels_enabled
from .norm import rms_norm, rms_norm_ref

CUDA_CORE_MAX_ROWS = 4  # rows up to which the kernels multiply on the CUDA cores; more go to the tensor cores
# above MAX_ROWS rows the product is no longer bound by reading the weights and cuBLAS is the better choice
MAX_ROWS = 128
TILE_DTYPES = (torch.bfloat16, torch.float16)  # the tensor cores' operands here (fp32 would be rounded to tf32)
# Measured on the H100 (bench/skinny_kernels.py, 2026-11-23): folding the norm pays at one row (0.5B shape 1.1-1.3x,
# 7B 1.0-1.1x against the norm kernel + the product) but costs at four rows at the 7B shape (0.8-0.92x: the per-row
# sums and scaled x tiles crowd the registers of four-row tiles), so more rows run the norm kernel first. Folding
# into the tensor-core tiles (5-128 rows) was measured too (2026-11-24, bench/skinny_kernels.py): 0.4-0.7x at 16 and
# 64 rows, since every program scales all of x (M x K, more than its own weight tile) on the CUDA cores.
FOLD_MAX_ROWS = 1


def _fold_or_norm(x, norm_weight, eps: float):
    """(x, norm_weight) for the kernel: unchanged where the fold pays, else x normed by the norm kernel and no
    weight left to fold."""
    if norm_weight is None or x.shape[0] <= FOLD_MAX_ROWS:
        return x, norm_weight
    return rms_norm(x, norm_weight, eps).to(x.dtype), None


def _normed(x, norm_weight, eps: float):
    """rms_norm_ref(x, norm_weight, eps) in x's dtype (a norm weight of another dtype would otherwise promote it
    past the weights' dtype), or x where there is no norm."""
    return x if norm_weight is None else rms_norm_ref(x, norm_weight, eps).to(x.dtype)


def multi_linear_ref(x, weights, norm_weight=None, eps: float = 0.0):
    x = _normed(x, norm_weight, eps)
    return torch.cat([x @ w.T for w in weights], dim=-1)


def dual_linear_residual_ref(res, x1, w1, s1: float, x2, w2, s2: float, norm_weight=None, eps: float = 0.0):
    x1 = _normed(x1, norm_weight, eps)
    return res + ((x1 @ w1.T) * s1 + (x2 @ w2.T) * s2)


def linear_residual_ref(res, x, w, s: float):
    return res + (x @ w.T) * s


def linear_scaled_ref(x, w, s: float, norm_weight=None, eps: float = 0.0):
    return (_normed(x, norm_weight, eps) @ w.T) * s


def linear_swiglu_ref(x, w_gate, w_up, gate_multiplier: float, norm_weight=None, eps: float = 0.0):
    x = _normed(x, norm_weight, eps)
    return (x @ w_up.T) * F.silu((x @ w_gate.T) * gate_multiplier)


def skinny_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True where the kernels take these operands: CUDA (or the interpreter), no gradient, at most MAX_ROWS rows
    (more than CUDA_CORE_MAX_ROWS in a 16-bit dtype only), one kernel dtype, contiguous weights and rows."""
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    rows_ok = x.dim() == 2 and (x.shape[0] <= CUDA_CORE_MAX_ROWS
                                or (x.shape[0] <= MAX_ROWS and x.dtype in TILE_DTYPES))
    return (kernels_enabled(x, *weights) and rows_ok and x.stride(-1) == 1
            and x.dtype in KERNEL_DTYPES and all(w.dtype == x.dtype and w.is_contiguous() for w in weights))


def norm_ok(x: torch.Tensor, norm_weight: torch.Tensor | None) -> bool:
    """True where the kernels can fold this RMSNorm weight into x's product: none at all, or a contiguous vector of
    x's row length, of a kernel dtype (any: the kernels read it in fp32), on x's device, needing no gradient."""
    if norm_weight is None:
        return True
    if torch.is_grad_enabled() and norm_weight.requires_grad:
        return False
    return (norm_weight.dim() == 1 and norm_weight.is_contiguous() and norm_weight.shape[0] == x.shape[-1]
            and norm_weight.device == x.device and norm_weight.dtype in KERNEL_DTYPES)


def multi_linear(x, weights, norm_weight=None, eps: float = 0.0):
    if (skinny_ok(x, *weights) and norm_ok(x, norm_weight) and 1 <= len(weights) <= 4
            and len({w.shape[1] for w in weights}) == 1):
        from .skinny_triton import multi_linear_triton
        x, norm_weight = _fold_or_norm(x, norm_weight, eps)
        out = torch.empty(x.shape[0], sum(w.shape[0] for w in weights), dtype=x.dtype, device=x.device)
        return multi_linear_triton(x, weights, out, norm_weight, eps)
    return multi_linear_ref(x, weights, norm_weight, eps)


def dual_linear_residual(res, x1, w1, s1: float, x2, w2, s2: float, norm_weight=None, eps: float = 0.0):
    if (skinny_ok(x1, w1, w2) and skinny_ok(x2, w2) and norm_ok(x1, norm_weight) and res.is_contiguous()
            and res.dtype == x1.dtype):
        from .skinny_triton import MODE_SUM, pair_linear_triton
        x1, norm_weight = _fold_or_norm(x1, norm_weight, eps)
        return pair_linear_triton(x1, w1, x2, w2, res, torch.empty_like(res), s1, s2, MODE_SUM, norm_weight, eps)
    return dual_linear_residual_ref(res, x1, w1, s1, x2, w2, s2, norm_weight, eps)


def linear_residual(res, x, w, s: float):
    if skinny_ok(x, w) and res.is_contiguous() and res.dtype == x.dtype:
        from .skinny_triton import MODE_SUM, pair_linear_triton
        return pair_linear_triton(x, w, None, None, res, torch.empty_like(res), s, 0.0, MODE_SUM)
    return linear_residual_ref(res, x, w, s)


def linear_scaled(x, w, s: float, norm_weight=None, eps: float = 0.0):
    if skinny_ok(x, w) and norm_ok(x, norm_weight):
        from .skinny_triton import MODE_SUM, pair_linear_triton
        x, norm_weight = _fold_or_norm(x, norm_weight, eps)
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        return pair_linear_triton(x, w, None, None, None, out, s, 0.0, MODE_SUM, norm_weight, eps)
    return linear_scaled_ref(x, w, s, norm_weight, eps)


def linear_swiglu(x, w_gate, w_up, gate_multiplier: float, norm_weight=None, eps: float = 0.0):
    if skinny_ok(x, w_gate, w_up) and norm_ok(x, norm_weight) and w_gate.shape == w_up.shape:
        from .skinny_triton import MODE_SWIGLU, pair_linear_triton
        x, norm_weight = _fold_or_norm(x, norm_weight, eps)
        out = torch.empty(x.shape[0], w_gate.shape[0], dtype=x.dtype, device=x.device)
        return pair_linear_triton(x, w_gate, None, w_up, None, out, gate_multiplier, 0.0, MODE_SWIGLU, norm_weight,
                                  eps)
    return linear_swiglu_ref(x, w_gate, w_up, gate_multiplier, norm_weight, eps)
