"""Triton kernel of ops/mamba_decode.py: the Mamba decode step (conv update + SiLU, SSD state update, D skip, gate) in
one launch. Semantics are `mamba_decode.mamba_step_ref`'s.

Grid (cdiv(p, BP), b, h): a program owns BP rows of one head's state in one slot (BP x n fp32, read and written
once: the op is bound by that traffic) and the BP x channels of that head, whose conv window it updates alone. The
B and C channels of a group are read by every program of the group (each recomputes their conv, a few KB from L2),
so none of them may shift that part of the conv state while another still has to read it: each program counts
itself in on a per-(row, group) counter after its reads, and the last to arrive writes the new B/C windows and
resets the counter to zero (no program waits on another, so no launch order or residency is assumed).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .pdl import launch_options, pdl_supported, pdl_wait
from .ssd_triton import _INTERPRET, _discretize, _limits, _state_step, _step_program, _store


@triton.jit
def _conv_window(row_ptr, s_cd, s_ck, w_ptr, s_wd, s_wk, bias_ptr, ch, mask, x_new,
                 K: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The depthwise conv + SiLU of channels ch (BLOCK,) at the new token x_new (BLOCK,) fp32 over the window in the
    conv state row_ptr (d, K-1). Returns (silu output (BLOCK,) fp32, the shifted window (BLOCK, BK) to store)."""
    cols = tl.arange(0, BK)
    s_ptrs = row_ptr + ch[:, None].to(tl.int64) * s_cd + cols[None, :] * s_ck
    old = tl.load(s_ptrs, mask=mask[:, None] & (cols[None, :] < K - 1), other=0.0)
    w_old = tl.load(w_ptr + ch[:, None] * s_wd + cols[None, :] * s_wk, mask=mask[:, None] & (cols[None, :] < K - 1),
                    other=0.0)
    w_new = tl.load(w_ptr + ch * s_wd + (K - 1) * s_wk, mask=mask, other=0.0).to(tl.float32)
    u = tl.sum(old.to(tl.float32) * w_old.to(tl.float32), axis=1) + w_new * x_new
    if HAS_BIAS:
        u += tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    u = u * tl.sigmoid(u)
    # the window after this token: inputs t-K+2 .. t (the oldest dropped, x_new appended)
    shifted = tl.load(s_ptrs + s_ck, mask=mask[:, None] & (cols[None, :] < K - 2), other=0.0)
    new = tl.where(cols[None, :] == K - 2, x_new[:, None].to(shifted.dtype), shifted)
    return u, new


@triton.jit
def _store_window(row_ptr, s_cd, s_ck, ch, mask, new, K: tl.constexpr, BK: tl.constexpr):
    cols = tl.arange(0, BK)
    s_ptrs = row_ptr + ch[:, None].to(tl.int64) * s_cd + cols[None, :] * s_ck
    tl.store(s_ptrs, new.to(row_ptr.dtype.element_ty), mask=mask[:, None] & (cols[None, :] < K - 1))


@triton.jit
def _mamba_step_kernel(zx_ptr, s_zx, conv_ptr, s_cs, s_cd, s_ck, w_ptr, s_wd, s_wk, cbias_ptr,
                       state_ptr, s_ss, s_sh, s_sp, s_sn, idx_ptr, sync_ptr,
                       A_log_ptr, D_ptr, dt_bias_ptr, y_ptr, s_yb, s_yh, s_yp,
                       g, hpg, p, n, d_ssm, lo, hi, dt_scale, z_scale,
                       K: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                       HAS_IDX: tl.constexpr, HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                       HAS_CONV_BIAS: tl.constexpr, GATE: tl.constexpr, SOFTPLUS: tl.constexpr,
                       HAS_LIMIT: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b, hd, gi, slot, rp, rn, mp, mn = _step_program(idx_ptr, hpg, p, n, BP, BN, HAS_IDX)
    zx_row = zx_ptr + b.to(tl.int64) * s_zx
    conv_row = conv_ptr + slot * s_cs
    gs = g * n
    # x|B|C channels: this head's x rows, its group's B and C (conv channel index; in zxbcdt they follow z)
    cx = hd * p + rp
    cb = d_ssm + gi * n + rn
    cc = d_ssm + gs + gi * n + rn
    x_new = tl.load(zx_row + d_ssm + cx, mask=mp, other=0.0).to(tl.float32)
    b_new = tl.load(zx_row + d_ssm + cb, mask=mn, other=0.0).to(tl.float32)
    c_new = tl.load(zx_row + d_ssm + cc, mask=mn, other=0.0).to(tl.float32)
    xv, x_win = _conv_window(conv_row, s_cd, s_ck, w_ptr, s_wd, s_wk, cbias_ptr, cx, mp, x_new, K, BK, HAS_CONV_BIAS)
    Bv, b_win = _conv_window(conv_row, s_cd, s_ck, w_ptr, s_wd, s_wk, cbias_ptr, cb, mn, b_new, K, BK, HAS_CONV_BIAS)
    Cv, c_win = _conv_window(conv_row, s_cd, s_ck, w_ptr, s_wd, s_wk, cbias_ptr, cc, mn, c_new, K, BK, HAS_CONV_BIAS)

    dt_bias = 0.0
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + hd).to(tl.float32)
    dt_raw = tl.load(zx_row + d_ssm + d_ssm + 2 * gs + hd).to(tl.float32) * dt_scale
    dtv = _discretize(dt_raw, dt_bias, SOFTPLUS, HAS_LIMIT, lo, hi)
    A = -tl.exp(tl.load(A_log_ptr + hd).to(tl.float32))
    sptr = state_ptr + slot * s_ss + hd * s_sh + rp[:, None] * s_sp + rn[None, :] * s_sn
    smask = mp[:, None] & mn[None, :]
    y = _state_step(tl.load(sptr, mask=smask, other=0.0), sptr, smask, xv, dtv, A, Bv, Cv)
    if HAS_D:
        y += tl.load(D_ptr + hd).to(tl.float32) * xv
    if GATE:
        z = tl.load(zx_row + cx, mask=mp, other=0.0).to(tl.float32) * z_scale
        y = y * z * tl.sigmoid(z)
    _store(y_ptr + b.to(tl.int64) * s_yb + hd * s_yh + rp * s_yp, y, mp, INTERP)

    # Every thread of this program has read the conv windows (their values were used above) before it writes its
    # own x channels' windows or counts itself in.
    tl.debug_barrier()
    _store_window(conv_row, s_cd, s_ck, cx, mp, x_win, K, BK)
    arrived = tl.atomic_add(sync_ptr + b * g + gi, 1)
    if arrived == hpg * tl.num_programs(0) - 1:
        # the last program of this (row, group): every other one has read the B/C windows
        _store_window(conv_row, s_cd, s_ck, cb, mn, b_win, K, BK)
        _store_window(conv_row, s_cd, s_ck, cc, mn, c_win, K, BK)
        tl.atomic_xchg(sync_ptr + b * g + gi, 0)


