"""Triton kernels for the causal depthwise conv1d (+ SiLU): forward, backward and the one-token decode update.

Semantics are those of `conv.causal_conv1d_ref` (forward/backward) and `conv.causal_conv1d_update_ref` (decode):
    x (b, l, d) channels last, any strides with unit channel stride (a slice of in_proj's output is fine);
    weight (d, k) with 2 <= k <= 4; bias (d,) or None; seq_idx (b, l) int; initial_state (b, d, k-1);
    y (b, l, d) in x's dtype; final_state (b, d, k-1) in x's dtype: the last k-1 inputs.
All arithmetic is fp32 whatever the storage dtype.

Why the kernels look the way they do: the op is pure memory traffic (4 multiply-adds per element), so each
element must cross HBM once. A program owns `block_d` channels of one row over `chunk_l` tokens and walks the tokens
in order, keeping the last three inputs (and, backward, the last three input-gradients) in registers as a sliding
window: no element is loaded twice except the 3-token halo at the chunk's start (and end, backward), and the SiLU is
evaluated once per element. The token loop is unrolled `unroll` times so that many row loads are in flight at once.
The window always has four slots (input offsets -3..0); a kernel of k < 4 taps sees zero weights in the first 4-k.

Backward recomputes the pre-activation from x (reading x again is cheaper than storing it) and emits dx for token
t-3 when it reaches token t (dx[s] needs the input-gradients of tokens s..s+3). Weight and bias gradients are
summed per program in fp32 registers, written as one partial per program and reduced by torch (deterministic).
Launch shapes come from `default_launch` (no autotuning: one compile per shape class); `ConvLaunch` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import sm_count
from .pdl import launch_options, pdl_supported, pdl_wait

WINDOW = 4  # register window slots: inputs t-3 .. t


@dataclass(frozen=True)
class ConvLaunch:
    """Launch shape of the sequence kernels: channels per program, tokens per program, token-loop unrolling, warps."""
    block_d: int = 256
    chunk_l: int = 64
    unroll: int = 8
    num_warps: int = 2

    def __post_init__(self):
        if self.chunk_l % self.unroll or self.chunk_l < WINDOW or self.block_d & (self.block_d - 1):
            raise ValueError(f"ConvLaunch: chunk_l must be >= {WINDOW} and a multiple of unroll, block_d a power "
                             f"of 2: {self}")


def default_launch(b: int, l: int, d: int, device: torch.device) -> ConvLaunch:
    """128 channels per program (a 256-byte bf16 row segment per token), one warp, and chunks of 32 tokens, fewer
    when that leaves under about eight programs per SM (shorter chunks only add halo re-reads). Chosen from
    `bench/conv_norm_kernels.py --sweep` on an H100 (2026-11-24, 14 launch shapes): best or within 2% of the best
    for both passes at the 0.5B (4 x 2K) and 7B (1 x 8K) shapes, with and without the weight gradient; 256 channels
    and 64-token chunks (the earlier default) were 5-14% slower. Both passes take this shape."""
    block_d = 128 if d > 64 else triton.next_power_of_2(max(d, 16))
    n_d = triton.cdiv(d, block_d)
    target = 8 * sm_count(device, cpu_default=8)
    chunk = 32
    while chunk > 16 and b * n_d * triton.cdiv(l, chunk) < target:
        chunk //= 2
    return ConvLaunch(block_d=block_d, chunk_l=chunk, unroll=8, num_warps=1)


# ----------------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, SLOT: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Weight of window slot SLOT (input offset SLOT-3) as fp32: column SLOT-(4-K), zero before the kernel starts."""
    if SLOT >= 4 - K:
        return tl.load(w_ptr + offs_d * stride_wd + (SLOT - (4 - K)) * stride_wk, mask=mask_d, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BLOCK_D], dtype=tl.float32)


