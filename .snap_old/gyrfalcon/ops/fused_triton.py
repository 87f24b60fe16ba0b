"""Triton kernels of ops/fused.py. Semantics are the references' there; all math is in fp32, with one rounding to the
output dtype. The SwiGLU gate (SwiGLUFn), the residual add (ResidualAddFn) and the residual mix with the MLP's input
norm (ResidualMixNormFn) also train: their backward is one kernel each (none for the residual add's x).

Elementwise kernels (residual_mix, swiglu) treat their inputs as flat contiguous arrays of n values, BLOCK per
program. rope_store_decode runs one program per (row, head) over hq + hk heads: a query head is rotated into the
output; a key head is scaled, rotated and stored at its row's position in the key cache, and the value head beside
it copied into the value cache. RoPE pairs element i with i +- d/2 (rotate_half), so a program loads its head twice
(the second load permuted), which stays in cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm_triton import _num_warps, _programs_for_dw, _rms_row_grad
from .pdl import launch_options, pdl_supported, pdl_wait

BLOCK = 1024


@triton.jit
def _residual_mix_kernel(x_ptr, m_ptr, a_ptr, out_ptr, n, s_m, s_a, HAS_A: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mix = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s_m
    if HAS_A:
        mix += tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s_a
    tl.store(out_ptr + offs, (x + mix).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_mix_norm_kernel(x_ptr, m_ptr, a_ptr, w_ptr, out_ptr, norm_ptr, D, s_m, s_a, eps,
                              BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """One row: out = x + (m s_m + a s_a) rounded to out's dtype, and norm = w * (out * rstd(out)) as rms_norm."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    base = row * D + offs
    x = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    mix = tl.load(m_ptr + base, mask=mask, other=0.0).to(tl.float32) * s_m
    mix += tl.load(a_ptr + base, mask=mask, other=0.0).to(tl.float32) * s_a
    new = (x + mix).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + base, new, mask=mask)
    nf = new.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(nf * nf, axis=0) / D + eps)
    xn = (nf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded before the weight, as rms_norm does
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(norm_ptr + base, (w * xn).to(norm_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_mix_norm_bwd_kernel(new_ptr, w_ptr, dnew_ptr, dnorm_ptr, dx_ptr, dm_ptr, da_ptr, dw_ptr, N, D,
                                  s_m, s_a, eps, HAS_DNEW: tl.constexpr, HAS_DNORM: tl.constexpr,
                                  WANT_DW: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows pid, pid + P, ...: g = dnew + rms_norm's input gradient of dnorm at `new`; dx = g, dm = s_m g,
    da = s_a g; the weight gradient sum(dnorm * new * rstd) over this program's rows into dw (one partial each)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = pid.to(tl.int64)
    while row < N:
        base = row * D + offs
        g = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_DNEW:
            g += tl.load(dnew_ptr + base, mask=mask, other=0.0).to(tl.float32)
        if HAS_DNORM:
            new_raw = tl.load(new_ptr + base, mask=mask, other=0.0)
            x = new_raw.to(tl.float32)
            dout = tl.load(dnorm_ptr + base, mask=mask, other=0.0).to(tl.float32)
            dx_norm, xhat = _rms_row_grad(x, dout, w, D, eps)
            g += dx_norm
            if WANT_DW:
                dw += dout * xhat.to(new_raw.dtype).to(tl.float32)
        tl.store(dx_ptr + base, g.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dm_ptr + base, (g * s_m).to(dm_ptr.dtype.element_ty), mask=mask)
        tl.store(da_ptr + base, (g * s_a).to(da_ptr.dtype.element_ty), mask=mask)
        row += n_prog
    if WANT_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + offs, dw, mask=mask)


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, out_ptr, n, gate_multiplier, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gate_multiplier
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (u * g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dout_ptr, dg_ptr, du_ptr, n, gate_multiplier, BLOCK: tl.constexpr):
    """out = u * silu(s), s = g * m:  du = dout * silu(s);
    dg = dout * u * sigmoid(s) * (1 + s * (1 - sigmoid(s))) * m."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gate_multiplier
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-s))
    tl.store(du_ptr + offs, (dout * s * sig).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dout * u * sig * (1.0 + s * (1.0 - sig)) * gate_multiplier
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, key_factor,
                       q_factor, v_factor, HQ, HK, D,
                       sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, so_b, so_h,
                       skc_b, skc_h, skc_t, svc_b, svc_h, svc_t,
                       BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    half = D // 2
    partner = tl.where(offs < half, offs + half, offs - half)
    sign = tl.where(offs < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + row * sc_b + offs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * sc_b + offs, mask=mask, other=0.0).to(tl.float32)
    if head < HQ:
        base = q_ptr + row * sq_b + head * sq_h
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * q_factor
        xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32) * q_factor
        out = x * cos + sign * xp * sin
        tl.store(qo_ptr + row * so_b + head * so_h + offs, out.to(qo_ptr.dtype.element_ty), mask=mask)
    else:
        kh = head - HQ
        pos = tl.load(pos_ptr + row).to(tl.int64)
        base = k_ptr + row * sk_b + kh * sk_h
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * key_factor
        xp = tl.load(base + partner, mask=mask, other=0.0).to(tl.float32) * key_factor
        out = x * cos + sign * xp * sin
        tl.store(kc_ptr + row * skc_b + kh * skc_h + pos * skc_t + offs, out.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + row * sv_b + kh * sv_h + offs, mask=mask, other=0.0).to(tl.float32) * v_factor
        tl.store(vc_ptr + row * svc_b + kh * svc_h + pos * svc_t + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


def residual_mix_triton(x, m, a, s_m: float, s_a: float):
    out = torch.empty_like(x)
    n = x.numel()
    pdl = pdl_supported(x.device)
    _residual_mix_kernel[(triton.cdiv(n, BLOCK),)](x, m, a if a is not None else m, out, n, float(s_m), float(s_a),
                                                    HAS_A=a is not None, BLOCK=BLOCK, PDL=pdl, **launch_options(pdl))
    return out


def residual_mix_norm_triton(x, m, a, s_m: float, s_a: float, weight, eps: float):
    d = x.shape[-1]
    out = torch.empty_like(x)
    normed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    pdl = pdl_supported(x.device)
    _residual_mix_norm_kernel[(x.numel() // d,)](x, m, a, weight, out, normed, d, float(s_m), float(s_a), float(eps),
                                                  BLOCK_D=triton.next_power_of_2(d), PDL=pdl, **launch_options(pdl))
    return out, normed


class ResidualAddFn(torch.autograd.Function):
    """x + y * s in one kernel; backward: dx = dout (no kernel), dy = s dout."""

    @staticmethod
    def forward(ctx, x, y, s: float):
        ctx.s = s
        return residual_mix_triton(x, y, None, s, 0.0)

    @staticmethod
    def backward(ctx, dout):
        return dout, dout * ctx.s, None


class ResidualMixNormFn(torch.autograd.Function):
    """(new, normed) = (x + (m s_m + a s_a), rms_norm(new, weight, eps)) in one kernel forward and one backward.
    Saves `new` (which the next layer holds anyway) and the weight."""

    @staticmethod
    def forward(ctx, x, m, a, s_m: float, s_a: float, weight, eps: float):
        new, normed = residual_mix_norm_triton(x, m, a, s_m, s_a, weight, eps)
        ctx.save_for_backward(new, weight)
        ctx.s_m, ctx.s_a, ctx.eps = s_m, s_a, eps
        ctx.dtypes = (x.dtype, m.dtype, a.dtype)
        ctx.set_materialize_grads(False)
        return new, normed

    @staticmethod
    def backward(ctx, dnew, dnormed):
        new, weight = ctx.saved_tensors
        d = new.shape[-1]
        n = new.numel() // d
        dx = torch.empty(new.shape, dtype=ctx.dtypes[0], device=new.device)
        dm = torch.empty(new.shape, dtype=ctx.dtypes[1], device=new.device)
        da = torch.empty(new.shape, dtype=ctx.dtypes[2], device=new.device)
        want_dw = ctx.needs_input_grad[5] and dnormed is not None
        programs = _programs_for_dw(n, new.device)
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=new.device) if want_dw else dx
        block = triton.next_power_of_2(d)
        _residual_mix_norm_bwd_kernel[(programs,)](
            new, weight, dnew.contiguous() if dnew is not None else new,
            dnormed.contiguous() if dnormed is not None else new, dx, dm, da, dw_part, n, d,
            float(ctx.s_m), float(ctx.s_a), float(ctx.eps), HAS_DNEW=dnew is not None, HAS_DNORM=dnormed is not None,
            WANT_DW=want_dw, BLOCK_D=block, num_warps=_num_warps(block))
        dw = None
        if ctx.needs_input_grad[5]:
            dw = dw_part.sum(0).to(weight.dtype) if want_dw else torch.zeros_like(weight)
        return dx, dm, da, None, None, dw, None


def swiglu_triton(g, u, gate_multiplier: float):
    out = torch.empty_like(u)
    n = u.numel()
    pdl = pdl_supported(u.device)
    _swiglu_kernel[(triton.cdiv(n, BLOCK),)](g, u, out, n, float(gate_multiplier), BLOCK=BLOCK, PDL=pdl,
                                             **launch_options(pdl))
    return out


class SwiGLUFn(torch.autograd.Function):
    """u * silu(g * gate_multiplier) with a one-kernel backward; saves g and u (no intermediate)."""

    @staticmethod
    def forward(ctx, g, u, gate_multiplier: float):
        ctx.save_for_backward(g, u)
        ctx.gate_multiplier = gate_multiplier
        return swiglu_triton(g, u, gate_multiplier)

    @staticmethod
    def backward(ctx, dout):
        g, u = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = u.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, dout, dg, du, n, float(ctx.gate_multiplier), BLOCK=BLOCK)
        return dg, du, None


def rope_store_decode_triton(q, k, v, cos, sin, key_factor: float, k_cache, v_cache, positions, q_factor: float = 1.0,
                             v_factor: float = 1.0):
    b, hq, d = q.shape
    hk = k.shape[1]
    if d % 2 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("rope_store_decode: head_dim must be even and cos/sin share a contiguous last dim")
    q_out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    pdl = pdl_supported(q.device)
    _rope_store_kernel[(b, hq + hk)](
        q, k, v, cos, sin, positions, q_out, k_cache, v_cache, float(key_factor), float(q_factor), float(v_factor),
        hq, hk, d,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), BLOCK_D=triton.next_power_of_2(d), PDL=pdl, **launch_options(pdl))
    return q_out
