"""Small fused ops, mostly for inference (prefill without gradients, decoding), each with its pure-PyTorch reference.

A decode step at batch 1 is bound by how many kernels it launches, not by what they compute: each decoder layer
used to run ~41 kernels, most of them elementwise passes over a few thousand values (µP multiplications, residual
adds, RoPE pieces, the KV-cache writes). These ops compute several of those passes in one kernel, in fp32 with one
rounding at the end (the references round after every step, as the training path does):

    residual_mix(x, m, a, s_m, s_a)   x + (m * s_m + a * s_a)           the layer's two mixers into the residual
    residual_mix_norm(..., weight, eps)  the same, and rms_norm of the result (the MLP's input) in the same pass
    residual_add(x, y, s)             x + y * s                         the MLP into the residual
    swiglu(g, u, gate_multiplier)     u * silu(g * gate_multiplier)     the MLP's gate
    rope_store_decode(q, k, v, cos, sin, key_factor, k_cache, v_cache, positions, q_factor=1, v_factor=1)
        -> q rotated. One token per row: q, k, v times their factors, RoPE on q and k, k and v written into the
        caches at each row's position. q (b, hq, d), k, v (b, hk, d) (any strides, last dim contiguous), cos, sin
        (b, d) in the model dtype, k_cache, v_cache (b, hk, capacity, d), positions (b,) int on the device.
        Returns (b, hq, d).

The Triton kernels (fused_triton.py) run on CUDA; where a gradient is needed, swiglu, residual_add and
residual_mix_norm run autograd functions with a one-kernel backward, the others keep the references (whose backward
autograd provides). Shapes of x, m, a, y, g, u: any, equal, contiguous in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES, kernels_enabled
from .norm import rms_norm
from .rope import apply_rope_ref


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None)


def _inference(*tensors: torch.Tensor) -> bool:
    """The kernels run where no gradient flows and every tensor is on CUDA."""
    return not _needs_grad(*tensors) and kernels_enabled(*tensors)


def residual_mix_ref(x, m, a, s_m: float, s_a: float):
    return x + (m * s_m + a * s_a)


def residual_mix_norm_ref(x, m, a, s_m: float, s_a: float, weight, eps: float):
    new = residual_mix_ref(x, m, a, s_m, s_a)
    return new, rms_norm(new, weight, eps)


def residual_add_ref(x, y, s: float):
    return x + y * s


def swiglu_ref(g, u, gate_multiplier: float):
    return u * F.silu(g * gate_multiplier)


def rope_store_decode_ref(q, k, v, cos, sin, key_factor: float, k_cache, v_cache, positions, q_factor: float = 1.0,
                          v_factor: float = 1.0):
    b = q.shape[0]
    if q_factor != 1.0:
        q = q * q_factor
    if v_factor != 1.0:
        v = v * v_factor
    q_rot, k_rot = apply_rope_ref(q, k * key_factor, cos, sin)  # (b, h, d) with cos (b, d): one position per row
    rows = torch.arange(b, device=q.device)
    k_cache[rows, :, positions] = k_rot.to(k_cache.dtype)
    v_cache[rows, :, positions] = v.to(v_cache.dtype)
    return q_rot


def _elementwise_ok(*tensors) -> bool:
    first = tensors[0]
    return all(t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous() for t in tensors)


def residual_mix(x, m, a, s_m: float, s_a: float):
    if _inference(x, m, a) and _elementwise_ok(x, m, a):
        from .fused_triton import residual_mix_triton
        return residual_mix_triton(x, m, a, s_m, s_a)
    return residual_mix_ref(x, m, a, s_m, s_a)


def residual_mix_norm(x, m, a, s_m: float, s_a: float, weight, eps: float):
    """(x + (m * s_m + a * s_a), rms_norm of that): the decoder layer's mixer residual and the MLP's input norm."""
    if (kernels_enabled(x, m, a, weight) and _elementwise_ok(x, m, a) and x.shape[-1] <= 16384
            and weight.is_contiguous() and x.dtype in KERNEL_DTYPES):
        from .fused_triton import ResidualMixNormFn, residual_mix_norm_triton
        if _needs_grad(x, m, a, weight):
            return ResidualMixNormFn.apply(x, m, a, s_m, s_a, weight, eps)
        return residual_mix_norm_triton(x, m, a, s_m, s_a, weight, eps)
    return residual_mix_norm_ref(x, m, a, s_m, s_a, weight, eps)


def residual_add(x, y, s: float):
    if kernels_enabled(x, y) and _elementwise_ok(x, y) and x.dtype in KERNEL_DTYPES:
        from .fused_triton import ResidualAddFn, residual_mix_triton
        if _needs_grad(x, y):
            return ResidualAddFn.apply(x, y, s)
        return residual_mix_triton(x, y, None, s, 0.0)
    return residual_add_ref(x, y, s)


def swiglu(g, u, gate_multiplier: float):
    """u * silu(g * gate_multiplier): one kernel forward and one backward on CUDA (training too)."""
    if kernels_enabled(g, u) and _elementwise_ok(g, u) and g.dtype in KERNEL_DTYPES:
        from .fused_triton import SwiGLUFn, swiglu_triton
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return SwiGLUFn.apply(g, u, gate_multiplier)
        return swiglu_triton(g, u, gate_multiplier)
    return swiglu_ref(g, u, gate_multiplier)


def rope_store_decode(q, k, v, cos, sin, key_factor: float, k_cache, v_cache, positions, q_factor: float = 1.0,
                      v_factor: float = 1.0):
    if _inference(q, k, v, cos, sin, k_cache, v_cache, positions) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        from .fused_triton import rope_store_decode_triton
        return rope_store_decode_triton(q, k, v, cos, sin, key_factor, k_cache, v_cache, positions, q_factor,
                                        v_factor)
    return rope_store_decode_ref(q, k, v, cos, sin, key_factor, k_cache, v_cache, positions, q_factor, v_factor)