@triton.jit
def _input(x_row, init_row, s, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
           K: tl.constexpr, HAS_INIT: tl.constexpr, X_ALIGN: tl.constexpr):
    """Input at token s of one row as fp32: x for 0 <= s < L, the initial state for -(K-1) <= s < 0, else 0.
    X_ALIGN: a power of two dividing x's strides, so that row loads vectorize even when x is a slice whose
    token stride is not a multiple of 16 (in_proj's output width rarely is)."""
    row_off = tl.multiple_of(s.to(tl.int64) * stride_xl, X_ALIGN)
    v = tl.load(x_row + row_off + offs_d, mask=mask_d & (s >= 0) & (s < L), other=0.0)
    v = v.to(tl.float32)
    if HAS_INIT:
        j = s + (K - 1)
        h = tl.load(init_row + offs_d * stride_id + j * stride_ik, mask=mask_d & (s < 0) & (j >= 0), other=0.0)
        v += h.to(tl.float32)
    return v


@triton.jit
def _doc(seq_row, s, L, stride_sl, first_doc, HAS_SEQ: tl.constexpr):
    """Document id of token s (tokens before the row belong to the first document; past the end: don't care)."""
    if HAS_SEQ:
        return tl.load(seq_row + s * stride_sl, mask=(s >= 0) & (s < L), other=first_doc)
    else:
        return first_doc


