"""Triton kernels for the backward pass of the chunked SSD scan (the forward and the notation are in ssd_triton.py).

Given dy (b, l, h, p) and optionally d(final state), per chunk c, head h, with dS_out(c) the gradient reaching the
state that leaves chunk c, L[i, j] = exp(a_i - a_j) (j <= i, same document), dCB_h[i, j] = (dy_i . x_j) L[i, j] dt_j:
    dS_in(c)  = keep_c exp(a_Q) dS_out(c) + sum_i exp(a_i) dy_i C_i^T          (so dS_out(c - 1) = dS_in(c))
    dx_j      = dt_j [ sum_i CB[i, j] L[i, j] dy_i + exp(a_Q - a_j) dS_out B_j ] + D dy_j
    dC_i      = sum_h [ exp(a_i) dy_i S_in + sum_j dCB_h[i, j] B_j ]   (the sum over the group's heads happens first:
    dB_j      = sum_h [ exp(a_Q - a_j) dt_j dS_out^T x_j + sum_i dCB_h[i, j] C_i ]   one Q x Q @ Q x n per group)
    d a_t     : row sums minus column sums of dCB_h * CB, the entering-state, the chunk-state and the chunk-decay terms;
    d dt      = direct term + A * reverse-cumsum(d a), then through clamp and softplus to dt_raw and dt_bias.

Kernels (after recomputing _prep_kernel's CB, dt and cumsum; all products are fp32 or split as in the forward):
  _bwd_state_kernel  per (b, h, p-block, n-block), chunks in reverse: writes dS_out(c) for every chunk (fp32) and
                     d(initial state).
  _bwd_dcb_kernel    per (b, c, g, tile (I, J) of the chunk, I >= J): dCB = sum_h dCB_h over the group's heads (fp32,
                     (b, nc, g, Q, Q)), and per head the row / column sums of dCB_h * CB (the in-chunk terms of d a).
  _bwd_dc_kernel     per (b, c, g, row block, n-block, head split): dC = sum_h exp(a_i) dy_i S_in + dCB @ B and the
                     entering-state term of d a.
  _bwd_db_kernel     same grid, rows as the columns j: dB = sum_h exp(a_Q - a_j) dt_j x_j dS_out + dCB^T @ C and the
                     leaving-state terms of d a (the chunk-end ones to `daq`).
  _bwd_dx_kernel     per (b, c, h, row block): dx, the direct d dt and partial sums of d D.
  _bwd_dt_kernel     per (b, h, c): sums the d a slots, reverse cumsum, chain rule to dt_raw, partial sums for A_log
                     and dt_bias.
The head sums of dB and dC happen on chip: dCB is summed over heads before its (Q x Q) @ (Q x n) products, which run
once per group; the state terms loop over heads with a (rows x n-block) fp32 accumulator. The tiles are large
(64-128 rows) so the products run on tensor cores at full width. When batch x chunks x groups is too small to fill
the GPU, heads are split and the splits' fp32 partials of dB and dC summed afterwards. The d a terms are written to
separate slots (b, h, nc, slot, Q), one writer per element, and summed in _bwd_dt_kernel: no atomics, so the
backward is deterministic.

Autotuning (same rules as the forward): _bwd_state_kernel 6 configs, _bwd_dcb_kernel 3, _bwd_dc_kernel and
_bwd_db_kernel 3 each, _bwd_dx_kernel 4; _bwd_dt_kernel is not tuned. The dCB tile (64) and the n-block of the dB/dC
kernels (64) are fixed per problem because they set the number of d a slots (`side_blocks`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import sm_count
from .ssd_triton import (_INTERPRET, _STATE_CONFIGS, _bound, _configs, _discretize_grad, _fit, _mm, _mm_hl, _mm_lh,
                         _Problem, _prune_state, _store)

_NQ_MIN_BLOCK = 16   # the smallest row block: per-chunk partials are sized Q // 16


@triton.autotune(configs=_STATE_CONFIGS, key=["p", "n", "Q", "SIZE"],
                 prune_configs_by={"early_config_prune": _prune_state})
@triton.jit
def _bwd_state_kernel(dy_ptr, C_ptr, acs_ptr, seq_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
                      l, nc, H, hpg, p, n,
                      s_yb, s_yl, s_yh, s_yp, s_Cb, s_Cl, s_Cg, s_Cn, s_qb, s_ql, s_fb, s_fh, s_fp, s_fn,
                      Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr,
                      HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                      SIZE: tl.constexpr):
    """Grid (b * H, cdiv(p, BP), cdiv(n, BN)). Walks the chunks backwards carrying dS (fp32): stores it as dS_out(c),
    then dS <- keep * exp(a_Q) dS + (dy * exp(a))^T C, BQ rows at a time. The last dS is d(initial state)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    hd = pid_bh % H
    gi = hd // hpg
    rp = tl.program_id(1) * BP + tl.arange(0, BP)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    mpn = (rp[:, None] < p) & (rn[None, :] < n)
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + b.to(tl.int64) * s_fb + hd * s_fh + rp[:, None] * s_fp + rn[None, :] * s_fn,
                     mask=mpn, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BP, BN), tl.float32)
    sq_base = seq_ptr + b.to(tl.int64) * s_qb
    yp = dy_ptr + b.to(tl.int64) * s_yb + hd * s_yh + rp[None, :] * s_yp
    Cp = C_ptr + b.to(tl.int64) * s_Cb + gi * s_Cg + rn[None, :] * s_Cn
    for cc in range(_bound(nc, INTERP)):
        c = nc - 1 - cc
        _store(dstates_ptr + ((((b * nc + c) * H + hd).to(tl.int64) * p + rp[:, None]) * n + rn[None, :]), dS, mpn,
               INTERP)
        off = (pid_bh.to(tl.int64) * nc + c) * Q
        decay = tl.exp(tl.load(acs_ptr + off + Q - 1))
        if HAS_SEQ:
            s_enter = tl.load(sq_base + tl.maximum(c * Q - 1, 0).to(tl.int64) * s_ql)
            s_last = tl.load(sq_base + tl.minimum(c * Q + Q - 1, l - 1).to(tl.int64) * s_ql)
            decay = tl.where(s_last == s_enter, decay, 0.0)
        dS = dS * decay
        for k0 in tl.static_range(0, Q, BQ):
            rq = k0 + tl.arange(0, BQ)
            t = c * Q + rq
            valid = t < l
            fs = tl.exp(tl.load(acs_ptr + off + rq))
            if HAS_SEQ:
                fs = tl.where(tl.load(sq_base + tl.minimum(t, l - 1).to(tl.int64) * s_ql) == s_enter, fs, 0.0)
            dyt = tl.load(yp + t[:, None].to(tl.int64) * s_yl, mask=valid[:, None] & (rp[None, :] < p), other=0.0)
            ct = tl.load(Cp + t[:, None].to(tl.int64) * s_Cl, mask=valid[:, None] & (rn[None, :] < n), other=0.0)
            dS += _mm_hl(tl.trans(dyt.to(tl.float32) * fs[:, None]), ct, DT, INTERP)
    tl.store(dinit_ptr + (pid_bh.to(tl.int64) * p + rp[:, None]) * n + rn[None, :], dS, mask=mpn)


