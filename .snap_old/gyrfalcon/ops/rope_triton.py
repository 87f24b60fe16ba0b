"""Triton kernel for rotary position embeddings (rotate-half form), forward and backward.

    rope_triton(x (b, h, l, d), cos, sin (b, l, d)) -> (b, h, l, d)
        out[..., i] = x[..., i] * cos[i] + rotate_half(x)[..., i] * sin[i],  rotate_half(x) = [-x[d/2:], x[d/2:]]

x may be any strided view whose last dim is contiguous (the model's q and k are transposed views of the
projections' outputs); the output has x's layout ((b, l, h, d) memory, viewed as (b, h, l, d)), so attention reads it
as it would have read the reference's. The backward applies the inverse rotation, out[i] = dy[i] cos[i] +
rotate_half^T(dy * sin)[i]. One program per token and block of heads loads that token's cos/sin once; math in fp32,
one rounding. Replaces the reference's ~5 kernels per tensor (two products, a negation, a concatenation, a sum)
forward and as many backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, L, D,
                 sx_b, sx_h, sx_l, sc_b, sc_l, so_b, so_h, so_l,
                 INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // L
    t = token % L
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    half = D // 2
    first = dd < half
    partner = tl.where(first, dd + half, dd - half)
    d_mask = dd < D
    mask = (hh < H)[:, None] & d_mask[None, :]
    cos = tl.load(cos_ptr + b * sc_b + t * sc_l + dd, mask=d_mask, other=0.0).to(tl.float32)
    if INVERSE:
        # (R^T y)[i] = y[i + d/2] for i < d/2, -y[i - d/2] after; here y = dy * sin, taken at the partner index
        sin = tl.load(sin_ptr + b * sc_b + t * sc_l + partner, mask=d_mask, other=0.0).to(tl.float32)
        sign = tl.where(first, 1.0, -1.0)
    else:
        sin = tl.load(sin_ptr + b * sc_b + t * sc_l + dd, mask=d_mask, other=0.0).to(tl.float32)
        sign = tl.where(first, -1.0, 1.0)
    base = x_ptr + b * sx_b + t * sx_l + hh[:, None].to(tl.int64) * sx_h
    x = tl.load(base + dd[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    out = x * cos[None, :] + (sign * sin)[None, :] * xp
    o = out_ptr + b * so_b + t * so_l + hh[:, None].to(tl.int64) * so_h + dd[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    b, h, l, d = x.shape
    out = torch.empty(b, l, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)      # x's usual layout
    block_h = min(16, triton.next_power_of_2(h))
    _rope_kernel[(b * l, triton.cdiv(h, block_h))](
        x, cos, sin, out, h, l, d, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), INVERSE=inverse, BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(d))
    return out


class RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        return _launch(dout, cos, sin, inverse=True), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, l, d), cos / sin (b, l, d) (sharing strides, last dim contiguous); see the module docstring."""
    if x.shape[-1] % 2 or x.stride(-1) != 1 or cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("rope_triton: the head dim must be even and contiguous, cos and sin alike")
    return RopeFn.apply(x, cos, sin)
