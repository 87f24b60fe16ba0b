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
evaluated once per element. The walk moves 8 tokens at a time: one (block_d, 8) tile load and one tile store
(16-byte accesses), split into token columns in registers (`_split8`/`_join8`), and the next tile is loaded before
the current one is stored. Row by row, each load sat behind the previous token's store (the compiler may not move a
load above a store that could alias it), one 256-byte load in flight per warp: a plain copy walking that way took
1.42x its bandwidth floor at 7B 4 x 32K, 8 rows at a time 1.23x (2-byte loads; `bench/conv_access_patterns.py`);
the conv forward went from 1.53x to 1.30x, and to 1.18x once its loads were 16-byte vectors too
(docs/benchmarks.md, eighth session).

Backward recomputes the pre-activation from x (reading x again is cheaper than storing it) and emits dx for tokens
t-3..t+4 when it has the input-gradients of tokens t..t+7 (dx[s] needs those of s..s+3); with packed documents,
a tile inside one document skips the document masks (`_one_doc`). Weight and bias gradients
are summed per program in fp32 registers, written as one partial per program and summed by one more small kernel
(`_conv_param_grad_kernel`, deterministic), launched with PDL (see pdl.py) so that its launch and ramp-up overlap
the backward's last programs.
Launch shapes come from `default_launch` (no autotuning: one compile per shape class); `ConvLaunch` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import sm_count
from .pdl import launch_options, pdl_release, pdl_supported, pdl_wait
from .ssd_triton import _INTERPRET, _bound, _store

WINDOW = 4  # register window slots: inputs t-3 .. t
TILE_L = tl.constexpr(8)  # tokens per load and store: the walk's tiles
# the weight/bias-gradient sum (`_conv_param_grad_kernel`): channels per program, partials per load. Measured on
# an H100 against 16 x 128, 32 x 32, 64 x 32 and 128 x 16 (docs/benchmarks.md, ninth session): 16 x 128 within 3%,
# 128 x 16 6-26% slower (fewer programs to spread the partials' reads over)
PARAM_GRAD_CHANNELS = 32
PARAM_GRAD_PARTS = 64


@dataclass(frozen=True)
class ConvLaunch:
    """Launch shape of the sequence kernels: channels per program, tokens per program, warps (defaults: the
    forward's `default_launch` at 128 channels and more); pdl: the backward's weight-gradient sum is launched with
    programmatic dependent launch where the device has it (Hopper and later; False: after the backward completes,
    as any launch, for comparisons)."""
    block_d: int = 128
    chunk_l: int = 32
    num_warps: int = 2
    pdl: bool = True

    def __post_init__(self):
        if self.chunk_l % TILE_L.value or self.chunk_l < TILE_L.value or self.block_d & (self.block_d - 1):
            raise ValueError(f"ConvLaunch: chunk_l must be a positive multiple of {TILE_L.value}, block_d a power "
                             f"of 2: {self}")


def default_launch(b: int, l: int, d: int, device: torch.device, *, backward: bool = False) -> ConvLaunch:
    """Launch shape of one pass, chosen from `bench/conv_norm_kernels.py --sweep` on an H100 (2026-11-24, tiled
    kernels, 0.5B and 7B shapes from 1 x 2K to 4 x 32K tokens; docs/benchmarks.md, eighth session).
    Both passes: 128 channels per program (fewer channels: the next power of two, at least 16).
    Forward: 128 channels x 32 tokens, two warps: within 6% of the best of up to ten shapes everywhere; 16 tokens
    where 32 would leave fewer than eight programs per SM (0.5B 1 x 2K: 10% faster; 7B 1 x 2K, which has twice the
    programs, 3% slower with 16; eleventh session, `conv_launch_ab_session11_afdbf3c.jsonl`).
    Backward: 128 channels, four warps (one 16-byte vector per thread: its tiles hold x, dy, the gradients and dx),
    128-token chunks when that still leaves about six programs per SM, else 64 while four, else 32: the best or
    within 2% of it at every point swept (up to fifteen shapes); longer chunks halve the 3-token re-reads at each
    chunk's end and the weight-gradient partials, shorter ones keep small inputs' SMs busy. Swept again once the
    loads were 16-byte vectors: the defaults stay within 11% of the best shape there (7B 1 x 8K: 128 x 32 on two
    warps 9% faster without weight gradients, 24% slower with them), and no other rule won everywhere."""
    block_d = 128 if d > 64 else triton.next_power_of_2(max(d, 16))
    sms = sm_count(device, cpu_default=8)
    programs = b * triton.cdiv(d, block_d)
    if not backward:
        return ConvLaunch(block_d=block_d, chunk_l=32 if programs * triton.cdiv(l, 32) >= 8 * sms else 16,
                          num_warps=2)
    chunk = 128
    while chunk > 32 and programs * triton.cdiv(l, chunk) < (6 if chunk == 128 else 4) * sms:
        chunk //= 2
    return ConvLaunch(block_d=block_d, chunk_l=chunk, num_warps=4)


