"""RMSNorm and the Mamba mixer's gated, grouped RMSNorm.

rms_norm: x (..., d), weight (d,) -> weight * (x / rms(x)) with the statistics in fp32, as transformers computes it
(the normalised value is cast back to x's dtype before the weight multiplies it).
gated_rms_norm: y (..., d) the scan output, z (..., d) the gate, weight (d,), RMS over each of `n_groups` groups:
    norm_before_gate=True:  norm(y) * silu(z)        False: norm(y * silu(z))
    weight=None (mamba_rms_norm off): y * silu(z), no normalisation.
Returns `out_dtype` (default: z's dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(_stat_dtype(x))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dispatching entry (a fused kernel takes this call on CUDA once it exists)."""
    return rms_norm_ref(x, weight, eps)


def gated_rms_norm_ref(y, z, weight=None, *, eps: float = 1e-5, n_groups: int = 1, norm_before_gate: bool = False,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out_dtype = out_dtype or z.dtype
    sdt = torch.promote_types(_stat_dtype(y), _stat_dtype(z))
    yf, gate = y.to(sdt), F.silu(z.to(sdt))
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
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dispatching entry (the fused scan epilogue takes this on CUDA once it exists)."""
    return gated_rms_norm_ref(y, z, weight, eps=eps, n_groups=n_groups, norm_before_gate=norm_before_gate,
                              out_dtype=out_dtype)