def block_rows(p: int, n: int) -> tuple[int, int, int]:
    """(BP, BN, num_warps): state rows per program, the padded d_state and the warps. 16 rows and 8 warps: the best
    or within 2% of the best of the (BP, warps) sweep at batch 1 (bench/mamba_decode_kernels.py --sweep, H100:
    0.5B 4.6 us, 7B within noise of the fastest); fewer rows per program mean more programs each recomputing the
    group's B/C conv, more rows mean too few programs to fill the GPU at batch 1."""
    return min(16, triton.next_power_of_2(p)), max(16, triton.next_power_of_2(n)), 8


def mamba_step_triton(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, *, n_groups: int,
                      d_state: int, dt_limit=(0.0, math.inf), dt_scale: float = 1.0, z_scale: float = 1.0,
                      gate: bool = True, state_indices=None, sync=None, launch: tuple[int, int] | None = None):
    """See mamba_decode.py. launch=(BP, num_warps) overrides block_rows (for benchmarks)."""
    b = zxbcdt.shape[0]
    h = A_log.shape[0]
    conv_dim, k = conv_weight.shape
    d_ssm = conv_dim - 2 * n_groups * d_state
    if d_ssm <= 0 or d_ssm % h or h % n_groups:
        raise ValueError(f"mamba_step: conv_dim {conv_dim}, {h} heads, {n_groups} groups and d_state {d_state} "
                         "do not describe a Mamba-2 layer")
    p = d_ssm // h
    if zxbcdt.dim() != 2 or zxbcdt.shape[1] != d_ssm + conv_dim + h or zxbcdt.stride(1) != 1:
        raise ValueError(f"mamba_step: zxbcdt must be (b, {d_ssm + conv_dim + h}) with a contiguous last dim, got "
                         f"{tuple(zxbcdt.shape)}")
    if conv_state.dim() != 3 or conv_state.shape[1:] != (conv_dim, k - 1) or k < 2:
        raise ValueError(f"mamba_step: conv_state must be (slots, {conv_dim}, {k - 1}), got {tuple(conv_state.shape)}")
    if ssm_state.dtype != torch.float32 or ssm_state.shape[1:] != (h, p, d_state):
        raise ValueError(f"mamba_step: ssm_state must be float32 (slots, {h}, {p}, {d_state}), got "
                         f"{ssm_state.dtype} {tuple(ssm_state.shape)}")
    if sync is None:
        sync = torch.zeros(b * n_groups, dtype=torch.int32, device=zxbcdt.device)
    elif sync.dtype != torch.int32 or sync.numel() < b * n_groups:
        raise ValueError(f"mamba_step: sync must be int32 zeros with at least {b * n_groups} entries")
    y = torch.empty(b, h, p, dtype=zxbcdt.dtype, device=zxbcdt.device)
    if b == 0:
        return y
    bp, bn, warps = block_rows(p, d_state)
    if launch is not None:
        bp, warps = launch
    lo, hi, has_limit = _limits(dt_limit)
    pdl = pdl_supported(zxbcdt.device)
    _mamba_step_kernel[(triton.cdiv(p, bp), b, h)](
        zxbcdt, zxbcdt.stride(0), conv_state, *conv_state.stride(), conv_weight, *conv_weight.stride(),
        conv_bias if conv_bias is not None else conv_weight,
        ssm_state, *ssm_state.stride(), state_indices if state_indices is not None else sync, sync,
        A_log, D if D is not None else A_log, dt_bias if dt_bias is not None else A_log, y, *y.stride(),
        n_groups, h // n_groups, p, d_state, d_ssm, lo, hi, float(dt_scale), float(z_scale),
        K=k, BK=triton.next_power_of_2(k - 1), BP=bp, BN=bn, HAS_IDX=state_indices is not None, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_CONV_BIAS=conv_bias is not None, GATE=gate, SOFTPLUS=True,
        HAS_LIMIT=has_limit, INTERP=_INTERPRET, PDL=pdl, num_warps=warps, **launch_options(pdl))
    return y