# ----------------------------------------------------------------------------------------------------------- kernels

@triton.jit
def _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, SLOT: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Weight of window slot SLOT (input offset SLOT-3) as fp32: column SLOT-(4-K), zero before the kernel starts."""
    if SLOT >= 4 - K:
        return tl.load(w_ptr + offs_d * stride_wd + (SLOT - (4 - K)) * stride_wk, mask=mask_d, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BLOCK_D], dtype=tl.float32)


@triton.jit
def _taps_and_bias(w_ptr, bias_ptr, stride_wd, stride_wk, offs_d, mask_d, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """The window's four weight slots and the bias (zeros without one) of channels offs_d, each (BLOCK_D,) fp32."""
    w0 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 0, K, BLOCK_D)
    w1 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 1, K, BLOCK_D)
    w2 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 2, K, BLOCK_D)
    w3 = _tap(w_ptr, stride_wd, stride_wk, offs_d, mask_d, 3, K, BLOCK_D)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    return w0, w1, w2, w3, bias


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
def _split222(t):
    """t (..., 2, 2, 2) holding 8 items, item j at [..., j // 4, (j // 2) % 2, j % 2] -> the 8 items (...) in order."""
    e, o = tl.split(t)                                        # j0 = 0 / 1, then j1, then j2
    e0, e1 = tl.split(e)
    o0, o1 = tl.split(o)
    c0, c4 = tl.split(e0)
    c2, c6 = tl.split(e1)
    c1, c5 = tl.split(o0)
    c3, c7 = tl.split(o1)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _split8(tile, BLOCK_D: tl.constexpr):
    """tile (BLOCK_D, 8), token j in column j -> its eight columns (BLOCK_D,) each, in token order."""
    return _split222(tl.reshape(tile, [BLOCK_D, 2, 2, 2]))


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK_D: tl.constexpr):
    """Inverse of _split8: eight (BLOCK_D,) columns -> (BLOCK_D, 8)."""
    t0 = tl.join(tl.join(c0, c4), tl.join(c2, c6))           # (BLOCK_D, j2, j1) of j0 = 0
    t1 = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.reshape(tl.join(t0, t1), [BLOCK_D, 8])


@triton.jit
def _rows8(ptr_row, t, end, stride_l, offs_d, mask_d, ALIGN: tl.constexpr):
    """Tokens t .. t+7 of one row as a (BLOCK_D, 8) tile in storage dtype; tokens outside [0, end) read as 0."""
    tt = t + tl.arange(0, TILE_L)
    off = tl.multiple_of(tt.to(tl.int64) * stride_l, ALIGN)
    return tl.load(ptr_row + off[None, :] + offs_d[:, None],
                   mask=mask_d[:, None] & (tt[None, :] >= 0) & (tt[None, :] < end), other=0.0)


@triton.jit
def _docs8(seq_row, t, L, stride_sl, first_doc, HAS_SEQ: tl.constexpr):
    """Document ids of tokens t .. t+7 as eight scalars (past the row's end: don't care)."""
    if HAS_SEQ:
        tt = t + tl.arange(0, TILE_L)
        ids = tl.load(seq_row + tt * stride_sl, mask=(tt >= 0) & (tt < L), other=first_doc)
        return _split222(tl.reshape(ids, [2, 2, 2]))
    else:
        return first_doc, first_doc, first_doc, first_doc, first_doc, first_doc, first_doc, first_doc