@triton.jit
def _preact(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, w0, w1, w2, w3, bias, HAS_SEQ: tl.constexpr):
    """Pre-activation at token t: window slots whose input lies in another document than t contribute nothing."""
    u = bias + w3 * xt
    if HAS_SEQ:
        u += tl.where(sm3 == st, w0 * xm3, 0.0)
        u += tl.where(sm2 == st, w1 * xm2, 0.0)
        u += tl.where(sm1 == st, w2 * xm1, 0.0)
    else:
        u += w0 * xm3 + w1 * xm2 + w2 * xm1
    return u


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, final_ptr,
    L, D,
    stride_xb, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik, stride_sb, stride_sl,
    stride_yb, stride_yl, stride_fb, stride_fd, stride_fk,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WRITE_FINAL: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_L: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w0 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 0, K, BLOCK_D)
    w1 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 1, K, BLOCK_D)
    w2 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 2, K, BLOCK_D)
    w3 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 3, K, BLOCK_D)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)

    b64 = pid_b.to(tl.int64)
    x_row = x_ptr + tl.multiple_of(b64 * stride_xb, X_ALIGN)
    y_row = y_ptr + b64 * stride_yb
    init_row = init_ptr + b64 * stride_ib
    seq_row = seq_ptr + b64 * stride_sb
    first_doc = 0
    if HAS_SEQ:
        first_doc = tl.load(seq_row)

    t0 = pid_l * CHUNK_L
    xm3 = _input(x_row, init_row, t0 - 3, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm2 = _input(x_row, init_row, t0 - 2, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm1 = _input(x_row, init_row, t0 - 1, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    sm3 = _doc(seq_row, t0 - 3, L, stride_sl, first_doc, HAS_SEQ)
    sm2 = _doc(seq_row, t0 - 2, L, stride_sl, first_doc, HAS_SEQ)
    sm1 = _doc(seq_row, t0 - 1, L, stride_sl, first_doc, HAS_SEQ)

    for i in range(0, CHUNK_L, UNROLL):
        for j in tl.static_range(UNROLL):
            t = t0 + i + j
            xt = _input(x_row, init_row, t, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, False, X_ALIGN)
            st = _doc(seq_row, t, L, stride_sl, first_doc, HAS_SEQ)
            u = _preact(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, w0, w1, w2, w3, bias, HAS_SEQ)
            if SILU:
                u = u * tl.sigmoid(u)
            tl.store(y_row + t.to(tl.int64) * stride_yl + offs_d, u.to(y_ptr.dtype.element_ty), mask=mask_d & (t < L))
            xm3, xm2, xm1 = xm2, xm1, xt
            sm3, sm2, sm1 = sm2, sm1, st

    if WRITE_FINAL:
        # the row's last program stores the last K-1 inputs (from the initial state when the row is shorter)
        last = mask_d & (pid_l == tl.num_programs(1) - 1)
        f_row = final_ptr + b64 * stride_fb + offs_d * stride_fd
        for j in tl.static_range(K - 1):
            v = _input(x_row, init_row, L - (K - 1) + j, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                       K, HAS_INIT, X_ALIGN)
            tl.store(f_row + j * stride_fk, v.to(final_ptr.dtype.element_ty), mask=last)


@triton.jit
def _conv_bwd_step(
    t, t0, L, x_row, init_row, dy_row, dx_row, dinit_row, dfinal_row, seq_row, first_doc,
    stride_xl, stride_id, stride_ik, stride_dyl, stride_dxl, stride_gid, stride_gik, stride_sl, stride_gfd,
    stride_gfk, offs_d, mask_d, w0, w1, w2, w3, bias,
    xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db,
    K: tl.constexpr, CHUNK_L: tl.constexpr, WANT_DINIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr, OWN: tl.constexpr,
):
    """One token of the backward walk: the input-gradient g_t of token t (0 past the row's end), dx of token t-3,
    and (OWN: t is one of this program's tokens) its weight/bias-gradient terms."""
    xt = _input(x_row, init_row, t, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, False, X_ALIGN)
    st = _doc(seq_row, t, L, stride_sl, first_doc, HAS_SEQ)
    live = mask_d & (t < L)
    dy_off = tl.multiple_of(t.to(tl.int64) * stride_dyl, DY_ALIGN)
    g = tl.load(dy_row + dy_off + offs_d, mask=live, other=0.0).to(tl.float32)
    if SILU:
        u = _preact(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, w0, w1, w2, w3, bias, HAS_SEQ)
        sig = tl.sigmoid(u)
        g = g * sig * (1.0 + u * (1.0 - sig))
    if OWN:
        if HAS_SEQ:
            dw0 += tl.where(sm3 == st, g * xm3, 0.0)
            dw1 += tl.where(sm2 == st, g * xm2, 0.0)
            dw2 += tl.where(sm1 == st, g * xm1, 0.0)
        else:
            dw0 += g * xm3
            dw1 += g * xm2
            dw2 += g * xm1
        dw3 += g * xt
        db += g

    # token s = t-3 feeds outputs s..s+3 through slots 3..0 (only those in its own document)
    s = t - 3
    dxs = w3 * gm3
    if HAS_SEQ:
        dxs += tl.where(sm3 == sm2, w2 * gm2, 0.0)
        dxs += tl.where(sm3 == sm1, w1 * gm1, 0.0)
        dxs += tl.where(sm3 == st, w0 * g, 0.0)
    else:
        dxs += w2 * gm2 + w1 * gm1 + w0 * g
    if HAS_DFINAL:
        jf = s - (L - (K - 1))
        dxs += tl.load(dfinal_row + offs_d * stride_gfd + jf * stride_gfk, mask=mask_d & (jf >= 0) & (s < L),
                       other=0.0).to(tl.float32)
    tl.store(dx_row + s.to(tl.int64) * stride_dxl + offs_d, dxs.to(dx_row.dtype.element_ty),
             mask=mask_d & (s >= t0) & (s < t0 + CHUNK_L) & (s >= 0) & (s < L))
    if WANT_DINIT:
        ji = s + (K - 1)
        tl.store(dinit_row + offs_d * stride_gid + ji * stride_gik, dxs.to(dinit_row.dtype.element_ty),
                 mask=mask_d & (s < 0) & (ji >= 0))
    return xt, st, g, dw0, dw1, dw2, dw3, db


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dfinal_ptr, dx_ptr, dinit_ptr, dw_ptr, db_ptr,
    L, D,
    stride_xb, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik, stride_sb, stride_sl,
    stride_dyb, stride_dyl, stride_gfb, stride_gfd, stride_gfk, stride_dxb, stride_dxl,
    stride_gib, stride_gid, stride_gik,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WANT_DINIT: tl.constexpr, HAS_DFINAL: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_L: tl.constexpr, UNROLL: tl.constexpr,
):
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w0 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 0, K, BLOCK_D)
    w1 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 1, K, BLOCK_D)
    w2 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 2, K, BLOCK_D)
    w3 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 3, K, BLOCK_D)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)

    b64 = pid_b.to(tl.int64)
    x_row = x_ptr + tl.multiple_of(b64 * stride_xb, X_ALIGN)
    init_row = init_ptr + b64 * stride_ib
    seq_row = seq_ptr + b64 * stride_sb
    dy_row = dy_ptr + tl.multiple_of(b64 * stride_dyb, DY_ALIGN)
    dx_row = dx_ptr + b64 * stride_dxb
    dinit_row = dinit_ptr + b64 * stride_gib
    dfinal_row = dfinal_ptr + b64 * stride_gfb
    first_doc = 0
    if HAS_SEQ:
        first_doc = tl.load(seq_row)

    t0 = pid_l * CHUNK_L
    xm3 = _input(x_row, init_row, t0 - 3, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm2 = _input(x_row, init_row, t0 - 2, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm1 = _input(x_row, init_row, t0 - 1, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    sm3 = _doc(seq_row, t0 - 3, L, stride_sl, first_doc, HAS_SEQ)
    sm2 = _doc(seq_row, t0 - 2, L, stride_sl, first_doc, HAS_SEQ)
    sm1 = _doc(seq_row, t0 - 1, L, stride_sl, first_doc, HAS_SEQ)
    # input-gradients of tokens t0-3..t0-1: only dx of tokens >= t0 (or the initial state) is emitted, which
    # never reads them, except before the row's start where they are truly zero
    gm3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    gm2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    gm1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)

    for i in range(0, CHUNK_L, UNROLL):
        for j in tl.static_range(UNROLL):
            xt, st, g, dw0, dw1, dw2, dw3, db = _conv_bwd_step(
                t0 + i + j, t0, L, x_row, init_row, dy_row, dx_row, dinit_row, dfinal_row, seq_row, first_doc,
                stride_xl, stride_id, stride_ik, stride_dyl, stride_dxl, stride_gid, stride_gik, stride_sl,
                stride_gfd, stride_gfk, offs_d, mask_d, w0, w1, w2, w3, bias,
                xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db,
                K, CHUNK_L, WANT_DINIT, HAS_SEQ, SILU, HAS_DFINAL, X_ALIGN, DY_ALIGN, True)
            xm3, xm2, xm1 = xm2, xm1, xt
            sm3, sm2, sm1 = sm2, sm1, st
            gm3, gm2, gm1 = gm2, gm1, g
    # three tokens past the chunk (the next program's) complete dx of the chunk's last three tokens
    for j in tl.static_range(3):
        xt, st, g, dw0, dw1, dw2, dw3, db = _conv_bwd_step(
            t0 + CHUNK_L + j, t0, L, x_row, init_row, dy_row, dx_row, dinit_row, dfinal_row, seq_row, first_doc,
            stride_xl, stride_id, stride_ik, stride_dyl, stride_dxl, stride_gid, stride_gik, stride_sl,
            stride_gfd, stride_gfk, offs_d, mask_d, w0, w1, w2, w3, bias,
            xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db,
            K, CHUNK_L, WANT_DINIT, HAS_SEQ, SILU, HAS_DFINAL, X_ALIGN, DY_ALIGN, False)
        xm3, xm2, xm1 = xm2, xm1, xt
        sm3, sm2, sm1 = sm2, sm1, st
        gm3, gm2, gm1 = gm2, gm1, g

    part = (pid_b * tl.num_programs(1) + pid_l).to(tl.int64)
    if WANT_DW:
        # partial weight gradient of this program, stored (4, D) per program: slot-major, channels contiguous
        dw_row = dw_ptr + part * 4 * D + offs_d
        tl.store(dw_row, dw0, mask=mask_d)
        tl.store(dw_row + D, dw1, mask=mask_d)
        tl.store(dw_row + 2 * D, dw2, mask=mask_d)
        tl.store(dw_row + 3 * D, dw3, mask=mask_d)
    if WANT_DB:
        tl.store(db_ptr + part * D + offs_d, db, mask=mask_d)


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, idx_ptr, y_ptr,
    D,
    stride_xb, stride_sn, stride_sd, stride_sk, stride_wd, stride_wk, stride_yb,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pid_d, pid_b = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    cols = tl.arange(0, BLOCK_K)
    if HAS_IDX:
        slot = tl.load(idx_ptr + pid_b).to(tl.int64)
    else:
        slot = pid_b.to(tl.int64)
    s_ptrs = state_ptr + slot * stride_sn + offs_d[:, None] * stride_sd + cols[None, :] * stride_sk
    mask2 = mask_d[:, None] & (cols[None, :] < K - 1)
    old = tl.load(s_ptrs, mask=mask2, other=0.0).to(tl.float32)        # (BLOCK_D, BLOCK_K): inputs t-k+1 .. t-1
    shifted = tl.load(s_ptrs + stride_sk, mask=mask_d[:, None] & (cols[None, :] < K - 2), other=0.0)
    xt = tl.load(x_ptr + pid_b.to(tl.int64) * stride_xb + offs_d, mask=mask_d, other=0.0)
    w_old = tl.load(w_ptr + offs_d[:, None] * stride_wd + cols[None, :] * stride_wk, mask=mask2, other=0.0)
    w_new = tl.load(w_ptr + offs_d * stride_wd + (K - 1) * stride_wk, mask=mask_d, other=0.0).to(tl.float32)
    u = tl.sum(old * w_old.to(tl.float32), axis=1) + w_new * xt.to(tl.float32)
    if HAS_BIAS:
        u += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        u = u * tl.sigmoid(u)
    tl.store(y_ptr + pid_b.to(tl.int64) * stride_yb + offs_d, u.to(y_ptr.dtype.element_ty), mask=mask_d)
    # new state: old inputs shifted one slot left, the new input last; every read above precedes every write
    new = tl.where(cols[None, :] == K - 2, xt[:, None].to(shifted.dtype), shifted)
    tl.debug_barrier()
    tl.store(s_ptrs, new.to(state_ptr.dtype.element_ty), mask=mask2)


# ------------------------------------------------------------------------------------------------------ launchers

def _check(x, weight, activation):
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, length, channels), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1] or not 2 <= weight.shape[1] <= WINDOW:
        raise ValueError(f"causal_conv1d (Triton): weight must be (channels, k) with 2 <= k <= {WINDOW}, "
                         f"got {tuple(weight.shape)} for {x.shape[-1]} channels")
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}")


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _align(t: torch.Tensor) -> int:
    """Largest power of two (<= 16) dividing every stride of t that matters (all but unit-size dims')."""
    align = 16
    for size, stride in zip(t.shape, t.stride()):
        while size > 1 and stride % align:
            align //= 2
    return align


