"""Rotary position embedding: inverse frequencies (default, linear, dynamic-NTK, YaRN) and their application.

Frequencies follow transformers' formulas for each rope type, so a checkpoint's `rope_scaling` means the same here.
Dynamic NTK is computed from the current length alone (transformers also remembers the longest length seen by the
module; a fresh module gives the same result).

Shapes: position_ids (b, l); inv_freq (d/2,) fp32; cos, sin (b, l, d); q (b, hq, l, d), k (b, hk, l, d).
"""

from __future__ import annotations

import math

import torch

from .dispatch import KERNEL_DTYPES, kernels_enabled


def _default_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_inv_freq(rope: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None = None,
                  device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) fp32, attention_scaling) for a normalised rope dict (FalconH1Config.rope)."""
    kind, base = rope["rope_type"], float(rope["rope_theta"])
    if kind == "default":
        return _default_inv_freq(base, head_dim, device), 1.0
    factor = float(rope["factor"])
    if kind == "linear":
        return _default_inv_freq(base, head_dim, device) / factor, 1.0
    if kind == "dynamic":
        seq_len = max(seq_len or 0, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _default_inv_freq(base, head_dim, device), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope, base, factor, head_dim, device)
    raise ValueError(f"unsupported rope type {kind!r}")


def _yarn_inv_freq(rope: dict, base: float, factor: float, dim: int, device) -> tuple[torch.Tensor, float]:
    original = rope["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the rotary dimension that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1.0 - ramp  # share of each frequency kept as trained (high frequencies)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (b, l, d) in `dtype`, the angles computed in fp32 (fp64 when dtype is fp64)."""
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = position_ids.to(adt)[..., None] * inv_freq.to(device=position_ids.device, dtype=adt)
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (b, hq, l, d), k (b, hk, l, d), cos / sin (b, l, d) -> rotated q, k. On CUDA one Triton kernel per tensor,
    forward and backward (rope_triton.py); elsewhere the reference."""
    if (kernels_enabled(q, k, cos, sin) and q.dtype in KERNEL_DTYPES and k.dtype == q.dtype
            and cos.dim() == 3 and cos.shape[0] == q.shape[0] and q.shape[-1] % 2 == 0
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == 1 and cos.stride() == sin.stride()):
        from .rope_triton import rope_triton
        return rope_triton(q, cos, sin), rope_triton(k, cos, sin)
    return apply_rope_ref(q, k, cos, sin)