_DCB_CONFIGS = _configs(triton.Config({}, num_warps=4),
                        [triton.Config({}, num_warps=4, num_stages=3), triton.Config({}, num_warps=8, num_stages=3),
                         triton.Config({}, num_warps=4, num_stages=2)])


@triton.autotune(configs=_DCB_CONFIGS, key=["p", "Q", "BT", "SIZE"])
@triton.jit
def _bwd_dcb_kernel(x_ptr, dy_ptr, cb_ptr, dtc_ptr, acs_ptr, seq_ptr, dcb_ptr, dap_ptr,
                    l, nc, H, hpg, G, p,
                    s_xb, s_xl, s_xh, s_xp, s_yb, s_yl, s_yh, s_yp, s_qb, s_ql,
                    Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BPK: tl.constexpr, NS: tl.constexpr,
                    HAS_SEQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                    SIZE: tl.constexpr):
    """Grid ((Q/BT)^2, b * nc * G). Tile (I, J) of the chunk's Q x Q matrices, I >= J (tiles above the diagonal
    exit): dCB[i, j] = sum over the group's heads of dCB_h[i, j] = (dy_i . x_j) L[i, j] dt_j, written to dcb (fp32);
    per head, the row sums of dCB_h * CB go to d a slot J (rows of block I), the negated column sums to slot NB + I
    (columns of block J). Each slot element has exactly one writer; _bwd_dt_kernel sums the slots a row owns."""
    NB: tl.constexpr = Q // BT
    tile = tl.program_id(0)
    ib = tile // NB
    jb = tile % NB
    pid1 = tl.program_id(1)
    gi = pid1 % G
    c = (pid1 // G) % nc
    b = pid1 // (G * nc)
    if jb <= ib:
        ri = ib * BT + tl.arange(0, BT)
        rj = jb * BT + tl.arange(0, BT)
        ti = c * Q + ri
        tj = c * Q + rj
        vi = ti < l
        vj = tj < l
        cb_off = (((b * nc + c) * G + gi).to(tl.int64) * Q + ri[:, None]) * Q + rj[None, :]
        cb = tl.load(cb_ptr + cb_off)
        keep = ri[:, None] >= rj[None, :]
        if HAS_SEQ:
            sq_base = seq_ptr + b.to(tl.int64) * s_qb
            s_i = tl.load(sq_base + tl.minimum(ti, l - 1).to(tl.int64) * s_ql)
            s_j = tl.load(sq_base + tl.minimum(tj, l - 1).to(tl.int64) * s_ql)
            keep = keep & (s_i[:, None] == s_j[None, :])
        acc = tl.zeros((BT, BT), tl.float32)
        for hd in range(_bound(gi * hpg, INTERP), _bound(gi * hpg + hpg, INTERP)):
            off = ((b * H + hd).to(tl.int64) * nc + c) * Q
            ybase = dy_ptr + b.to(tl.int64) * s_yb + hd * s_yh + ti[:, None].to(tl.int64) * s_yl
            xbase = x_ptr + b.to(tl.int64) * s_xb + hd * s_xh + tj[:, None].to(tl.int64) * s_xl
            g_ij = tl.zeros((BT, BT), tl.float32)                # dy_i . x_j
            for p0 in tl.static_range(0, BP, BPK):
                rp = p0 + tl.arange(0, BPK)
                mp = rp < p
                dyt = tl.load(ybase + rp[None, :] * s_yp, mask=vi[:, None] & mp[None, :], other=0.0)
                xt = tl.load(xbase + rp[None, :] * s_xp, mask=vj[:, None] & mp[None, :], other=0.0)
                g_ij += _mm(dyt, tl.trans(xt), DT, INTERP)
            a_i = tl.load(acs_ptr + off + ri)
            a_j = tl.load(acs_ptr + off + rj)
            decay = tl.exp(tl.where(keep, a_i[:, None] - a_j[None, :], float("-inf")))
            dcb = g_ij * decay * tl.load(dtc_ptr + off + rj)[None, :]
            acc += dcb
            w = dcb * cb
            slots = dap_ptr + off * NS
            tl.store(slots + jb * Q + ri, tl.sum(w, axis=1))
            tl.store(slots + (NB + ib) * Q + rj, -tl.sum(w, axis=0))
        tl.store(dcb_ptr + cb_off, acc)


def _prune_side(configs, named_args, **kwargs):
    q, bp = kwargs["Q"], kwargs["BP"]

    def fix(kw):
        bm = min(kw["BM"], q)
        return {"BM": bm, "BK": min(kw["BK"], bm), "BPK": min(kw["BPK"], bp)}
    return _fit(configs, fix)


@triton.jit
def _side_program(l, nc, G, hpg, hps, n, Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Where a _bwd_dc_kernel / _bwd_db_kernel program works, from its place in the grid ((Q/BM) * cdiv(n, BN) *
    splits, b * nc * G): batch row b, chunk c, group gi, the row block's rows (chunk-relative r, absolute t, valid v),
    the n-block's columns rn and mask mn, its split s and the split's heads [h_lo, h_hi)."""
    NM: tl.constexpr = Q // BM
    nn = tl.cdiv(n, BN)
    pid0 = tl.program_id(0)
    m = pid0 % NM
    nb = (pid0 // NM) % nn
    s = pid0 // (NM * nn)
    pid1 = tl.program_id(1)
    gi = pid1 % G
    c = (pid1 // G) % nc
    b = pid1 // (G * nc)
    r = m * BM + tl.arange(0, BM)
    t = c * Q + r
    rn = nb * BN + tl.arange(0, BN)
    h_lo = gi * hpg + s * hps
    h_hi = tl.minimum(h_lo + hps, (gi + 1) * hpg)
    return b, c, gi, m, nn, nb, s, r, t, t < l, rn, rn < n, h_lo, h_hi


_SIDE_CONFIGS = _configs(
    triton.Config({"BM": 16, "BK": 16, "BPK": 16}, num_warps=4),
    [triton.Config({"BM": 64, "BK": 64, "BPK": 64}, num_warps=4, num_stages=3),
     triton.Config({"BM": 128, "BK": 32, "BPK": 64}, num_warps=8, num_stages=3),
     triton.Config({"BM": 64, "BK": 32, "BPK": 32}, num_warps=4, num_stages=3)])


@triton.autotune(configs=_SIDE_CONFIGS, key=["p", "n", "Q", "SIZE"],
                 prune_configs_by={"early_config_prune": _prune_side})
@triton.jit
def _bwd_dc_kernel(dy_ptr, B_ptr, C_ptr, dcb_ptr, acs_ptr, seq_ptr, states_ptr, dC_ptr, dap_ptr,
                   l, nc, H, hpg, G, p, n, hps,
                   s_yb, s_yl, s_yh, s_yp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn, s_qb, s_ql,
                   s_os, s_ob, s_ol, s_og, s_on,
                   Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BPK: tl.constexpr,
                   BN: tl.constexpr, NS: tl.constexpr, SLOT: tl.constexpr,
                   HAS_SEQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                   SIZE: tl.constexpr):
    """Grid ((Q/BM) * cdiv(n, BN) * splits, b * nc * G). Rows i of one block, state columns of one n-block, heads
    of split s: dC_i = sum_h exp(a_i) dy_i S_in + (split 0 only) dCB[i, :] @ B, and per head the entering-state part
    of d a_i, exp(a_i) (dy_i S_in) . C_i over the n-block, to d a slot SLOT + n-block."""
    b, c, gi, m, nn, nb, s, ri, ti, vi, rn, mn, h_lo, h_hi = _side_program(l, nc, G, hpg, hps, n, Q, BM, BN)
    C_m = tl.load(C_ptr + b.to(tl.int64) * s_Cb + ti[:, None].to(tl.int64) * s_Cl + gi * s_Cg + rn[None, :] * s_Cn,
                  mask=vi[:, None] & mn[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        sq_base = seq_ptr + b.to(tl.int64) * s_qb
        s_i = tl.load(sq_base + tl.minimum(ti, l - 1).to(tl.int64) * s_ql)
        s_enter = tl.load(sq_base + tl.maximum(c * Q - 1, 0).to(tl.int64) * s_ql)
    acc = tl.zeros((BM, BN), tl.float32)
    for hd in range(_bound(h_lo, INTERP), _bound(h_hi, INTERP)):
        off = ((b * H + hd).to(tl.int64) * nc + c) * Q
        ybase = dy_ptr + b.to(tl.int64) * s_yb + hd * s_yh + ti[:, None].to(tl.int64) * s_yl
        sbase = states_ptr + (((b * nc + c) * H + hd).to(tl.int64) * p) * n + rn[None, :]
        t_in = tl.zeros((BM, BN), tl.float32)                # dy_i S_in
        for p0 in tl.static_range(0, BP, BPK):
            rp = p0 + tl.arange(0, BPK)
            mp = rp < p
            dy_m = tl.load(ybase + rp[None, :] * s_yp, mask=vi[:, None] & mp[None, :], other=0.0)
            st = tl.load(sbase + rp[:, None] * n, mask=mp[:, None] & mn[None, :], other=0.0)
            t_in += _mm_lh(dy_m, st, DT, INTERP)
        fs = tl.exp(tl.load(acs_ptr + off + ri))
        if HAS_SEQ:
            fs = tl.where(s_i == s_enter, fs, 0.0)
        acc += t_in * fs[:, None]
        tl.store(dap_ptr + off * NS + (SLOT + nb) * Q + ri, fs * tl.sum(t_in * C_m, axis=1))
    if s == 0:
        # the chunk's own term, once per group: dCB[i, j] for j <= i (entries above the diagonal are never read)
        dcb_base = dcb_ptr + (((b * nc + c) * G + gi).to(tl.int64) * Q + ri[:, None]) * Q
        Bbase = B_ptr + b.to(tl.int64) * s_Bb + gi * s_Bg + rn[None, :] * s_Bn
        for k0 in range(0, _bound((m + 1) * BM, INTERP), BK):
            rk = k0 + tl.arange(0, BK)
            d = tl.load(dcb_base + rk[None, :], mask=rk[None, :] <= ri[:, None], other=0.0)
            bt = tl.load(Bbase + (c * Q + rk[:, None]).to(tl.int64) * s_Bl,
                         mask=(c * Q + rk[:, None] < l) & mn[None, :], other=0.0)
            acc += _mm_hl(d, bt, DT, INTERP)
    _store(dC_ptr + s.to(tl.int64) * s_os + b.to(tl.int64) * s_ob + ti[:, None].to(tl.int64) * s_ol + gi * s_og
           + rn[None, :] * s_on, acc, vi[:, None] & mn[None, :], INTERP)


# daq is zeroed before each config's trial and the final run: configs with different BM write different daq slots.
@triton.autotune(configs=_SIDE_CONFIGS, key=["p", "n", "Q", "SIZE"],
                 prune_configs_by={"early_config_prune": _prune_side},
                 reset_to_zero=["daq_ptr"])
@triton.jit
def _bwd_db_kernel(x_ptr, B_ptr, C_ptr, dcb_ptr, dtc_ptr, acs_ptr, seq_ptr, states_ptr, dstates_ptr,
                   dB_ptr, dap_ptr, daq_ptr,
                   l, nc, H, hpg, G, p, n, hps,
                   s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn, s_qb, s_ql,
                   s_os, s_ob, s_ol, s_og, s_on,
                   Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BPK: tl.constexpr,
                   BN: tl.constexpr, NS: tl.constexpr, SLOT: tl.constexpr, NQ: tl.constexpr,
                   HAS_SEQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                   SIZE: tl.constexpr):
    """Grid ((Q/BM) * cdiv(n, BN) * splits, b * nc * G). Rows j of one block, one n-block, heads of split s:
    dB_j = sum_h exp(a_Q - a_j) dt_j (x_j dS_out) + (split 0 only) dCB[:, j]^T @ C. Per head, the column-side d a_j
    from the leaving state, -n_j = -exp(a_Q - a_j) dt_j (x_j dS_out) . B_j over the n-block, goes to slot
    SLOT + n-block; its chunk-end counterpart sum_j n_j (plus, in the first row block, exp(a_Q) <dS_out, S_in> over
    the n-block) to daq[.., row block * cdiv(n, BN) + n-block]."""
    b, c, gi, m, nn, nb, s, rj, tj, vj, rn, mn, h_lo, h_hi = _side_program(l, nc, G, hpg, hps, n, Q, BM, BN)
    B_m = tl.load(B_ptr + b.to(tl.int64) * s_Bb + tj[:, None].to(tl.int64) * s_Bl + gi * s_Bg + rn[None, :] * s_Bn,
                  mask=vj[:, None] & mn[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        sq_base = seq_ptr + b.to(tl.int64) * s_qb
        s_j = tl.load(sq_base + tl.minimum(tj, l - 1).to(tl.int64) * s_ql)
        s_enter = tl.load(sq_base + tl.maximum(c * Q - 1, 0).to(tl.int64) * s_ql)
        s_last = tl.load(sq_base + tl.minimum(c * Q + Q - 1, l - 1).to(tl.int64) * s_ql)
    acc = tl.zeros((BM, BN), tl.float32)
    for hd in range(_bound(h_lo, INTERP), _bound(h_hi, INTERP)):
        off = ((b * H + hd).to(tl.int64) * nc + c) * Q
        xbase = x_ptr + b.to(tl.int64) * s_xb + hd * s_xh + tj[:, None].to(tl.int64) * s_xl
        sidx = (((b * nc + c) * H + hd).to(tl.int64) * p) * n + rn[None, :]
        u_jn = tl.zeros((BM, BN), tl.float32)                # x_j dS_out
        q_state = 0.0
        for p0 in tl.static_range(0, BP, BPK):
            rp = p0 + tl.arange(0, BPK)
            mp = rp < p
            x_m = tl.load(xbase + rp[None, :] * s_xp, mask=vj[:, None] & mp[None, :], other=0.0)
            dso = tl.load(dstates_ptr + sidx + rp[:, None] * n, mask=mp[:, None] & mn[None, :], other=0.0)
            u_jn += _mm_lh(x_m, dso, DT, INTERP)
            # only the first row block needs S_in (a masked load rather than a branch keeps the loop pipelined)
            st = tl.load(states_ptr + sidx + rp[:, None] * n, mask=mp[:, None] & mn[None, :] & (m == 0), other=0.0)
            q_state += tl.sum(tl.sum(dso * st, axis=1), axis=0)
        a_last = tl.load(acs_ptr + off + Q - 1)
        te = tl.exp(a_last - tl.load(acs_ptr + off + rj))
        chunk_decay = tl.exp(a_last)
        if HAS_SEQ:
            te = tl.where(s_j == s_last, te, 0.0)
            chunk_decay = tl.where(s_last == s_enter, chunk_decay, 0.0)
        tdt = te * tl.load(dtc_ptr + off + rj)
        acc += u_jn * tdt[:, None]
        n_j = tdt * tl.sum(u_jn * B_m, axis=1)
        tl.store(dap_ptr + off * NS + (SLOT + nb) * Q + rj, -n_j)
        tl.store(daq_ptr + ((b * H + hd).to(tl.int64) * nc + c) * NQ + m * nn + nb,
                 tl.sum(n_j, axis=0) + chunk_decay * q_state)
    if s == 0:
        # the chunk's own term, once per group: dCB[i, j] for i >= j, read as [j, i]
        dcb_base = dcb_ptr + (((b * nc + c) * G + gi).to(tl.int64) * Q) * Q + rj[:, None]
        Cbase = C_ptr + b.to(tl.int64) * s_Cb + gi * s_Cg + rn[None, :] * s_Cn
        for k0 in range(_bound(m * BM, INTERP), Q, BK):
            rk = k0 + tl.arange(0, BK)
            d = tl.load(dcb_base + rk[None, :] * Q, mask=rk[None, :] >= rj[:, None], other=0.0)
            ct = tl.load(Cbase + (c * Q + rk[:, None]).to(tl.int64) * s_Cl,
                         mask=(c * Q + rk[:, None] < l) & mn[None, :], other=0.0)
            acc += _mm_hl(d, ct, DT, INTERP)
    _store(dB_ptr + s.to(tl.int64) * s_os + b.to(tl.int64) * s_ob + tj[:, None].to(tl.int64) * s_ol + gi * s_og
           + rn[None, :] * s_on, acc, vj[:, None] & mn[None, :], INTERP)


def _prune_dx(configs, named_args, **kwargs):
    q, bp, bn = kwargs["Q"], kwargs["BP"], kwargs["BN"]
    return _fit(configs, lambda kw: {"BM": min(kw["BM"], q), "BK": min(kw["BK"], q), "BNK": min(kw["BNK"], bn)},
                lambda kw: kw["BM"] * bp <= 8192)


@triton.autotune(
    configs=_configs(triton.Config({"BM": 16, "BK": 16, "BNK": 16}, num_warps=4),
                     [triton.Config({"BM": 64, "BK": 32, "BNK": 32}, num_warps=8, num_stages=3),
                      triton.Config({"BM": 128, "BK": 32, "BNK": 32}, num_warps=8, num_stages=3),
                      triton.Config({"BM": 32, "BK": 32, "BNK": 32}, num_warps=4, num_stages=3),
                      triton.Config({"BM": 64, "BK": 64, "BNK": 64}, num_warps=8, num_stages=3)]),
    key=["p", "n", "Q", "SIZE"], prune_configs_by={"early_config_prune": _prune_dx}, reset_to_zero=["dDp_ptr"])
@triton.jit
def _bwd_dx_kernel(x_ptr, dy_ptr, B_ptr, cb_ptr, dtc_ptr, acs_ptr, seq_ptr, D_ptr, dstates_ptr, dx_ptr, ddt_ptr,
                   dDp_ptr,
                   l, nc, H, hpg, G, p, n,
                   s_xb, s_xl, s_xh, s_xp, s_yb, s_yl, s_yh, s_yp, s_Bb, s_Bl, s_Bg, s_Bn, s_qb, s_ql,
                   s_db, s_dl, s_dh, s_dp,
                   Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                   BNK: tl.constexpr, NQ: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
                   DT: tl.constexpr, INTERP: tl.constexpr,
                   SIZE: tl.constexpr):
    """Grid (H * (Q/BM), b * nc): rows j of one block of one head. inner_j = sum_{i>=j} CB[i,j] L[i,j] dy_i +
    exp(a_Q - a_j) dS_out B_j; dx_j = dt_j inner_j + D dy_j; direct d dt_j = x_j . inner_j; partial d D."""
    NM: tl.constexpr = Q // BM
    pid0 = tl.program_id(0)
    m = pid0 % NM
    hd = pid0 // NM
    bc = tl.program_id(1)
    c = bc % nc
    b = bc // nc
    gi = hd // hpg
    rj = m * BM + tl.arange(0, BM)
    tj = c * Q + rj
    vj = tj < l
    rp = tl.arange(0, BP)
    mp = rp < p
    off = ((b * H + hd).to(tl.int64) * nc + c) * Q
    a_j = tl.load(acs_ptr + off + rj)
    dt_j = tl.load(dtc_ptr + off + rj)
    te = tl.exp(tl.load(acs_ptr + off + Q - 1) - a_j)
    if HAS_SEQ:
        sq_base = seq_ptr + b.to(tl.int64) * s_qb
        s_j = tl.load(sq_base + tl.minimum(tj, l - 1).to(tl.int64) * s_ql)
        s_last = tl.load(sq_base + tl.minimum(c * Q + Q - 1, l - 1).to(tl.int64) * s_ql)
        te = tl.where(s_j == s_last, te, 0.0)

    # state leaving the chunk: dS_out B_j, dS_out (p, n) read as (n, p) tiles
    acc = tl.zeros((BM, BP), tl.float32)
    Bbase = B_ptr + b.to(tl.int64) * s_Bb + tj[:, None].to(tl.int64) * s_Bl + gi * s_Bg
    Sbase = dstates_ptr + (((b * nc + c) * H + hd).to(tl.int64) * p + rp[None, :]) * n
    for n0 in range(0, BN, BNK):
        rn = n0 + tl.arange(0, BNK)
        bt = tl.load(Bbase + rn[None, :] * s_Bn, mask=vj[:, None] & (rn[None, :] < n), other=0.0)
        dso = tl.load(Sbase + rn[:, None], mask=(rn[:, None] < n) & mp[None, :], other=0.0)
        acc += _mm_lh(bt, dso, DT, INTERP)
    acc = acc * te[:, None]

    # inside the chunk: rows i >= j, blocks from the diagonal down
    cbbase = cb_ptr + (((b * nc + c) * G + gi).to(tl.int64) * Q) * Q + rj[:, None]
    ybase = dy_ptr + b.to(tl.int64) * s_yb + hd * s_yh + rp[None, :] * s_yp
    for i0 in range(_bound(m * BM, INTERP), Q, BK):
        ri = i0 + tl.arange(0, BK)
        keep = ri[None, :] >= rj[:, None]
        if HAS_SEQ:
            s_i = tl.load(sq_base + tl.minimum(c * Q + ri, l - 1).to(tl.int64) * s_ql)
            keep = keep & (s_i[None, :] == s_j[:, None])
        decay = tl.exp(tl.where(keep, tl.load(acs_ptr + off + ri)[None, :] - a_j[:, None], float("-inf")))
        cbt = tl.load(cbbase + ri[None, :] * Q)                                      # CB[i, j] as [j, i]
        dyt = tl.load(ybase + (c * Q + ri[:, None]).to(tl.int64) * s_yl, mask=(c * Q + ri[:, None] < l) & mp[None, :],
                      other=0.0)
        acc += _mm_hl(cbt * decay, dyt, DT, INTERP)

    x_m = tl.load(x_ptr + b.to(tl.int64) * s_xb + tj[:, None].to(tl.int64) * s_xl + hd * s_xh + rp[None, :] * s_xp,
                  mask=vj[:, None] & mp[None, :], other=0.0).to(tl.float32)
    dy_m = tl.load(ybase + tj[:, None].to(tl.int64) * s_yl, mask=vj[:, None] & mp[None, :], other=0.0).to(tl.float32)
    dx = dt_j[:, None] * acc
    if HAS_D:
        dx += tl.load(D_ptr + hd).to(tl.float32) * dy_m
    _store(dx_ptr + b.to(tl.int64) * s_db + tj[:, None].to(tl.int64) * s_dl + hd * s_dh + rp[None, :] * s_dp, dx,
           vj[:, None] & mp[None, :], INTERP)
    tl.store(ddt_ptr + off + rj, tl.sum(x_m * acc, axis=1))
    if HAS_D:
        tl.store(dDp_ptr + ((b * H + hd).to(tl.int64) * nc + c) * NQ + m, tl.sum(tl.sum(dy_m * x_m, axis=1), axis=0))


@triton.jit
def _bwd_dt_kernel(dt_ptr, dt_bias_ptr, A_log_ptr, dtc_ptr, dap_ptr, ddt_ptr, daq_ptr, ddt_raw_ptr, dAp_ptr, dbp_ptr,
                   l, nc, H, lo, hi, s_db, s_dl, s_dh, s_ob, s_ol, s_oh,
                   Q: tl.constexpr, BT: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr, NQ: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, INTERP: tl.constexpr):
    """Grid (b * H, nc): d a = the sum of the d a slots each row owns (+ the chunk-end terms on the last row)
    -> d(dA) = reverse cumsum -> d dt = direct + A d(dA) -> through clamp/softplus to dt_raw; per-chunk partial sums
    of d A_log = A sum(d(dA) dt) and of d dt_bias. Slots (see _bwd_dcb_kernel): J < NB holds rows of blocks >= J,
    NB + I holds columns of blocks <= I, the rest hold every row."""
    NB: tl.constexpr = Q // BT
    pid_bh = tl.program_id(0)
    c = tl.program_id(1)
    b = pid_bh // H
    hd = pid_bh % H
    rows = tl.arange(0, Q)
    t = c * Q + rows
    valid = t < l
    off = (pid_bh.to(tl.int64) * nc + c) * Q
    sl = tl.arange(0, NSP)[:, None]
    blk = (rows // BT)[None, :]
    owned = (sl >= 2 * NB) | ((sl < NB) & (blk >= sl)) | ((sl >= NB) & (sl < 2 * NB) & (blk <= sl - NB))
    parts = tl.load(dap_ptr + off * NS + sl * Q + rows[None, :], mask=owned & (sl < NS), other=0.0)
    q = tl.sum(tl.load(daq_ptr + (pid_bh.to(tl.int64) * nc + c) * NQ + tl.arange(0, NQ)), axis=0)
    da = tl.sum(parts, axis=0) + tl.where(rows == Q - 1, q, 0.0)
    dda = tl.cumsum(da, axis=0, reverse=True)
    A = -tl.exp(tl.load(A_log_ptr + hd).to(tl.float32))
    dtv = tl.load(dtc_ptr + off + rows)
    ddt = tl.load(ddt_ptr + off + rows) + A * dda
    raw = tl.load(dt_ptr + b.to(tl.int64) * s_db + t.to(tl.int64) * s_dl + hd * s_dh, mask=valid,
                  other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(dt_bias_ptr + hd).to(tl.float32)
    graw = tl.where(valid, ddt * _discretize_grad(raw, bias, SOFTPLUS, HAS_LIMIT, lo, hi), 0.0)
    _store(ddt_raw_ptr + b.to(tl.int64) * s_ob + t.to(tl.int64) * s_ol + hd * s_oh, graw, valid, INTERP)
    tl.store(dAp_ptr + pid_bh.to(tl.int64) * nc + c, A * tl.sum(dda * dtv, axis=0))
    tl.store(dbp_ptr + pid_bh.to(tl.int64) * nc + c, tl.sum(graw, axis=0))


TUNED_KERNELS = {"bwd_state": _bwd_state_kernel, "bwd_dcb": _bwd_dcb_kernel, "bwd_dc": _bwd_dc_kernel,
                 "bwd_db": _bwd_db_kernel, "bwd_dx": _bwd_dx_kernel}


# Programs the dB/dC kernels aim for, in SM counts: each walks its heads serially, so more, shorter programs hide
# latency better, at the cost of more fp32 partials of dB/dC to sum (bench/ssd_head_splits.py chooses it).
HEAD_SPLIT_WAVES = 2


def side_blocks(Q: int, n: int) -> tuple[int, int]:
    """(BT, BN): the dCB kernel's tile and the dB/dC kernels' state-column block. Fixed per problem (not tuned)
    because they set how many d a slots there are; 16 under the interpreter so that CPU tests cover several tiles."""
    cap = 16 if _INTERPRET else 64
    return min(cap, Q), min(cap, max(16, triton.next_power_of_2(n)))


def _head_splits(pr: _Problem, device: torch.device) -> int:
    """How many head splits the dB/dC kernels use: enough programs for HEAD_SPLIT_WAVES waves on the GPU, never
    more than the heads of a group."""
    _, bn = side_blocks(pr.Q, pr.n)
    programs = pr.b * pr.nc * pr.g * max(1, pr.Q // 64) * triton.cdiv(pr.n, bn)
    return max(1, min(pr.hpg, triton.cdiv(sm_count(device, cpu_default=1) * HEAD_SPLIT_WAVES, programs)))


def ssd_backward(pr: _Problem, dy, dfinal, x, dt, A_log, B, C, D, dt_bias, initial_state, seq_idx, states):
    """All input gradients of the scan: (dx, ddt, dA_log, dB, dC, dD, ddt_bias, d initial_state), None where the
    input was None. dy (b, l, h, p) or None (only the final state was used); dfinal (b, h, p, n) or None."""
    dev = x.device
    b, l, h, p, g, n, Q, nc = pr.b, pr.l, pr.h, pr.p, pr.g, pr.n, pr.Q, pr.nc
    if dy is None:
        dy = torch.zeros_like(x)
    cb, dtc, acs = pr.prep(dt, A_log, B, C, dt_bias)
    seq = seq_idx if seq_idx is not None else dtc

    dstates = torch.empty(b, nc, h, p, n, device=dev, dtype=torch.float32)
    dinit = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    grid = lambda meta: (b * h, triton.cdiv(p, meta["BP"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _bwd_state_kernel[grid](
        dy, C, acs, seq, dfinal if dfinal is not None else dinit, dstates, dinit,
        l, nc, h, pr.hpg, p, n,
        *dy.stride(), *C.stride(), *pr.seq_strides, *(dfinal.stride() if dfinal is not None else (0,) * 4),
        Q=Q, HAS_DFINAL=dfinal is not None, HAS_SEQ=pr.has_seq, DT=pr.DT, INTERP=_INTERPRET, SIZE=pr.size_class)

    splits = _head_splits(pr, dev)
    hps = triton.cdiv(pr.hpg, splits)
    splits = triton.cdiv(pr.hpg, hps)
    if splits == 1:
        dB = torch.empty(b, l, g, n, device=dev, dtype=B.dtype)
        dC = torch.empty(b, l, g, n, device=dev, dtype=C.dtype)
    else:
        dB = torch.empty(splits, b, l, g, n, device=dev, dtype=torch.float32)
        dC = torch.empty_like(dB)
    dB_strides = ((0,) + dB.stride()) if splits == 1 else dB.stride()
    dC_strides = ((0,) + dC.stride()) if splits == 1 else dC.stride()
    nq = Q // _NQ_MIN_BLOCK
    bt, bns = side_blocks(Q, n)
    nn = triton.cdiv(n, bns)
    nb = Q // bt
    ns = 2 * nb + 2 * nn                      # d a slots: dCB rows, dCB columns, entering state, leaving state
    nqs = triton.next_power_of_2(nq * nn)     # chunk-end slots: one per (row block, n-block) of _bwd_db_kernel
    dap = torch.empty(b, h, nc, ns, Q, device=dev, dtype=torch.float32)
    daq = torch.zeros(b, h, nc, nqs, device=dev, dtype=torch.float32)
    dcb = torch.empty(b, nc, g, Q, Q, device=dev, dtype=torch.float32)
    ddt = torch.empty(b, h, nc, Q, device=dev, dtype=torch.float32)
    dDp = torch.zeros(b, h, nc, nq, device=dev, dtype=torch.float32)
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    bp, bn = max(16, triton.next_power_of_2(p)), max(16, triton.next_power_of_2(n))
    _bwd_dcb_kernel[(nb * nb, b * nc * g)](
        x, dy, cb, dtc, acs, seq, dcb, dap, l, nc, h, pr.hpg, g, p, *x.stride(), *dy.stride(), *pr.seq_strides,
        Q=Q, BT=bt, BP=bp, BPK=min(bp, 128), NS=ns, HAS_SEQ=pr.has_seq, DT=pr.DT, INTERP=_INTERPRET,
        SIZE=pr.size_class)
    grid = lambda meta: ((Q // meta["BM"]) * nn * splits, b * nc * g)  # noqa: E731
    sizes = (l, nc, h, pr.hpg, g, p, n, hps)
    blocks = dict(Q=Q, BP=bp, BN=bns, NS=ns, HAS_SEQ=pr.has_seq, DT=pr.DT, INTERP=_INTERPRET, SIZE=pr.size_class)
    _bwd_dc_kernel[grid](
        dy, B, C, dcb, acs, seq, states, dC, dap, *sizes, *dy.stride(), *B.stride(), *C.stride(), *pr.seq_strides,
        *dC_strides, SLOT=2 * nb, **blocks)
    _bwd_db_kernel[grid](
        x, B, C, dcb, dtc, acs, seq, states, dstates, dB, dap, daq, *sizes, *x.stride(), *B.stride(), *C.stride(),
        *pr.seq_strides, *dB_strides, SLOT=2 * nb + nn, NQ=nqs, **blocks)
    grid = lambda meta: (h * (Q // meta["BM"]), b * nc)  # noqa: E731
    _bwd_dx_kernel[grid](
        x, dy, B, cb, dtc, acs, seq, D if D is not None else dtc, dstates, dx, ddt, dDp,
        l, nc, h, pr.hpg, g, p, n, *x.stride(), *dy.stride(), *B.stride(), *pr.seq_strides, *dx.stride(),
        Q=Q, BP=bp, BN=bn, NQ=nq, HAS_D=pr.has_D, HAS_SEQ=pr.has_seq, DT=pr.DT, INTERP=_INTERPRET,
        SIZE=pr.size_class)

    ddt_raw = torch.empty(b, l, h, device=dev, dtype=dt.dtype)
    dAp = torch.empty(b, h, nc, device=dev, dtype=torch.float32)
    dbp = torch.empty_like(dAp)
    _bwd_dt_kernel[(b * h, nc)](
        dt, dt_bias if dt_bias is not None else A_log, A_log, dtc, dap, ddt, daq, ddt_raw, dAp, dbp,
        l, nc, h, pr.lo, pr.hi, *dt.stride(), *ddt_raw.stride(),
        Q=Q, BT=bt, NS=ns, NSP=triton.next_power_of_2(ns), NQ=nqs, HAS_BIAS=pr.has_bias, SOFTPLUS=pr.softplus,
        HAS_LIMIT=pr.has_limit, INTERP=_INTERPRET, num_warps=4)

    if splits > 1:
        dB = dB.sum(0).to(B.dtype)
        dC = dC.sum(0).to(C.dtype)
    dA_log = dAp.sum((0, 2)).to(A_log.dtype)
    ddt_bias = dbp.sum((0, 2)).to(dt_bias.dtype) if dt_bias is not None else None
    dD = dDp.sum((0, 2, 3)).to(D.dtype) if D is not None else None
    dinit = dinit.to(initial_state.dtype) if initial_state is not None else None
    return dx, ddt_raw, dA_log, dB, dC, dD, ddt_bias, dinit
