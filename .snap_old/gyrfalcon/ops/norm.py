"""RMSNorm and the Mamba mixer's gated, grouped RMSNorm.

rms_norm: x (..., d), weight (d,) -> weight * (x / rms(x)) with the statistics in fp32, as transformers computes it
(the normalised value is cast back to x's dtype before the weight multiplies it).
gated_rms_norm: y (..., d) the scan output, z (..., d) the gate, weight (d,), RMS over each of `n_groups` groups:
    norm_before_gate=True:  norm(y) * silu(z)        False: norm(y * silu(z))
    weight=None (mamba_rms_norm off): y * silu(z), no normalisation.
z_scale multiplies z as it is read (the mixer's µP factor of the z block, at no extra pass over memory).
Returns `out_dtype` (default: z's dtype).
On CUDA with fp32/bf16/fp16 inputs both run as fused Triton kernels (norm_triton.py); elsewhere the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES, kernels_enabled



def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_stat_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dispatching entry: the fused Triton kernel on CUDA, the reference elsewhere."""
    if kernels_enabled(x, weight) and x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES:
        from .norm_triton import rms_norm_triton
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def gated_rms_norm_ref(y, z, weight=None, *, eps: float = 1e-5, n_groups: int = 1, norm_before_gate: bool = False,
                       out_dtype: torch.dtype | None = None, z_scale: float = 1.0) -> torch.Tensor:
    out_dtype = out_dtype or z.dtype
    sdt = torch.promote_types(_stat_dtype(y), _stat_dtype(z))
    yf, gate = y.to(sdt), F.silu(z.to(sdt) * z_scale)
    if weight is None:
        return (yf * gate).to(out_dtype)
    if not norm_before_gate:
        yf = yf * gate
    d = yf.shape[-1]
    grouped = yf.view(*yf.shape[:-1], n_groups, d // n_groups)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    yf = grouped.view_as(yf) * weight.to(sdt)
    if norm_before_gate:
        yf = yf * gate
    return yf.to(out_dtype)


def gated_rms_norm(y, z, weight=None, *, eps: float = 1e-5, n_groups: int = 1, norm_before_gate: bool = False,
                   out_dtype: torch.dtype | None = None, z_scale: float = 1.0) -> torch.Tensor:
    """Dispatching entry: the fused Triton kernel on CUDA, the reference elsewhere."""
    out_dtype = out_dtype or z.dtype
    if kernels_enabled(y, z, weight) and all(t.dtype in KERNEL_DTYPES for t in (y, z, weight) if t is not None) \
            and out_dtype in KERNEL_DTYPES:
        from .norm_triton import gated_rms_norm_triton
        return gated_rms_norm_triton(y, z, weight, eps=eps, n_groups=n_groups, norm_before_gate=norm_before_gate,
                                     out_dtype=out_dtype, z_scale=z_scale)
    return gated_rms_norm_ref(y, z, weight, eps=eps, n_groups=n_groups, norm_before_gate=norm_before_gate,
                              out_dtype=out_dtype, z_scale=z_scale)