def _strides3(t, dims=3):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0,) * dims


def _forward(x, weight, bias, initial_state, seq_idx, silu, want_final, launch):
    b, l, d = x.shape
    k = weight.shape[1]
    y = torch.empty((b, l, d), dtype=x.dtype, device=x.device)
    final = torch.empty((b, d, k - 1), dtype=x.dtype, device=x.device) if want_final else None
    grid = (triton.cdiv(d, launch.block_d), triton.cdiv(l, launch.chunk_l), b)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x, y, final if final is not None else y,
        l, d,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *_strides3(initial_state),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        y.stride(0), y.stride(1), *_strides3(final),
        K=k, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        SILU=silu, WRITE_FINAL=want_final, X_ALIGN=_align(x), BLOCK_D=launch.block_d, CHUNK_L=launch.chunk_l,
        UNROLL=launch.unroll, num_warps=launch.num_warps,
    )
    return y, final


def _backward(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu, want_dw, want_db, want_dinit, launch):
    b, l, d = x.shape
    k = weight.shape[1]
    dx = torch.empty((b, l, d), dtype=x.dtype, device=x.device)
    dinit = None
    if initial_state is not None and want_dinit:
        # (b, d, k-1) viewed from a (k-1, b, d) buffer: channels contiguous, so the kernel stores dinit in the
        # layout its registers already have (a strided store would cost a layout conversion on every token)
        dinit = torch.empty((k - 1, b, d), dtype=initial_state.dtype, device=x.device).permute(1, 2, 0)
    n_l = triton.cdiv(l, launch.chunk_l)
    dw_part = torch.empty((b * n_l, WINDOW, d), dtype=torch.float32, device=x.device) if want_dw else None
    db_part = torch.empty((b * n_l, d), dtype=torch.float32, device=x.device) if want_db else None
    grid = (triton.cdiv(d, launch.block_d), n_l, b)
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x, dy, dfinal if dfinal is not None else dy, dx,
        dinit if dinit is not None else dx, dw_part if dw_part is not None else dx,
        db_part if db_part is not None else dx,
        l, d,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *_strides3(initial_state),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        dy.stride(0), dy.stride(1), *_strides3(dfinal), dx.stride(0), dx.stride(1), *_strides3(dinit),
        K=k, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
        WANT_DINIT=dinit is not None, HAS_DFINAL=dfinal is not None, WANT_DW=want_dw, WANT_DB=want_db,
        X_ALIGN=_align(x), DY_ALIGN=_align(dy),
        BLOCK_D=launch.block_d, CHUNK_L=launch.chunk_l, UNROLL=launch.unroll, num_warps=launch.num_warps,
    )
    # slot s of the window is weight column s - (4 - k)
    dw = dw_part.sum(0)[WINDOW - k:].t().to(weight.dtype) if want_dw else None
    db = db_part.sum(0).to(bias.dtype) if want_db else None
    return dx, dw, db, dinit.contiguous() if dinit is not None else None


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, silu, want_final, launch):
        x = _unit_channel_stride(x)
        y, final = _forward(x, weight, bias, initial_state, seq_idx, silu, want_final, launch)
        ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
        ctx.silu, ctx.launch = silu, launch
        ctx.set_materialize_grads(False)
        return (y, final) if want_final else y

    @staticmethod
    def backward(ctx, dy, dfinal=None):
        x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else _unit_channel_stride(dy)
        need = ctx.needs_input_grad
        dx, dw, db, dinit = _backward(x, weight, bias, initial_state, seq_idx, dy, dfinal, ctx.silu,
                                      want_dw=need[1], want_db=bias is not None and need[2],
                                      want_dinit=need[3], launch=ctx.launch)
        return dx, dw, db, dinit, None, None, None, None


