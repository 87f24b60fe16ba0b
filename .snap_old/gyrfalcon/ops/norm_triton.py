"""Triton kernels for RMSNorm and the Mamba mixer's gated, grouped RMSNorm: forward and backward.

Semantics are those of `norm.rms_norm_ref` and `norm.gated_rms_norm_ref`:
    rms_norm(x (..., d), weight (d,), eps) -> weight * (x * rstd).to(x.dtype), rstd over d in fp32;
        output dtype = promote(x.dtype, weight.dtype), as torch's `weight * xn` gives.
    gated_rms_norm(y (..., d), z (..., d), weight (d,) | None, eps, n_groups, norm_before_gate, out_dtype):
        norm_before_gate: norm(y) * silu(z); else norm(y * silu(z)); weight None: y * silu(z);
        the RMS is taken over each of n_groups contiguous groups of d / n_groups channels; all math in fp32.

Layout: rows are the flattened leading dimensions; any row stride works, channels must be contiguous (the launchers
copy otherwise). A program holds a whole row (or row group) in registers, so each input is read once and each
output written once, forward and backward; the backward recomputes rstd from the row it already holds rather than
saving it. When the weight needs a gradient, the backward runs a fixed number of programs (a few per SM), each
walking rows pid, pid + P, ... and summing its weight-gradient in fp32 registers; the P partial rows are then
summed by torch (deterministic, unlike atomics). Without a weight gradient every row gets its own program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import sm_count
from .pdl import launch_options, pdl_supported, pdl_wait


# ----------------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _row_offset(row, stride, ALIGN: tl.constexpr):
    """row * stride, declared a multiple of ALIGN (a power of two dividing every row stride): rows then load as
    16-byte vectors even when a row stride is not a multiple of 16 (a slice of in_proj's output)."""
    return tl.multiple_of(row * stride, ALIGN)


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, out_ptr, N, D, stride_x, stride_o, eps, ALIGN: tl.constexpr,
                    BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x_raw = tl.load(x_ptr + _row_offset(row, stride_x, ALIGN) + offs, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    # the normalised value is rounded to x's dtype before the weight multiplies it (as the reference does)
    xn = (x * rstd).to(x_raw.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + _row_offset(row, stride_o, ALIGN) + offs, (w * xn).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_row_grad(x, dout, w, D, eps):
    """rms_norm's input gradient for one row (fp32 x, dout, w of BLOCK_D, masked lanes 0) and the normalised row
    xhat = x * rstd (for the weight gradient): dx = rstd * (dout w - xhat * mean(dout w xhat))."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    xhat = x * rstd
    dxhat = dout * w
    return rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / D)), xhat


@triton.jit
def _rms_bwd_kernel(x_ptr, w_ptr, dout_ptr, dx_ptr, dw_ptr, N, D, stride_x, stride_do, stride_dx, eps,
                    ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, WANT_DW: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row = pid.to(tl.int64)
    while row < N:  # rows pid, pid + P, ... (a while loop: its bound is a runtime value)
        x_raw = tl.load(x_ptr + _row_offset(row, stride_x, ALIGN) + offs, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        dout = tl.load(dout_ptr + _row_offset(row, stride_do, ALIGN) + offs, mask=mask, other=0.0).to(tl.float32)
        dx, xhat = _rms_row_grad(x, dout, w, D, eps)
        tl.store(dx_ptr + _row_offset(row, stride_dx, ALIGN) + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += dout * xhat.to(x_raw.dtype).to(tl.float32)
        row += n_prog
    if WANT_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + offs, dw, mask=mask)


@triton.jit
def _gated_fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, D, G, stride_y, stride_z, stride_o, eps, z_scale,
                      ALIGN: tl.constexpr, NORM: tl.constexpr, BEFORE: tl.constexpr, BLOCK_G: tl.constexpr,
                      PDL: tl.constexpr):
    """One program per (row, group of G channels); without NORM a "group" is just a block of channels."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * G + tl.arange(0, BLOCK_G)
    mask = (tl.arange(0, BLOCK_G) < G) & (offs < D)
    y = tl.load(y_ptr + _row_offset(row, stride_y, ALIGN) + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + _row_offset(row, stride_z, ALIGN) + offs, mask=mask, other=0.0).to(tl.float32) * z_scale
    gate = z * tl.sigmoid(z)
    if NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = y if BEFORE else y * gate
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / G + eps)
        out = h * rstd * w
        if BEFORE:
            out = out * gate
    else:
        out = y * gate
    tl.store(out_ptr + _row_offset(row, stride_o, ALIGN) + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(y_ptr, z_ptr, w_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr, N, D, G,
                      stride_y, stride_z, stride_do, stride_dy, stride_dz, eps, z_scale, ALIGN: tl.constexpr,
                      NORM: tl.constexpr, BEFORE: tl.constexpr, WANT_DW: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.program_id(1) * G + tl.arange(0, BLOCK_G)
    mask = (tl.arange(0, BLOCK_G) < G) & (offs < D)
    if NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_G], dtype=tl.float32)
    row = pid.to(tl.int64)
    while row < N:  # rows pid, pid + P, ... (a while loop: its bound is a runtime value)
        y = tl.load(y_ptr + _row_offset(row, stride_y, ALIGN) + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + _row_offset(row, stride_z, ALIGN) + offs, mask=mask, other=0.0).to(tl.float32) * z_scale
        dout = tl.load(dout_ptr + _row_offset(row, stride_do, ALIGN) + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig
        dgate = sig * (1.0 + z * (1.0 - sig))                      # d silu(z) / dz
        if NORM:
            if BEFORE:
                # out = w * n * gate, n = y * rstd(y)
                rstd = tl.rsqrt(tl.sum(y * y, axis=0) / G + eps)
                n = y * rstd
                dn = dout * w * gate
                dy = rstd * (dn - n * (tl.sum(dn * n, axis=0) / G))
                dz = dout * w * n * dgate
                if WANT_DW:
                    dw += dout * n * gate
            else:
                # out = w * n, n = h * rstd(h), h = y * gate
                h = y * gate
                rstd = tl.rsqrt(tl.sum(h * h, axis=0) / G + eps)
                n = h * rstd
                dn = dout * w
                dh = rstd * (dn - n * (tl.sum(dn * n, axis=0) / G))
                dy = dh * gate
                dz = dh * y * dgate
                if WANT_DW:
                    dw += dout * n
        else:
            dy = dout * gate
            dz = dout * y * dgate
        dz = dz * z_scale                                              # the gate reads z * z_scale
        tl.store(dy_ptr + _row_offset(row, stride_dy, ALIGN) + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + _row_offset(row, stride_dz, ALIGN) + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        row += n_prog
    if WANT_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * D + offs, dw, mask=mask)


# ------------------------------------------------------------------------------------------------------ launchers

def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> (N, d) with contiguous channels (a view whenever the layout allows one)."""
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _align(*rows: torch.Tensor) -> int:
    """Largest power of two (<= 16) dividing the row stride of every (N, d) tensor given."""
    align = 16
    for t in rows:
        while t.shape[0] > 1 and t.stride(0) % align:
            align //= 2
    return align


def _num_warps(block: int) -> int:
    """About 8 elements per thread: 16-byte bf16 accesses."""
    return min(16, max(1, block // 256))


def _programs_for_dw(n_rows: int, device: torch.device, programs_per_sm: int = 4) -> int:
    return max(1, min(n_rows, programs_per_sm * sm_count(device, cpu_default=4)))


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        x2 = _rows(x, d)
        out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        block = triton.next_power_of_2(d)
        if x2.shape[0]:
            pdl = pdl_supported(x.device)
            _rms_fwd_kernel[(x2.shape[0],)](x2, weight, out, x2.shape[0], d, x2.stride(0), out.stride(0), eps,
                                            ALIGN=_align(x2, out), BLOCK_D=block, PDL=pdl, num_warps=_num_warps(block),
                                            **launch_options(pdl))
        ctx.save_for_backward(x2, weight)
        ctx.eps, ctx.x_shape = eps, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, weight = ctx.saved_tensors
        n, d = x2.shape
        dout2 = _rows(dout, d)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        want_dw = ctx.needs_input_grad[1]
        programs = _programs_for_dw(n, x2.device) if want_dw else max(n, 1)
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=x2.device) if want_dw else dx
        block = triton.next_power_of_2(d)
        if n:
            _rms_bwd_kernel[(programs,)](x2, weight, dout2, dx, dw_part, n, d, x2.stride(0), dout2.stride(0),
                                         dx.stride(0), ctx.eps, ALIGN=_align(x2, dout2, dx), BLOCK_D=block,
                                         WANT_DW=want_dw, num_warps=_num_warps(block))
        dw = None
        if want_dw:
            dw = dw_part.sum(0).to(weight.dtype) if n else torch.zeros_like(weight)
        return dx.view(ctx.x_shape), dw, None


class _GatedRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, n_groups, before, out_dtype, z_scale):
        d = y.shape[-1]
        y2, z2 = _rows(y, d), _rows(z, d)
        out = torch.empty(y2.shape, dtype=out_dtype, device=y.device)
        group, grid_g = _grouping(d, n_groups, weight is not None)
        block = triton.next_power_of_2(group)
        if y2.shape[0]:
            pdl = pdl_supported(y.device)
            _gated_fwd_kernel[(y2.shape[0], grid_g)](
                y2, z2, weight if weight is not None else y2, out, d, group, y2.stride(0), z2.stride(0),
                out.stride(0), eps, z_scale, ALIGN=_align(y2, z2, out), NORM=weight is not None, BEFORE=before,
                BLOCK_G=block, PDL=pdl, num_warps=_num_warps(block), **launch_options(pdl))
        ctx.save_for_backward(y2, z2, weight)
        ctx.eps, ctx.n_groups, ctx.before, ctx.shape, ctx.z_scale = eps, n_groups, before, y.shape, z_scale
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight = ctx.saved_tensors
        n, d = y2.shape
        dout2 = _rows(dout, d)
        dy = torch.empty(y2.shape, dtype=y2.dtype, device=y2.device)
        dz = torch.empty(z2.shape, dtype=z2.dtype, device=z2.device)
        want_dw = weight is not None and ctx.needs_input_grad[2]
        programs = _programs_for_dw(n, y2.device) if want_dw else max(n, 1)
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=y2.device) if want_dw else dy
        group, grid_g = _grouping(d, ctx.n_groups, weight is not None)
        block = triton.next_power_of_2(group)
        if n:
            _gated_bwd_kernel[(programs, grid_g)](
                y2, z2, weight if weight is not None else y2, dout2, dy, dz, dw_part, n, d, group,
                y2.stride(0), z2.stride(0), dout2.stride(0), dy.stride(0), dz.stride(0), ctx.eps, ctx.z_scale,
                ALIGN=_align(y2, z2, dout2, dy, dz), NORM=weight is not None, BEFORE=ctx.before, WANT_DW=want_dw,
                BLOCK_G=block, num_warps=_num_warps(block))
        dw = None
        if want_dw:
            dw = dw_part.sum(0).to(weight.dtype) if n else torch.zeros_like(weight)
        return dy.view(ctx.shape), dz.view(ctx.shape), dw, None, None, None, None, None


def _grouping(d: int, n_groups: int, norm: bool) -> tuple[int, int]:
    """(channels per program, programs per row): a norm group, or for the plain gate blocks of up to 4096."""
    if norm:
        return d // n_groups, n_groups
    group = min(triton.next_power_of_2(d), 4096)
    return group, triton.cdiv(d, group)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as `rms_norm_ref`."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return _RMSNormFn.apply(x, weight.contiguous(), eps)     # the kernels index the weight by channel directly


def gated_rms_norm_triton(y, z, weight=None, *, eps: float = 1e-5, n_groups: int = 1, norm_before_gate: bool = False,
                          out_dtype: torch.dtype | None = None, z_scale: float = 1.0) -> torch.Tensor:
    """Same contract as `gated_rms_norm_ref`."""
    if y.shape != z.shape:
        raise ValueError(f"gated_rms_norm: y {tuple(y.shape)} and z {tuple(z.shape)} differ")
    d = y.shape[-1]
    if weight is not None and (d % n_groups or weight.shape != (d,)):
        raise ValueError(f"gated_rms_norm: {n_groups} groups must divide {d} channels and weight must be ({d},), "
                         f"got {tuple(weight.shape)}")
    weight = weight.contiguous() if weight is not None else None
    return _GatedRMSNormFn.apply(y, z, weight, eps, n_groups, norm_before_gate, out_dtype or z.dtype, float(z_scale))