@triton.jit
def _out(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, w0, w1, w2, w3, bias, HAS_SEQ: tl.constexpr, SILU: tl.constexpr):
    """Output at one token from its window: the pre-activation, through SiLU when asked."""
    u = _preact(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, w0, w1, w2, w3, bias, HAS_SEQ)
    if SILU:
        u = u * tl.sigmoid(u)
    return u


@triton.jit
def _one_doc(sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6, s7):
    """Whether a tile's tokens and the three before them lie in one document (scalar): then no window slot needs
    masking, and the backward takes the unmasked arithmetic (packed documents are hundreds of tokens long)."""
    return ((sm3 == sm2) & (sm2 == sm1) & (sm1 == s0) & (s0 == s1) & (s1 == s2) & (s2 == s3) & (s3 == s4)
            & (s4 == s5) & (s5 == s6) & (s6 == s7))


@triton.jit
def _fwd_tile_math(xm3, xm2, xm1, x0, x1, x2, x3, x4, x5, x6, x7, sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6, s7,
                   w0, w1, w2, w3, bias, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr):
    """Outputs of tokens t..t+7 as a (BLOCK_D, 8) fp32 tile, from inputs t-3..t+7 and their documents."""
    y0 = _out(xm3, xm2, xm1, x0, sm3, sm2, sm1, s0, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y1 = _out(xm2, xm1, x0, x1, sm2, sm1, s0, s1, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y2 = _out(xm1, x0, x1, x2, sm1, s0, s1, s2, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y3 = _out(x0, x1, x2, x3, s0, s1, s2, s3, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y4 = _out(x1, x2, x3, x4, s1, s2, s3, s4, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y5 = _out(x2, x3, x4, x5, s2, s3, s4, s5, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y6 = _out(x3, x4, x5, x6, s3, s4, s5, s6, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    y7 = _out(x4, x5, x6, x7, s4, s5, s6, s7, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    return _join8(y0, y1, y2, y3, y4, y5, y6, y7, BLOCK_D)


@triton.jit(do_not_specialize=["L"])  # L = 1 would become a constant, and the final-state loop's tokens plain ints
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, y_ptr, final_ptr,
    L, D,
    stride_xb, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik, stride_sb, stride_sl,
    stride_yb, stride_yl, stride_fb, stride_fd, stride_fk,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WRITE_FINAL: tl.constexpr, X_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_L: tl.constexpr,
):
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w0, w1, w2, w3, bias = _taps_and_bias(w_ptr, bias_ptr, stride_wd, stride_wk, offs_d, mask_d, K, HAS_BIAS,
                                          BLOCK_D)

    b64 = pid_b.to(tl.int64)
    x_row = x_ptr + tl.multiple_of(b64 * stride_xb, X_ALIGN)
    y_row = y_ptr + b64 * stride_yb
    init_row = init_ptr + b64 * stride_ib
    seq_row = seq_ptr + b64 * stride_sb
    first_doc = 0
    if HAS_SEQ:
        first_doc = tl.load(seq_row)

    t0 = pid_l * CHUNK_L
    end = tl.minimum(L, t0 + CHUNK_L)
    xm3 = _input(x_row, init_row, t0 - 3, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm2 = _input(x_row, init_row, t0 - 2, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm1 = _input(x_row, init_row, t0 - 1, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    sm3 = _doc(seq_row, t0 - 3, L, stride_sl, first_doc, HAS_SEQ)
    sm2 = _doc(seq_row, t0 - 2, L, stride_sl, first_doc, HAS_SEQ)
    sm1 = _doc(seq_row, t0 - 1, L, stride_sl, first_doc, HAS_SEQ)

    x_next = _rows8(x_row, t0, end, stride_xl, offs_d, mask_d, X_ALIGN)
    for i in range(0, CHUNK_L, TILE_L):
        t = t0 + i
        x_cur = x_next
        # the next tile's loads are issued before this tile's stores (which the compiler may not reorder)
        x_next = _rows8(x_row, t + TILE_L, end, stride_xl, offs_d, mask_d, X_ALIGN)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x_cur.to(tl.float32), BLOCK_D)
        s0, s1, s2, s3, s4, s5, s6, s7 = _docs8(seq_row, t, L, stride_sl, first_doc, HAS_SEQ)
        # (the backward's one-document branch, tried here, made the forward 3-6% slower with packed documents)
        y = _fwd_tile_math(xm3, xm2, xm1, x0, x1, x2, x3, x4, x5, x6, x7, sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6,
                           s7, w0, w1, w2, w3, bias, HAS_SEQ, SILU, BLOCK_D)
        tt = t + tl.arange(0, TILE_L)
        tl.store(y_row + tt.to(tl.int64)[None, :] * stride_yl + offs_d[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=mask_d[:, None] & (tt[None, :] < L))
        xm3, xm2, xm1 = x5, x6, x7
        sm3, sm2, sm1 = s5, s6, s7

    if WRITE_FINAL:
        # the row's last program stores the last K-1 inputs (from the initial state when the row is shorter)
        last = mask_d & (pid_l == tl.num_programs(1) - 1)
        f_row = final_ptr + b64 * stride_fb + offs_d * stride_fd
        for j in tl.static_range(K - 1):
            v = _input(x_row, init_row, L - (K - 1) + j, L, stride_xl, stride_id, stride_ik, offs_d, mask_d,
                       K, HAS_INIT, X_ALIGN)
            tl.store(f_row + j * stride_fk, v.to(final_ptr.dtype.element_ty), mask=last)


@triton.jit
def _input_grad(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, dy, w0, w1, w2, w3, bias, HAS_SEQ: tl.constexpr,
                SILU: tl.constexpr):
    """Gradient at the pre-activation of one token: dy through SiLU's derivative (pre-activation recomputed)."""
    if SILU:
        u = _preact(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, w0, w1, w2, w3, bias, HAS_SEQ)
        sig = tl.sigmoid(u)
        dy = dy * sig * (1.0 + u * (1.0 - sig))
    return dy


@triton.jit
def _dx(g0, g1, g2, g3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ: tl.constexpr):
    """dx of token s from the pre-activation gradients of tokens s..s+3 (through slots 3..0), those of its own
    document: `_preact` mirrored (token s+3-j in slot j, the masks against s's document), written out because
    calling `_preact` with a zero bias keeps 16 more additions per tile in the sm_90 code."""
    d = w3 * g0
    if HAS_SEQ:
        d += tl.where(s0 == s1, w2 * g1, 0.0)
        d += tl.where(s0 == s2, w1 * g2, 0.0)
        d += tl.where(s0 == s3, w0 * g3, 0.0)
    else:
        d += w2 * g1 + w1 * g2 + w0 * g3
    return d


@triton.jit
def _dw_terms(xm3, xm2, xm1, xt, sm3, sm2, sm1, st, g, dw0, dw1, dw2, dw3, db, HAS_SEQ: tl.constexpr):
    """One token's weight and bias gradient terms added to the program's sums."""
    if HAS_SEQ:
        dw0 += tl.where(sm3 == st, g * xm3, 0.0)
        dw1 += tl.where(sm2 == st, g * xm2, 0.0)
        dw2 += tl.where(sm1 == st, g * xm1, 0.0)
    else:
        dw0 += g * xm3
        dw1 += g * xm2
        dw2 += g * xm1
    return dw0, dw1, dw2, dw3 + g * xt, db + g


@triton.jit
def _bwd_tile_math(xm3, xm2, xm1, x0, x1, x2, x3, x4, x5, x6, x7, sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6, s7,
                   gm3, gm2, gm1, d0, d1, d2, d3, d4, d5, d6, d7, w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
                   HAS_SEQ: tl.constexpr, SILU: tl.constexpr, OWN: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pre-activation gradients g of tokens t..t+7 (from dy d0..d7), dx of tokens t-3..t+4 as a (BLOCK_D, 8) fp32
    tile (each needs the gradients of s..s+3, with gm3..gm1 those of t-3..t-1), and, OWN, the weight terms."""
    g0 = _input_grad(xm3, xm2, xm1, x0, sm3, sm2, sm1, s0, d0, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g1 = _input_grad(xm2, xm1, x0, x1, sm2, sm1, s0, s1, d1, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g2 = _input_grad(xm1, x0, x1, x2, sm1, s0, s1, s2, d2, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g3 = _input_grad(x0, x1, x2, x3, s0, s1, s2, s3, d3, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g4 = _input_grad(x1, x2, x3, x4, s1, s2, s3, s4, d4, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g5 = _input_grad(x2, x3, x4, x5, s2, s3, s4, s5, d5, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g6 = _input_grad(x3, x4, x5, x6, s3, s4, s5, s6, d6, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    g7 = _input_grad(x4, x5, x6, x7, s4, s5, s6, s7, d7, w0, w1, w2, w3, bias, HAS_SEQ, SILU)
    if OWN:
        dw0, dw1, dw2, dw3, db = _dw_terms(xm3, xm2, xm1, x0, sm3, sm2, sm1, s0, g0, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(xm2, xm1, x0, x1, sm2, sm1, s0, s1, g1, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(xm1, x0, x1, x2, sm1, s0, s1, s2, g2, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(x0, x1, x2, x3, s0, s1, s2, s3, g3, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(x1, x2, x3, x4, s1, s2, s3, s4, g4, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(x2, x3, x4, x5, s2, s3, s4, s5, g5, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(x3, x4, x5, x6, s3, s4, s5, s6, g6, dw0, dw1, dw2, dw3, db, HAS_SEQ)
        dw0, dw1, dw2, dw3, db = _dw_terms(x4, x5, x6, x7, s4, s5, s6, s7, g7, dw0, dw1, dw2, dw3, db, HAS_SEQ)
    dx = _join8(_dx(gm3, gm2, gm1, g0, sm3, sm2, sm1, s0, w0, w1, w2, w3, HAS_SEQ),
                _dx(gm2, gm1, g0, g1, sm2, sm1, s0, s1, w0, w1, w2, w3, HAS_SEQ),
                _dx(gm1, g0, g1, g2, sm1, s0, s1, s2, w0, w1, w2, w3, HAS_SEQ),
                _dx(g0, g1, g2, g3, s0, s1, s2, s3, w0, w1, w2, w3, HAS_SEQ),
                _dx(g1, g2, g3, g4, s1, s2, s3, s4, w0, w1, w2, w3, HAS_SEQ),
                _dx(g2, g3, g4, g5, s2, s3, s4, s5, w0, w1, w2, w3, HAS_SEQ),
                _dx(g3, g4, g5, g6, s3, s4, s5, s6, w0, w1, w2, w3, HAS_SEQ),
                _dx(g4, g5, g6, g7, s4, s5, s6, s7, w0, w1, w2, w3, HAS_SEQ), BLOCK_D)
    return dx, g5, g6, g7, dw0, dw1, dw2, dw3, db


@triton.jit
def _conv_bwd_tile(
    t, t0, L, x_cur, dy_cur, seq_row, first_doc, dx_row, dinit_row, dfinal_row,
    stride_sl, stride_dxl, stride_gid, stride_gik, stride_gfd, stride_gfk, offs_d, mask_d, w0, w1, w2, w3, bias,
    xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db,
    K: tl.constexpr, CHUNK_L: tl.constexpr, WANT_DINIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr, BLOCK_D: tl.constexpr, OWN: tl.constexpr,
):
    """Tokens t..t+7 of the backward walk: their pre-activation gradients, dx of tokens t-3..t+4 (stored where they
    are this program's), and (OWN: t..t+7 are this program's tokens) their weight/bias-gradient terms."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x_cur.to(tl.float32), BLOCK_D)
    d0, d1, d2, d3, d4, d5, d6, d7 = _split8(dy_cur.to(tl.float32), BLOCK_D)
    s0, s1, s2, s3, s4, s5, s6, s7 = _docs8(seq_row, t, L, stride_sl, first_doc, HAS_SEQ)
    one_doc = True
    if HAS_SEQ:
        one_doc = _one_doc(sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6, s7)
    if one_doc:             # always, without documents (a compile-time branch then)
        dx, g5, g6, g7, dw0, dw1, dw2, dw3, db = _bwd_tile_math(
            xm3, xm2, xm1, x0, x1, x2, x3, x4, x5, x6, x7, sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6, s7,
            gm3, gm2, gm1, d0, d1, d2, d3, d4, d5, d6, d7, w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
            False, SILU, OWN, BLOCK_D)
    else:
        dx, g5, g6, g7, dw0, dw1, dw2, dw3, db = _bwd_tile_math(
            xm3, xm2, xm1, x0, x1, x2, x3, x4, x5, x6, x7, sm3, sm2, sm1, s0, s1, s2, s3, s4, s5, s6, s7,
            gm3, gm2, gm1, d0, d1, d2, d3, d4, d5, d6, d7, w0, w1, w2, w3, bias, dw0, dw1, dw2, dw3, db,
            True, SILU, OWN, BLOCK_D)

    ss = t - 3 + tl.arange(0, TILE_L)
    if HAS_DFINAL:
        jf = ss - (L - (K - 1))
        dx += tl.load(dfinal_row + offs_d[:, None] * stride_gfd + jf[None, :] * stride_gfk,
                      mask=mask_d[:, None] & (jf[None, :] >= 0) & (ss[None, :] < L), other=0.0).to(tl.float32)
    tl.store(dx_row + ss.to(tl.int64)[None, :] * stride_dxl + offs_d[:, None], dx.to(dx_row.dtype.element_ty),
             mask=mask_d[:, None] & (ss[None, :] >= t0) & (ss[None, :] < t0 + CHUNK_L) & (ss[None, :] >= 0)
             & (ss[None, :] < L))
    if WANT_DINIT:
        ji = ss + (K - 1)
        tl.store(dinit_row + offs_d[:, None] * stride_gid + ji[None, :] * stride_gik,
                 dx.to(dinit_row.dtype.element_ty), mask=mask_d[:, None] & (ss[None, :] < 0) & (ji[None, :] >= 0))
    return x5, x6, x7, s5, s6, s7, g5, g6, g7, dw0, dw1, dw2, dw3, db


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dy_ptr, dfinal_ptr, dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr,
    L, D,
    stride_xb, stride_xl, stride_wd, stride_wk, stride_ib, stride_id, stride_ik, stride_sb, stride_sl,
    stride_dyb, stride_dyl, stride_gfb, stride_gfd, stride_gfk, stride_dxb, stride_dxl,
    stride_gib, stride_gid, stride_gik,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WANT_DINIT: tl.constexpr, HAS_DFINAL: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    X_ALIGN: tl.constexpr, DY_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_L: tl.constexpr,
    SUMS_PDL: tl.constexpr,
):
    # SUMS_PDL: the weight-gradient sum that follows may launch now and wait on the SMs this kernel frees
    pdl_release(SUMS_PDL)
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w0, w1, w2, w3, bias = _taps_and_bias(w_ptr, bias_ptr, stride_wd, stride_wk, offs_d, mask_d, K, HAS_BIAS,
                                          BLOCK_D)

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
    # the walk reads three tokens past the chunk (the next program's) to complete dx of the chunk's last three
    end = tl.minimum(L, t0 + CHUNK_L + 3)
    xm3 = _input(x_row, init_row, t0 - 3, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm2 = _input(x_row, init_row, t0 - 2, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    xm1 = _input(x_row, init_row, t0 - 1, L, stride_xl, stride_id, stride_ik, offs_d, mask_d, K, HAS_INIT, X_ALIGN)
    sm3 = _doc(seq_row, t0 - 3, L, stride_sl, first_doc, HAS_SEQ)
    sm2 = _doc(seq_row, t0 - 2, L, stride_sl, first_doc, HAS_SEQ)
    sm1 = _doc(seq_row, t0 - 1, L, stride_sl, first_doc, HAS_SEQ)
    # pre-activation gradients of tokens t0-3..t0-1: only dx of tokens >= t0 (or the initial state) is emitted,
    # which never reads them, except before the row's start where they are truly zero
    gm3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    gm2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    gm1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)

    x_next = _rows8(x_row, t0, end, stride_xl, offs_d, mask_d, X_ALIGN)
    dy_next = _rows8(dy_row, t0, end, stride_dyl, offs_d, mask_d, DY_ALIGN)
    for i in range(0, CHUNK_L, TILE_L):
        t = t0 + i
        x_cur, dy_cur = x_next, dy_next
        # the next tile's loads are issued before this tile's stores (which the compiler may not reorder)
        x_next = _rows8(x_row, t + TILE_L, end, stride_xl, offs_d, mask_d, X_ALIGN)
        dy_next = _rows8(dy_row, t + TILE_L, end, stride_dyl, offs_d, mask_d, DY_ALIGN)
        xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db = _conv_bwd_tile(
            t, t0, L, x_cur, dy_cur, seq_row, first_doc, dx_row, dinit_row, dfinal_row,
            stride_sl, stride_dxl, stride_gid, stride_gik, stride_gfd, stride_gfk, offs_d, mask_d, w0, w1, w2, w3,
            bias, xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db,
            K, CHUNK_L, WANT_DINIT, HAS_SEQ, SILU, HAS_DFINAL, BLOCK_D, True)
    # the tile past the chunk (three live tokens) completes dx of the chunk's last three tokens
    xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db = _conv_bwd_tile(
        t0 + CHUNK_L, t0, L, x_next, dy_next, seq_row, first_doc, dx_row, dinit_row, dfinal_row,
        stride_sl, stride_dxl, stride_gid, stride_gik, stride_gfd, stride_gfk, offs_d, mask_d, w0, w1, w2, w3,
        bias, xm3, xm2, xm1, sm3, sm2, sm1, gm3, gm2, gm1, dw0, dw1, dw2, dw3, db,
        K, CHUNK_L, WANT_DINIT, HAS_SEQ, SILU, HAS_DFINAL, BLOCK_D, False)

    part = (pid_b * tl.num_programs(1) + pid_l).to(tl.int64)
    if WANT_DW:
        # partial weight gradient of this program, stored (4, D) per program: slot-major, channels contiguous
        dw_row = dw_part_ptr + part * 4 * D + offs_d
        tl.store(dw_row, dw0, mask=mask_d)
        tl.store(dw_row + D, dw1, mask=mask_d)
        tl.store(dw_row + 2 * D, dw2, mask=mask_d)
        tl.store(dw_row + 3 * D, dw3, mask=mask_d)
    if WANT_DB:
        tl.store(db_part_ptr + part * D + offs_d, db, mask=mask_d)


@triton.jit
def _conv_param_grad_kernel(
    dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, n_parts, D, stride_dwd, stride_dwk,
    K: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr,
    INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """dw (D, K) and db (D,), in their own dtypes, from the backward's fp32 partials, one per program of it:
    dw partials (n_parts, 4, D) (window slot-major, channels contiguous), db partials (n_parts, D).
    Program (c, r) sums row r of every partial for channels c * BLOCK_C .. + BLOCK_C, PARTS partials per load, in a
    fixed order (deterministic); rows 0..3 are the window slots of dw (slot s is weight column s - (4 - K)),
    row 4 is db. One launch where torch took four (dw's sum and cast to the weight's dtype, db's sum and cast).
    The two loops stay written out: one helper taking a row pointer and a part stride made the whole conv 0.5-1.5%
    slower on an H100 (same bits; `conv_param_grads_refactor_session9_ff8e226.jsonl`).
    PDL: launched while the backward runs; its programs wait here until the backward's partials are all written."""
    pdl_wait(PDL)
    pid_c, row = tl.program_id(0), tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < D
    offs_p = tl.arange(0, PARTS)
    if row < 4:
        if WANT_DW and row >= 4 - K:
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for p0 in range(0, _bound(n_parts, INTERP), PARTS):
                p = (p0 + offs_p).to(tl.int64)
                acc += tl.sum(tl.load(dw_part_ptr + (p[:, None] * 4 + row) * D + offs_c[None, :],
                                      mask=(p[:, None] < n_parts) & mask_c[None, :], other=0.0), axis=0)
            _store(dw_ptr + offs_c * stride_dwd + (row - (4 - K)) * stride_dwk, acc, mask_c, INTERP)
    elif WANT_DB:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, _bound(n_parts, INTERP), PARTS):
            p = (p0 + offs_p).to(tl.int64)
            acc += tl.sum(tl.load(db_part_ptr + p[:, None] * D + offs_c[None, :],
                                  mask=(p[:, None] < n_parts) & mask_c[None, :], other=0.0), axis=0)
        _store(db_ptr + offs_c, acc, mask_c, INTERP)


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
    """Largest power of two (<= 16) dividing t's batch and token strides (those of dims longer than 1): the kernels
    add multiples of them to a row pointer and say so (`tl.multiple_of`), which lets channel-contiguous loads be
    16-byte vectors. The channel dim (stride 1) is not a row stride: counting it made this 1 whatever the layout."""
    align = 16
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
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
        num_warps=launch.num_warps,
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
    # the sum kernel's launch and ramp-up overlap the backward's last programs: 0.5 us off the backward's ~12 us
    # at 0.5B 1 x 2K tokens, neutral at larger sizes (docs/benchmarks.md, eleventh session)
    pdl = launch.pdl and (want_dw or want_db) and pdl_supported(x.device)
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
        BLOCK_D=launch.block_d, CHUNK_L=launch.chunk_l, SUMS_PDL=pdl, num_warps=launch.num_warps,
    )
    dw, db = _param_grads(dw_part, db_part, weight, bias, d, k, pdl) if want_dw or want_db else (None, None)
    return dx, dw, db, dinit.contiguous() if dinit is not None else None


def _param_grads(dw_part, db_part, weight, bias, d, k, pdl):
    """dw (d, k) in the weight's dtype and db (d,) in the bias's, from the backward's fp32 partials dw_part
    (n_parts, 4, d) and db_part (n_parts, d); one of them may be None (that gradient is not wanted), not both.
    pdl: launched with programmatic dependent launch (the backward kernel released it)."""
    dw = torch.empty((d, k), dtype=weight.dtype, device=weight.device) if dw_part is not None else None
    db = torch.empty((d,), dtype=bias.dtype, device=weight.device) if db_part is not None else None
    some = dw_part if dw_part is not None else db_part        # stands in for the pointers not used
    n_parts = some.shape[0]
    grid = (triton.cdiv(d, PARAM_GRAD_CHANNELS), WINDOW + 1)
    _conv_param_grad_kernel[grid](
        dw_part if dw_part is not None else some, db_part if db_part is not None else some,
        dw if dw is not None else some, db if db is not None else some, n_parts, d,
        *(dw.stride() if dw is not None else (0, 0)),
        K=k, WANT_DW=dw is not None, WANT_DB=db is not None, BLOCK_C=PARAM_GRAD_CHANNELS,
        PARTS=PARAM_GRAD_PARTS, INTERP=_INTERPRET, PDL=pdl, num_warps=4, **launch_options(pdl),
    )
    return dw, db


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, seq_idx, silu, want_final, launch):
        x = _unit_channel_stride(x)
        y, final = _forward(x, weight, bias, initial_state, seq_idx, silu, want_final,
                            launch or default_launch(*x.shape, x.device))
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
                                      want_dinit=need[3],
                                      launch=ctx.launch or default_launch(*x.shape, x.device, backward=True))
        return dx, dw, db, dinit, None, None, None, None


def causal_conv1d_triton(x, weight, bias=None, *, activation: str | None = "silu", seq_idx=None, initial_state=None,
                         return_final_state: bool = False, launch: ConvLaunch | None = None):
    """Same contract as `causal_conv1d_ref`; `launch` fixes the launch shape of both passes (tests, sweeps), else
    each pass takes its own `default_launch`."""
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
                                 return_final_state, launch)


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