def causal_conv1d_triton(x, weight, bias=None, *, activation: str | None = "silu", seq_idx=None, initial_state=None,
                         return_final_state: bool = False, launch: ConvLaunch | None = None):
    """Same contract as `causal_conv1d_ref`; `launch` fixes the launch shape of both passes (tests, sweeps)."""
    _check(x, weight, activation)
    b, l, d = x.shape
    if initial_state is not None and tuple(initial_state.shape) != (b, d, weight.shape[1] - 1):
        raise ValueError(f"causal_conv1d: initial_state must be {(b, d, weight.shape[1] - 1)}, "
                         f"got {tuple(initial_state.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != (b, l):
        raise ValueError(f"causal_conv1d: seq_idx must be {(b, l)}, got {tuple(seq_idx.shape)}")
    if x.numel() == 0:  # nothing to launch; the reference handles empty shapes
        from .conv import causal_conv1d_ref
        return causal_conv1d_ref(x, weight, bias, activation=activation, seq_idx=seq_idx, initial_state=initial_state,
                                 return_final_state=return_final_state)
    bias = bias.contiguous() if bias is not None else None        # the kernels index bias by channel directly
    return _CausalConv1dFn.apply(x, weight, bias, initial_state, seq_idx, activation == "silu",
                                 return_final_state, launch or default_launch(b, l, d, x.device))


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation: str | None = "silu",
                                state_indices=None):
    """Same contract as `causal_conv1d_update_ref`: x (b, d), conv_state (slots, d, k-1) updated in place -> y (b, d).
    Rows must name distinct slots (two rows writing one slot race, as they would in any in-place update)."""
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 2:
        raise ValueError(f"causal_conv1d_update: x (b, d) and weight (d, k >= 2) expected, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d_update: unsupported activation {activation!r}")
    b, d = x.shape
    k = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[1:] != (d, k - 1):
        raise ValueError(f"causal_conv1d_update: conv_state must be (slots, {d}, {k - 1}), "
                         f"got {tuple(conv_state.shape)}")
    x = _unit_channel_stride(x)
    bias = bias.contiguous() if bias is not None else None
    state_indices = state_indices.contiguous() if state_indices is not None else None
    y = torch.empty((b, d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_d = min(256, triton.next_power_of_2(d))
    grid = (triton.cdiv(d, block_d), b)
    pdl = pdl_supported(x.device)
    _conv_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight,
        state_indices if state_indices is not None else x, y,
        d,
        x.stride(0), *conv_state.stride(), weight.stride(0), weight.stride(1), y.stride(0),
        K=k, HAS_BIAS=bias is not None, HAS_IDX=state_indices is not None, SILU=activation == "silu",
        BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(k - 1), PDL=pdl, num_warps=2, **launch_options(pdl),
    )
    return y
