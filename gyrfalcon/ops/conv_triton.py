"""Triton kernels for the causal depthwise conv1d (+ SiLU): forward, backward and the one-token decode update.

Semantics are those of `conv.causal_conv1d_ref` (forward/backward) and `conv.causal_conv1d_update_ref` (decode):
    x (b, l, d) channels last, any strides with unit channel stride (a slice of in_proj's output is fine);
    weight (d, k) with 2 <= k <= 4; bias (d,) or None; seq_idx (b, l) int; initial_state (b, d, k-1);
    y (b, l, d) in x's dtype; final_state (b, d, k-1) in x's dtype: the last k-1 inputs.
All arithmetic is fp32 whatever the storage dtype.

The op is pure memory traffic (4 multiply-adds per element), so each element must cross HBM once, and the kernels
must keep enough bytes in flight to saturate HBM. Two designs, both complete (every feature above, every gradient),
chosen per call by `ConvLaunch.tiled`; `default_launch` picks one family for every call (`TILED`).

Row walk (tiled=False). A program owns `block_d` channels of one row over `chunk_l` tokens and walks the tokens
in order, keeping the last three inputs (and, backward, the last three input-gradients) in registers as a sliding
window: no element is loaded twice except the 3-token halo at the chunk's start (and end, backward), and the SiLU is
evaluated once per element. The token loop is unrolled `unroll` times so that many row loads are in flight at once.
The window always has four slots (input offsets -3..0); a kernel of k < 4 taps sees zero weights in the first 4-k.
Backward recomputes the pre-activation from x (reading x again is cheaper than storing it) and emits dx for token
t-3 when it reaches token t (dx[s] needs the input-gradients of tokens s..s+3). Weight and bias gradients are
summed per program in fp32 registers, written as one partial per program and reduced by torch (deterministic).
Measured at about 2x the HBM floor forward on an H100; the suspected cause: each load is one 512-byte row segment,
and a row's store sits between consecutive loads, which the compiler cannot move loads across (y may alias x as far
as it knows), so few bytes are in flight per program however far the loop is unrolled.

2-D tiles (tiled=True). A program owns a `block_l` x `block_d` tile and issues all of its loads before its first
store: large vectorized loads, a tile's worth of bytes in flight. The window slot at token offset j-3 is a second
load of the same tile shifted by j-3 rows: those rows were just brought in by the other slots' loads (L1/L2 hits),
so only the 3-row halo costs HBM traffic, and no register shifting is needed (Triton has no cheap row shift).
Backward: dx[s] = sum_m w[3-m] g[s+m] with g = dy * silu'(u), so a tile of s needs g over s0 .. s0+block_l+2 and
so u (and x) from s0-3. `g_shift` picks how the shifted g arrive:
    "recompute": x is loaded once at each offset -3..+3 and dy at 0..+3 (shifted loads again, L1 hits); g of the
        shifted rows is recomputed: 4 sigmoids an element instead of 1, near what the SFUs manage in the time the
        traffic takes (hence the alternative);
    "gather": g is computed once for the tile and the shifted rows taken from it by tl.gather (warp shuffles or
        shared memory); tiles overlap by k-1 rows, whose g only feeds the shifts (their dx is the next tile's).
Weight/bias-gradient terms g * x(slot) are accumulated elementwise over `tiles` consecutive tiles per program and
summed across tokens once at the end (a cross-thread reduction per tile costs about as much as the tile's own
arithmetic), then written as one fp32 (k+1, d) partial per program and reduced by torch (deterministic). The
initial state's gradient (history tokens -(k-1)..-1, whose outputs are tokens 0..2) comes from each row's first
program as a small extra tile; the final state's gradient enters dx of the last k-1 tokens (and of the history,
for rows shorter than the window), exactly as the row walk does.

Launch shapes come from `default_launch` (no autotuning: one compile per shape class); `ConvLaunch` overrides them
(`causal_conv1d_triton(..., launch=, launch_bwd=)`), and bench/conv_norm_kernels.py --sweep times both families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import sm_count

WINDOW = 4  # register window slots: inputs t-3 .. t


TILED = False  # the family default_launch picks: False the row walk, True the 2-D tiles (one line to switch)


@dataclass(frozen=True)
class ConvLaunch:
    """Launch shape of the sequence kernels. Row walk (tiled=False): channels per program, tokens per program,
    token-loop unrolling, warps. 2-D tiles (tiled=True; chunk_l and unroll unused): block_l x block_d tiles, warps,
    tiles: the consecutive tiles a program walks (spreading its taps' loads and, backward, its weight-gradient
    reduction over more tokens), and, backward only, g_shift: how the input-gradients of tokens s+1 .. s+k-1 arrive
    ("recompute" from shifted loads, or "gather" from the tile's own; tiles then overlap by k-1 rows)."""
    block_d: int = 256
    chunk_l: int = 64
    unroll: int = 8
    num_warps: int = 2
    tiled: bool = False
    block_l: int = 64
    g_shift: str = "recompute"
    tiles: int = 1

    def __post_init__(self):
        if self.chunk_l % self.unroll or self.chunk_l < WINDOW or self.block_d & (self.block_d - 1):
            raise ValueError(f"ConvLaunch: chunk_l must be >= {WINDOW} and a multiple of unroll, block_d a power "
                             f"of 2: {self}")
        if self.tiled and (self.block_l < 2 * WINDOW or self.block_l & (self.block_l - 1) or self.tiles < 1
                           or self.g_shift not in ("recompute", "gather")):
            raise ValueError(f"ConvLaunch: tiles need block_l a power of 2 >= {2 * WINDOW}, tiles >= 1 and g_shift "
                             f"'recompute' or 'gather': {self}")


def default_launch(b: int, l: int, d: int, device: torch.device, backward: bool = False) -> ConvLaunch:
    """256 channels per program (a 512-byte bf16 row segment per token) and the longest token chunk that still gives
    every SM about eight programs (shorter chunks only add halo re-reads). Forward: one warp, 8 channels (16 bytes)
    per thread; backward keeps about twice as many fp32 vectors live (x and input-gradient windows, four
    weight-gradient accumulators), so it spreads the channels over twice the threads. TILED: `tiled_launch`."""
    if TILED:
        return tiled_launch(b, l, d, device, backward)
    block_d = 256 if d > 128 else triton.next_power_of_2(max(d, 16))
    n_d = triton.cdiv(d, block_d)
    target = 8 * sm_count(device, cpu_default=8)
    chunk = 128
    while chunk > 16 and b * n_d * triton.cdiv(l, chunk) < target:
        chunk //= 2
    num_warps = max(1, block_d // (128 if backward else 256))
    return ConvLaunch(block_d=block_d, chunk_l=chunk, unroll=8, num_warps=num_warps)


def tiled_launch(b: int, l: int, d: int, device: torch.device, backward: bool = False) -> ConvLaunch:
    """2-D tiles of 128 channels (256-byte bf16 row segments: 16 threads x 16 bytes) over eight warps. Forward:
    64 tokens, 32 elements a thread (about 90 registers for sm_90). Backward (g recomputed): 16 tokens, 8 elements a
    thread, since it keeps about ten fp32 tiles live (inputs at offsets -3..+3, dy, g, dx; about 128 registers).
    Shorter tiles where the grid would leave SMs idle. Unmeasured guesses until the GPU sweep picks."""
    block_d = 128 if d > 64 else triton.next_power_of_2(max(d, 16))
    n_d = triton.cdiv(d, block_d)
    target = 4 * sm_count(device, cpu_default=8)
    block_l = 16 if backward else 64
    while block_l > 2 * WINDOW and b * n_d * triton.cdiv(l, block_l) < target:
        block_l //= 2
    return ConvLaunch(block_d=block_d, num_warps=8, tiled=True, block_l=block_l)


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


# ------------------------------------------------------------------------------------------- 2-D tiled kernels

@triton.jit
def _x_tile(x_row, init_row, s, s_first, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
            K: tl.constexpr, HAS_INIT: tl.constexpr, X_ALIGN: tl.constexpr):
    """Inputs at tokens s (R,) = s_first + 0..R-1 as an (R, BLOCK_D) tile in x's dtype (fp32 with HAS_INIT): x for
    0 <= s < L, the initial state for -(K-1) <= s < 0, else 0. The initial state is read only by a tile that reaches
    before token 0 (a runtime branch: a masked-off gather on every tile would cost as many instructions as the x
    load itself). Callers convert to fp32 where they compute, so that the compiler may keep loaded tiles packed."""
    row_off = tl.multiple_of(s.to(tl.int64) * stride_xl, X_ALIGN)
    v = tl.load(x_row + row_off[:, None] + offs_d[None, :], mask=((s >= 0) & (s < L))[:, None] & mask_d[None, :],
                other=0.0)
    if HAS_INIT:
        v = v.to(tl.float32)
        if s_first < 0:
            j = s + (K - 1)
            h = tl.load(init_row + offs_d[None, :] * stride_id + j[:, None] * stride_ik,
                        mask=((s < 0) & (j >= 0))[:, None] & mask_d[None, :], other=0.0)
            v += h.to(tl.float32)
    return v


@triton.jit
def _dy_tile(dy_row, t, L, stride_dyl, offs_d, mask_d, DY_ALIGN: tl.constexpr):
    """Output gradients at tokens t (R,) as an fp32 (R, BLOCK_D) tile, 0 outside 0 <= t < L."""
    row_off = tl.multiple_of(t.to(tl.int64) * stride_dyl, DY_ALIGN)
    return tl.load(dy_row + row_off[:, None] + offs_d[None, :], mask=((t >= 0) & (t < L))[:, None] & mask_d[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _slot_tile(x_row, init_row, seq_row, t, t_first, st, first_doc, L, stride_xl, stride_id, stride_ik, stride_sl,
               offs_d, mask_d, SLOT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, K: tl.constexpr,
               HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, X_ALIGN: tl.constexpr):
    """Window slot SLOT of tokens t (ROWS,): the inputs at t-(3-SLOT) as a (ROWS, BLOCK_D) tile (see `_x_tile`), zero
    where that token lies in another document than t (st: t's documents) and for the slots before a k-tap kernel.
    Slots < 3 re-read rows the slot-3 load brought in (L1/L2 hits): only the 3-row halo costs HBM traffic."""
    if SLOT >= 4 - K:
        s = t - (3 - SLOT)
        v = _x_tile(x_row, init_row, s, t_first - (3 - SLOT), L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                    K, HAS_INIT, X_ALIGN)
        if HAS_SEQ and SLOT < 3:
            v = tl.where((_doc(seq_row, s, L, stride_sl, first_doc, HAS_SEQ) == st)[:, None], v, 0.0)
        return v
    else:
        return tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)


@triton.jit
def _window_tiles(x_row, init_row, seq_row, t, t_first, first_doc, L, stride_xl, stride_id, stride_ik, stride_sl,
                  offs_d, mask_d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, K: tl.constexpr,
                  HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, X_ALIGN: tl.constexpr):
    """The four window slots (inputs t-3 .. t, each masked to t's document) of tokens t (ROWS,) as (ROWS, BLOCK_D)."""
    st = _doc(seq_row, t, L, stride_sl, first_doc, HAS_SEQ)
    x0 = _slot_tile(x_row, init_row, seq_row, t, t_first, st, first_doc, L, stride_xl, stride_id, stride_ik,
                    stride_sl, offs_d, mask_d, 0, ROWS, BLOCK_D, K, HAS_INIT, HAS_SEQ, X_ALIGN)
    x1 = _slot_tile(x_row, init_row, seq_row, t, t_first, st, first_doc, L, stride_xl, stride_id, stride_ik,
                    stride_sl, offs_d, mask_d, 1, ROWS, BLOCK_D, K, HAS_INIT, HAS_SEQ, X_ALIGN)
    x2 = _slot_tile(x_row, init_row, seq_row, t, t_first, st, first_doc, L, stride_xl, stride_id, stride_ik,
                    stride_sl, offs_d, mask_d, 2, ROWS, BLOCK_D, K, HAS_INIT, HAS_SEQ, X_ALIGN)
    x3 = _slot_tile(x_row, init_row, seq_row, t, t_first, st, first_doc, L, stride_xl, stride_id, stride_ik,
                    stride_sl, offs_d, mask_d, 3, ROWS, BLOCK_D, K, HAS_INIT, HAS_SEQ, X_ALIGN)
    return x0, x1, x2, x3


@triton.jit
def _preact_tile(x0, x1, x2, x3, w0, w1, w2, w3, bias, K: tl.constexpr):
    """Pre-activation tile from the (document-masked) window slots; taps as (BLOCK_D,) vectors."""
    u = bias[None, :] + w3[None, :] * x3.to(tl.float32) + w2[None, :] * x2.to(tl.float32)
    if K >= 3:
        u += w1[None, :] * x1.to(tl.float32)
    if K >= 4:
        u += w0[None, :] * x0.to(tl.float32)
    return u


@triton.jit
def _grad_tile(x_row, init_row, seq_row, dy_row, t, t_first, first_doc, L, stride_xl, stride_id, stride_ik,
               stride_sl, stride_dyl, offs_d, mask_d, w0, w1, w2, w3, bias,
               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, K: tl.constexpr, HAS_INIT: tl.constexpr,
               HAS_SEQ: tl.constexpr, SILU: tl.constexpr, X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr):
    """Input-gradient g = dy * silu'(u) of tokens t (ROWS,) = t_first + 0..ROWS-1 as an fp32 (ROWS, BLOCK_D) tile,
    u recomputed from x; 0 outside 0 <= t < L."""
    g = _dy_tile(dy_row, t, L, stride_dyl, offs_d, mask_d, DY_ALIGN)
    if SILU:
        x0, x1, x2, x3 = _window_tiles(x_row, init_row, seq_row, t, t_first, first_doc, L, stride_xl, stride_id,
                                       stride_ik, stride_sl, offs_d, mask_d, ROWS, BLOCK_D, K, HAS_INIT, HAS_SEQ,
                                       X_ALIGN)
        u = _preact_tile(x0, x1, x2, x3, w0, w1, w2, w3, bias, K)
        sig = tl.sigmoid(u)
        g = g * sig * (1.0 + u * (1.0 - sig))
    return g


@triton.jit
def _conv_fwd_tiled_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, final_ptr,
    L, D,
    stride_xb, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik, stride_sb, stride_sl,
    stride_yb, stride_yl, stride_fb, stride_fd, stride_fk,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WRITE_FINAL: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES: tl.constexpr,
):
    """TILES consecutive (BLOCK_L tokens x BLOCK_D channels) tiles of y, each loaded whole before its one store
    (more than one tile a program only spreads the taps' loads over more tokens)."""
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
    first_doc = 0
    if HAS_SEQ:
        first_doc = tl.load(seq_row)

    for tile in range(TILES):
        t0 = (pid_l * TILES + tile) * BLOCK_L
        t = t0 + tl.arange(0, BLOCK_L)
        x0, x1, x2, x3 = _window_tiles(x_row, init_row, seq_row, t, t0, first_doc, L, stride_xl, stride_id,
                                       stride_ik, stride_sl, offs_d, mask_d, BLOCK_L, BLOCK_D, K, HAS_INIT, HAS_SEQ,
                                       X_ALIGN)
        u = _preact_tile(x0, x1, x2, x3, w0, w1, w2, w3, bias, K)
        if SILU:
            u = u * tl.sigmoid(u)
        tl.store(y_ptr + b64 * stride_yb + t.to(tl.int64)[:, None] * stride_yl + offs_d[None, :],
                 u.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None] & mask_d[None, :])

    if WRITE_FINAL:
        # the row's last program stores the last K-1 inputs (from the initial state when the row is shorter)
        last = mask_d & (pid_l == tl.num_programs(1) - 1)
        f_row = final_ptr + b64 * stride_fb + offs_d * stride_fd
        for j in tl.static_range(K - 1):
            v = _input(x_row, init_row, L - (K - 1) + j, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                       K, HAS_INIT, X_ALIGN)
            tl.store(f_row + j * stride_fk, v.to(final_ptr.dtype.element_ty), mask=last)


@triton.jit
def _masked(v, d_in, d_t, HAS_SEQ: tl.constexpr):
    """Input tile v as fp32, zero in the rows whose input token lies in another document (d_in) than the output's
    (d_t): the window-slot masking of `_preact`, for a whole tile."""
    v = v.to(tl.float32)
    if HAS_SEQ:
        v = tl.where((d_in == d_t)[:, None], v, 0.0)
    return v


@triton.jit
def _dsilu(dy, u, SILU: tl.constexpr):
    """The gradient reaching the pre-activation u from dy (fp32 tiles)."""
    if SILU:
        sig = tl.sigmoid(u)
        dy = dy * sig * (1.0 + u * (1.0 - sig))
    return dy


@triton.jit
def _shift_index(rows, M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gather index of tile row r + M (clamped: the last M rows read junk, which is never stored) as (BLOCK_L,
    BLOCK_D)."""
    return tl.broadcast_to(tl.minimum(rows + M, BLOCK_L - 1)[:, None], (BLOCK_L, BLOCK_D))


@triton.jit
def _conv_bwd_tiled_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dfinal_ptr, dx_ptr, dinit_ptr, part_ptr,
    L, D, STEP,
    stride_xb, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik, stride_sb, stride_sl,
    stride_dyb, stride_dyl, stride_gfb, stride_gfd, stride_gfk, stride_dxb, stride_dxl,
    stride_gib, stride_gid, stride_gik,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WANT_DINIT: tl.constexpr, HAS_DFINAL: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES: tl.constexpr, GATHER: tl.constexpr,
):
    """dx of tokens s0 .. s0+STEP-1 (STEP = BLOCK_L, or BLOCK_L - (K-1) with GATHER: the tile's last K-1 rows only
    feed the shifts) x BLOCK_D channels; weight/bias-gradient partials of those tokens; the initial state's gradient
    from the first tile of each row."""
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
    dfinal_row = dfinal_ptr + b64 * stride_gfb
    first_doc = 0
    if HAS_SEQ:
        first_doc = tl.load(seq_row)

    rows = tl.arange(0, BLOCK_L)
    # weight/bias-gradient terms summed elementwise over the program's tiles and across tokens once at the end:
    # a cross-thread reduction per tile would cost about as many instructions as the tile's own arithmetic
    acc0 = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    accb = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for tile in range(TILES):
        s0 = (pid_l * TILES + tile) * STEP
        s = s0 + rows
        own = (rows < STEP) & (s < L)

        # The tile's inputs at token offsets -(K-1) .. 0 in x's dtype (converted where used, so that the compiler
        # can keep them packed), and, recomputing the shifted g, offsets +1 .. +(K-1): each loaded once. Offsets a
        # k-tap kernel never reads are bound to x0 (never used, so never computed).
        d0 = _doc(seq_row, s, L, stride_sl, first_doc, HAS_SEQ)
        dp1 = _doc(seq_row, s + 1, L, stride_sl, first_doc, HAS_SEQ)
        dp2 = _doc(seq_row, s + 2, L, stride_sl, first_doc, HAS_SEQ)
        dp3 = _doc(seq_row, s + 3, L, stride_sl, first_doc, HAS_SEQ)
        g = _dy_tile(dy_row, s, L, stride_dyl, offs_d, mask_d, DY_ALIGN)
        if SILU or WANT_DW:
            x0 = _x_tile(x_row, init_row, s, s0, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, False,
                         X_ALIGN)
            xm1 = _x_tile(x_row, init_row, s - 1, s0 - 1, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K,
                          HAS_INIT, X_ALIGN)
            dm1 = _doc(seq_row, s - 1, L, stride_sl, first_doc, HAS_SEQ)
            xm2, dm2, xm3, dm3 = x0, d0, x0, d0
            if K >= 3:
                xm2 = _x_tile(x_row, init_row, s - 2, s0 - 2, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                              K, HAS_INIT, X_ALIGN)
                dm2 = _doc(seq_row, s - 2, L, stride_sl, first_doc, HAS_SEQ)
            if K >= 4:
                xm3 = _x_tile(x_row, init_row, s - 3, s0 - 3, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                              K, HAS_INIT, X_ALIGN)
                dm3 = _doc(seq_row, s - 3, L, stride_sl, first_doc, HAS_SEQ)
            # g of the tile's own tokens (window slot j reads offset j-3, as the forward does) and its
            # weight-gradient terms (only of the tokens this program owns)
            a0 = _masked(xm3, dm3, d0, HAS_SEQ)
            a1 = _masked(xm2, dm2, d0, HAS_SEQ)
            a2 = _masked(xm1, dm1, d0, HAS_SEQ)
            a3 = x0.to(tl.float32)
            g = _dsilu(g, _preact_tile(a0, a1, a2, a3, w0, w1, w2, w3, bias, K), SILU)
            if WANT_DW:
                g_own = tl.where(own[:, None], g, 0.0)
                acc0 += g_own * a0
                acc1 += g_own * a1
                acc2 += g_own * a2
                acc3 += g_own * a3
        if WANT_DB:
            accb += tl.where(own[:, None], g, 0.0)

        # dx[s] = sum_m w[slot 3-m] g[s+m] over the outputs s+m in s's document
        dx = w3[None, :] * g
        if GATHER:
            g1 = tl.gather(g, _shift_index(rows, 1, BLOCK_L, BLOCK_D), 0)
        else:
            g1 = _dy_tile(dy_row, s + 1, L, stride_dyl, offs_d, mask_d, DY_ALIGN)
            if SILU:
                xp1 = _x_tile(x_row, init_row, s + 1, s0 + 1, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                              K, False, X_ALIGN)
                u1 = _preact_tile(_masked(xm2, dm2, dp1, HAS_SEQ), _masked(xm1, dm1, dp1, HAS_SEQ),
                                  _masked(x0, d0, dp1, HAS_SEQ), xp1, w0, w1, w2, w3, bias, K)
                g1 = _dsilu(g1, u1, SILU)
        dx += w2[None, :] * _masked(g1, dp1, d0, HAS_SEQ)
        if K >= 3:
            if GATHER:
                g2 = tl.gather(g, _shift_index(rows, 2, BLOCK_L, BLOCK_D), 0)
            else:
                g2 = _dy_tile(dy_row, s + 2, L, stride_dyl, offs_d, mask_d, DY_ALIGN)
                if SILU:
                    xp2 = _x_tile(x_row, init_row, s + 2, s0 + 2, L, stride_xl, stride_id, stride_ik, offs_d,
                                  mask_d, K, False, X_ALIGN)
                    u2 = _preact_tile(_masked(xm1, dm1, dp2, HAS_SEQ), _masked(x0, d0, dp2, HAS_SEQ),
                                      _masked(xp1, dp1, dp2, HAS_SEQ), xp2, w0, w1, w2, w3, bias, K)
                    g2 = _dsilu(g2, u2, SILU)
            dx += w1[None, :] * _masked(g2, dp2, d0, HAS_SEQ)
        if K >= 4:
            if GATHER:
                g3 = tl.gather(g, _shift_index(rows, 3, BLOCK_L, BLOCK_D), 0)
            else:
                g3 = _dy_tile(dy_row, s + 3, L, stride_dyl, offs_d, mask_d, DY_ALIGN)
                if SILU:
                    xp3 = _x_tile(x_row, init_row, s + 3, s0 + 3, L, stride_xl, stride_id, stride_ik, offs_d,
                                  mask_d, K, False, X_ALIGN)
                    u3 = _preact_tile(_masked(x0, d0, dp3, HAS_SEQ), _masked(xp1, dp1, dp3, HAS_SEQ),
                                      _masked(xp2, dp2, dp3, HAS_SEQ), xp3, w0, w1, w2, w3, bias, K)
                    g3 = _dsilu(g3, u3, SILU)
            dx += w0[None, :] * _masked(g3, dp3, d0, HAS_SEQ)
        if HAS_DFINAL:
            if s0 + BLOCK_L > L - (K - 1):  # only the row's last tile holds tokens of the final state
                jf = s - (L - (K - 1))
                dx += tl.load(dfinal_row + offs_d[None, :] * stride_gfd + jf[:, None] * stride_gfk,
                              mask=((jf >= 0) & (s < L))[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        tl.store(dx_ptr + b64 * stride_dxb + s.to(tl.int64)[:, None] * stride_dxl + offs_d[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=own[:, None] & mask_d[None, :])

    part_row = part_ptr + (pid_b * tl.num_programs(1) + pid_l).to(tl.int64) * (K + 1) * D + offs_d
    if WANT_DW:
        # partials (K+1, D) per program: weight columns 0..K-1 (window slot c + 4-K), then the bias
        tl.store(part_row + (K - 1) * D, tl.sum(acc3, axis=0), mask=mask_d)
        tl.store(part_row + (K - 2) * D, tl.sum(acc2, axis=0), mask=mask_d)
        if K >= 3:
            tl.store(part_row + (K - 3) * D, tl.sum(acc1, axis=0), mask=mask_d)
        if K >= 4:
            tl.store(part_row, tl.sum(acc0, axis=0), mask=mask_d)
    if WANT_DB:
        tl.store(part_row + K * D, tl.sum(accb, axis=0), mask=mask_d)

    if WANT_DINIT:
        if pid_l == 0:
            # history tokens -4..-1 (those >= -(K-1) exist): their outputs are tokens 0..2, whose g a 4-row tile
            # recomputes at each shift (a few rows once per batch row: no reason for a second code path)
            sh = tl.arange(0, 4) - 4
            dh = tl.zeros([4, BLOCK_D], dtype=tl.float32)
            for m in tl.static_range(1, K):
                if m == 1:
                    w_m = w2
                elif m == 2:
                    w_m = w1
                else:
                    w_m = w0
                gm = _grad_tile(x_row, init_row, seq_row, dy_row, sh + m, m - 4, first_doc, L, stride_xl, stride_id,
                                stride_ik, stride_sl, stride_dyl, offs_d, mask_d, w0, w1, w2, w3, bias,
                                4, BLOCK_D, K, HAS_INIT, HAS_SEQ, SILU, X_ALIGN, DY_ALIGN)
                if HAS_SEQ:
                    gm = tl.where((_doc(seq_row, sh + m, L, stride_sl, first_doc, HAS_SEQ) == first_doc)[:, None],
                                  gm, 0.0)
                dh += w_m[None, :] * gm
            if HAS_DFINAL:  # a row shorter than the window: the final state holds history tokens too
                jf = sh - (L - (K - 1))
                dh += tl.load(dfinal_row + offs_d[None, :] * stride_gfd + jf[:, None] * stride_gfk,
                              mask=((jf >= 0) & (sh < L))[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            ji = sh + (K - 1)
            tl.store(dinit_ptr + b64 * stride_gib + offs_d[None, :] * stride_gid + ji[:, None] * stride_gik,
                     dh.to(dinit_ptr.dtype.element_ty), mask=(ji >= 0)[:, None] & mask_d[None, :])


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, idx_ptr, y_ptr,
    D,
    stride_xb, stride_sn, stride_sd, stride_sk, stride_wd, stride_wk, stride_yb,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
    if launch.tiled:
        return _forward_tiled(x, weight, bias, initial_state, seq_idx, silu, want_final, launch)
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
    if launch.tiled:
        return _backward_tiled(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu, want_dw, want_db,
                               want_dinit, launch)
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


def _forward_tiled(x, weight, bias, initial_state, seq_idx, silu, want_final, launch):
    b, l, d = x.shape
    k = weight.shape[1]
    y = torch.empty((b, l, d), dtype=x.dtype, device=x.device)
    final = torch.empty((b, d, k - 1), dtype=x.dtype, device=x.device) if want_final else None
    grid = (triton.cdiv(d, launch.block_d), triton.cdiv(triton.cdiv(l, launch.block_l), launch.tiles), b)
    _conv_fwd_tiled_kernel[grid](
        x, weight, bias if bias is not None else weight, initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x, y, final if final is not None else y,
        l, d,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *_strides3(initial_state),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        y.stride(0), y.stride(1), *_strides3(final),
        K=k, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        SILU=silu, WRITE_FINAL=want_final, X_ALIGN=_align(x), BLOCK_L=launch.block_l, BLOCK_D=launch.block_d,
        TILES=launch.tiles, num_warps=launch.num_warps,
    )
    return y, final


def _backward_tiled(x, weight, bias, initial_state, seq_idx, dy, dfinal, silu, want_dw, want_db, want_dinit, launch):
    b, l, d = x.shape
    k = weight.shape[1]
    dx = torch.empty((b, l, d), dtype=x.dtype, device=x.device)
    dinit = None
    if initial_state is not None and want_dinit:
        dinit = torch.empty((b, d, k - 1), dtype=initial_state.dtype, device=x.device)
    gather = launch.g_shift == "gather"
    step = launch.block_l - (k - 1) if gather else launch.block_l
    n_l = triton.cdiv(triton.cdiv(l, step), launch.tiles)
    # one (k+1, d) fp32 partial per program: weight columns, then the bias (one torch reduction for both)
    part = torch.empty((b * n_l, k + 1, d), dtype=torch.float32, device=x.device) if want_dw or want_db else None
    grid = (triton.cdiv(d, launch.block_d), n_l, b)
    _conv_bwd_tiled_kernel[grid](
        x, weight, bias if bias is not None else weight, initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x, dy, dfinal if dfinal is not None else dy, dx,
        dinit if dinit is not None else dx, part if part is not None else dx,
        l, d, step,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), *_strides3(initial_state),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        dy.stride(0), dy.stride(1), *_strides3(dfinal), dx.stride(0), dx.stride(1), *_strides3(dinit),
        K=k, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
        WANT_DINIT=dinit is not None, HAS_DFINAL=dfinal is not None, WANT_DW=want_dw, WANT_DB=want_db,
        X_ALIGN=_align(x), DY_ALIGN=_align(dy), BLOCK_L=launch.block_l, BLOCK_D=launch.block_d, TILES=launch.tiles,
        GATHER=gather, num_warps=launch.num_warps,
    )
    total = part.sum(0) if part is not None else None
    dw = total[:k].t().to(weight.dtype) if want_dw else None
    db = total[k].to(bias.dtype) if want_db else None
    return dx, dw, db, dinit


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, silu, want_final, launch_fwd, launch_bwd):
        x = _unit_channel_stride(x)
        y, final = _forward(x, weight, bias, initial_state, seq_idx, silu, want_final, launch_fwd)
        ctx.save_for_backward(x, weight, bias, initial_state, seq_idx)
        ctx.silu, ctx.launch_bwd = silu, launch_bwd
        ctx.set_materialize_grads(False)
        return (y, final) if want_final else y

    @staticmethod
    def backward(ctx, dy, dfinal=None):
        x, weight, bias, initial_state, seq_idx = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else _unit_channel_stride(dy)
        need = ctx.needs_input_grad
        dx, dw, db, dinit = _backward(x, weight, bias, initial_state, seq_idx, dy, dfinal, ctx.silu,
                                      want_dw=need[1], want_db=bias is not None and need[2],
                                      want_dinit=need[3], launch=ctx.launch_bwd)
        return dx, dw, db, dinit, None, None, None, None, None


def causal_conv1d_triton(x, weight, bias=None, *, activation: str | None = "silu", seq_idx=None, initial_state=None,
                         return_final_state: bool = False, launch: ConvLaunch | None = None,
                         launch_bwd: ConvLaunch | None = None):
    """Same contract as `causal_conv1d_ref`; `launch` fixes the launch shape (and so the kernel family) of both
    passes, `launch_bwd` that of the backward alone (tests, sweeps)."""
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
    launch_fwd = launch or default_launch(b, l, d, x.device)
    launch_bwd = launch_bwd or launch or default_launch(b, l, d, x.device, backward=True)
    return _CausalConv1dFn.apply(x, weight, bias, initial_state, seq_idx, activation == "silu",
                                 return_final_state, launch_fwd, launch_bwd)


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
    _conv_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight,
        state_indices if state_indices is not None else x, y,
        d,
        x.stride(0), *conv_state.stride(), weight.stride(0), weight.stride(1), y.stride(0),
        K=k, HAS_BIAS=bias is not None, HAS_IDX=state_indices is not None, SILU=activation == "silu",
        BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(k - 1), num_warps=2,
    )
    return y
