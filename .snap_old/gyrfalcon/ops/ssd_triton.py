"""Triton kernels for the Mamba-2 SSD scan: the chunked forward, its autograd wrapper, and the one-token decode step.

Same semantics as `ssd.py::ssd_scan_ref` / `ssd_step_ref` (read that module's docstring first). Per batch row b,
head h (group g = h // (H/G)) and chunk c of Q tokens, with dt_t = clamp(softplus(dt_raw + dt_bias)), A = -exp(A_log),
a_t = sum_{s<=t in chunk} dt_s A (the in-chunk cumulative log-decay, a_Q its last value):
    CB[i, j]  = C_i . B_j                                            (per chunk and GROUP, shared by its heads)
    S_in(c+1) = keep_c exp(a_Q) S_in(c) + sum_j exp(a_Q - a_j) dt_j x_j B_j^T        (state entering each chunk)
    y_i       = sum_{j<=i} CB[i,j] exp(a_i - a_j) dt_j x_j + exp(a_i) S_in(c) C_i + D x_i
With packed documents (seq_idx) every term is masked so that nothing crosses a document boundary.

Forward, three kernels:
  _prep_kernel       per (b, c, g): CB = C B^T (fp32, (b, nc, g, Q, Q)) and, per head of the group, the folded
                     dt = clamp(softplus(dt_raw + dt_bias)) and its cumulative sum a = cumsum(dt * A) ((b, h, nc, Q)).
  _fwd_state_kernel  per (b, h, p-block, n-block), walking the chunks in order: each chunk's own state contribution
                     (tl.dot) fused with the passing of the state, so per-chunk states are written once, never re-read.
  _fwd_out_kernel    per (b, c, h, row block, p-block): intra-chunk term (reads CB) + entering-state term + D x.
Backward (ssd_triton_bwd.py) recomputes _prep (cheap) and uses the saved entering states; see that module.

Precision: accumulators and the stored per-chunk states are fp32. For bf16/fp16 inputs the tensor-core operands are
16-bit; an operand that is computed in fp32 (decay-weighted x, CB * decay * dt, the fp32 states, head sums of dCB) is
split into a 16-bit high part and a 16-bit remainder and multiplied twice, so products are accurate to ~2^-17 and the
kernels' error matches eager PyTorch's (which computes in fp32) instead of adding 16-bit rounding of intermediates.
fp32 inputs use fp32 operands with IEEE products (no TF32).

Autotuning (triton.autotune, keyed on (p, n, chunk), the dtypes and a size class, `size_class`: short, medium and
long scans tune separately; block sizes are clipped to the problem and configs that spill registers at that size
dropped before timing): _prep_kernel tries 2 configs, _fwd_state_kernel 6, _fwd_out_kernel 4; the backward's are
listed in ssd_triton_bwd.py (about 25 compiles in all on a first call, per size class).
Under TRITON_INTERPRET=1 (CPU tests) each kernel has a single small config, and because the numpy interpreter cannot
multiply bf16 tiles and truncates when it narrows floats, kernels get INTERP=True: dot operands are rounded to the
dot dtype (round-to-nearest-even, as the GPU does) and multiplied in fp32, and narrowing stores are rounded the same
way.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .pdl import launch_options, pdl_supported, pdl_wait

# triton.jit chose the interpreter from the same knob when the kernels below were defined.
_INTERPRET = bool(triton.knobs.runtime.interpret)

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------------------------------------------
# Small jit helpers shared by all kernels (the backward module imports them).
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _bound(x, INTERP: tl.constexpr):
    """A loop bound. Under the interpreter a runtime scalar is a 1-element numpy array, which numpy >= 2.4 refuses to
    turn into an int for range() (triton-lang/triton#9171, fixed after triton 3.6): hand range() a Python int there."""
    if INTERP:
        return x.handle.data.item()
    else:
        return x


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """fp32 x rounded to DT's precision (round to nearest even) and kept in fp32 (interpreter stand-in for a cast)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _mm(a, b, DT: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with fp32 accumulation, operands in DT (fp32 operands: IEEE products, no TF32 rounding)."""
    if INTERP:
        return tl.dot(_rnd(a.to(tl.float32), DT), _rnd(b.to(tl.float32), DT))
    elif DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _hi(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """The high part of an fp32 x in DT (x rounded to DT), kept in fp32: x - _hi(x) is the low part."""
    if INTERP:
        return _rnd(x, DT)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _mm_hl(a, b, DT: tl.constexpr, INTERP: tl.constexpr):
    """a @ b for an fp32 `a` (computed, or a stored fp32 state) and a `b` exact in DT. For 16-bit DT, `a` is split
    into hi + lo parts in DT and multiplied twice: products accurate to ~2^-17 instead of DT's 2^-9 rounding."""
    if DT == tl.float32:
        return _mm(a, b, DT, INTERP)
    else:
        a = a.to(tl.float32)
        hi = _hi(a, DT, INTERP)
        return _mm(hi, b, DT, INTERP) + _mm(a - hi, b, DT, INTERP)


@triton.jit
def _mm_lh(a, b, DT: tl.constexpr, INTERP: tl.constexpr):
    """a @ b for an `a` exact in DT and an fp32 `b` (split into hi + lo, as in _mm_hl)."""
    if DT == tl.float32:
        return _mm(a, b, DT, INTERP)
    else:
        b = b.to(tl.float32)
        hi = _hi(b, DT, INTERP)
        return _mm(a, hi, DT, INTERP) + _mm(a, b - hi, DT, INTERP)


@triton.jit
def _store(ptrs, val, mask, INTERP: tl.constexpr):
    """Store, rounding to nearest even when the destination is narrower (the interpreter alone would truncate)."""
    if INTERP:
        val = _rnd(val.to(tl.float32), ptrs.dtype.element_ty)
    tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _softplus(v):
    """torch's softplus (identity above 20), with an accurate log1p for small exp(v)."""
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    # log1p(e) = log(u) * e / (u - 1) corrects the rounding of 1 + e; when u rounds to 1, log1p(e) = e.
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, lp)


@triton.jit
def _discretize(raw, bias, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, lo, hi):
    """dt_raw -> clamp(softplus(dt_raw + dt_bias), lo, hi) in fp32."""
    v = raw + bias
    if SOFTPLUS:
        v = _softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v


@triton.jit
def _discretize_grad(raw, bias, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, lo, hi):
    """d dt / d dt_raw of _discretize: sigmoid for softplus (1 above 20), 0 where the clamp is active."""
    v = raw + bias
    grad = tl.full(v.shape, 1.0, tl.float32)
    if SOFTPLUS:
        e = tl.exp(tl.minimum(v, 20.0))
        grad = tl.where(v > 20.0, 1.0, e / (1.0 + e))
        v = _softplus(v)
    if HAS_LIMIT:
        grad = tl.where((v >= lo) & (v <= hi), grad, 0.0)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------------------

def _fit(configs, fix, fits=lambda kw: True):
    """Autotune pruning: each config with its block sizes made valid for the problem by `fix` (kwargs -> kwargs),
    duplicates dropped; those `fits` accepts (the ones that do not spill at that size), or the first when none does."""
    out, seen = [], set()
    for c in configs:
        kw = fix(dict(c.kwargs))
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return [c for c in out if fits(c.kwargs)] or out[:1]


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(int(v)))


def _prune_prep(configs, named_args, **kwargs):
    q = kwargs["Q"]
    return _fit(configs, lambda kw: {**kw, "BT": min(kw["BT"], q)})


def _configs(interp, gpu):
    return [interp] if _INTERPRET else gpu


@triton.autotune(
    configs=_configs(triton.Config({"BT": 16, "BK": 16}, num_warps=4),
                     [triton.Config({"BT": 64, "BK": 64}, num_warps=4, num_stages=3),
                      triton.Config({"BT": 128, "BK": 64}, num_warps=8, num_stages=2)]),
    key=["n", "Q", "SIZE"], prune_configs_by={"early_config_prune": _prune_prep})
@triton.jit
def _prep_kernel(C_ptr, B_ptr, dt_ptr, A_log_ptr, dt_bias_ptr, cb_ptr, dtc_ptr, acs_ptr,
                 l, nc, G, hpg, n, lo, hi,
                 s_Cb, s_Cl, s_Cg, s_Cn, s_Bb, s_Bl, s_Bg, s_Bn, s_db, s_dl, s_dh,
                 Q: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                 DT: tl.constexpr, INTERP: tl.constexpr,
                 SIZE: tl.constexpr):
    """Grid (b * nc * G, (Q/BT)^2 + 1). Programs 0..(Q/BT)^2-1 of axis 1 compute one BT x BT tile of CB (zeros above
    the diagonal); the last one folds dt for the group's heads: dtc = clamp(softplus(dt + bias)), acs = cumsum(dtc*A)
    (zero dt on padded rows past l, so padded rows neither decay nor add)."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    gi = pid % G
    c = (pid // G) % nc
    b = pid // (G * nc)
    NT: tl.constexpr = Q // BT
    if tile < NT * NT:
        ti = tile // NT
        tj = tile % NT
        ri = ti * BT + tl.arange(0, BT)
        rj = tj * BT + tl.arange(0, BT)
        out = cb_ptr + pid.to(tl.int64) * (Q * Q) + ri[:, None] * Q + rj[None, :]
        if tj > ti:
            tl.store(out, tl.zeros((BT, BT), tl.float32))
        else:
            vi = c * Q + ri < l
            vj = c * Q + rj < l
            Cp = C_ptr + b.to(tl.int64) * s_Cb + (c * Q + ri[:, None]).to(tl.int64) * s_Cl + gi * s_Cg
            Bp = B_ptr + b.to(tl.int64) * s_Bb + (c * Q + rj[:, None]).to(tl.int64) * s_Bl + gi * s_Bg
            acc = tl.zeros((BT, BT), tl.float32)
            for k0 in range(0, _bound(n, INTERP), BK):
                rk = k0 + tl.arange(0, BK)
                ct = tl.load(Cp + rk[None, :] * s_Cn, mask=vi[:, None] & (rk[None, :] < n), other=0.0)
                bt = tl.load(Bp + rk[None, :] * s_Bn, mask=vj[:, None] & (rk[None, :] < n), other=0.0)
                acc += _mm(ct, tl.trans(bt), DT, INTERP)
            tl.store(out, acc)
    else:
        rows = tl.arange(0, Q)
        t = c * Q + rows
        valid = t < l
        H = G * hpg
        for k in range(_bound(hpg, INTERP)):
            hd = gi * hpg + k
            raw = tl.load(dt_ptr + b.to(tl.int64) * s_db + t.to(tl.int64) * s_dl + hd * s_dh,
                          mask=valid, other=0.0).to(tl.float32)
            bias = 0.0
            if HAS_BIAS:
                bias = tl.load(dt_bias_ptr + hd).to(tl.float32)
            dtv = tl.where(valid, _discretize(raw, bias, SOFTPLUS, HAS_LIMIT, lo, hi), 0.0)
            A = -tl.exp(tl.load(A_log_ptr + hd).to(tl.float32))
            acs = tl.cumsum(dtv * A, axis=0)
            off = ((b * H + hd).to(tl.int64) * nc + c) * Q + rows
            tl.store(dtc_ptr + off, dtv)
            tl.store(acs_ptr + off, acs)


def _prune_state(configs, named_args, **kwargs):
    bp, bn, q = _pow2(named_args["p"]), _pow2(named_args["n"]), kwargs["Q"]
    return _fit(configs, lambda kw: {"BP": min(kw["BP"], bp), "BN": min(kw["BN"], bn), "BQ": min(kw["BQ"], q)})


# Large BQ means fewer sequential steps per program (the chunk loop is the critical path at long sequences).
_STATE_CONFIGS = _configs(
    triton.Config({"BP": 16, "BN": 16, "BQ": 16}, num_warps=4),
    [triton.Config({"BP": 64, "BN": 64, "BQ": 32}, num_warps=4, num_stages=3),
     triton.Config({"BP": 32, "BN": 64, "BQ": 128}, num_warps=8, num_stages=3),
     triton.Config({"BP": 64, "BN": 64, "BQ": 64}, num_warps=8, num_stages=3),
     triton.Config({"BP": 32, "BN": 128, "BQ": 64}, num_warps=8, num_stages=3),
     # wide tiles: fewer programs, each re-reading less of x and B per chunk (batch 1 at long sequences)
     triton.Config({"BP": 128, "BN": 64, "BQ": 64}, num_warps=8, num_stages=3),
     triton.Config({"BP": 64, "BN": 128, "BQ": 64}, num_warps=8, num_stages=3)])


@triton.autotune(configs=_STATE_CONFIGS, key=["p", "n", "Q", "SIZE"],
                 prune_configs_by={"early_config_prune": _prune_state})
@triton.jit
def _fwd_state_kernel(x_ptr, B_ptr, dtc_ptr, acs_ptr, seq_ptr, init_ptr, states_ptr, final_ptr,
                      l, nc, H, hpg, p, n,
                      s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_qb, s_ql, s_ib, s_ih, s_ip, s_in,
                      Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr,
                      HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                      SIZE: tl.constexpr):
    """Grid (b * H, cdiv(p, BP), cdiv(n, BN)). Walks the chunks in order carrying a BP x BN fp32 state tile:
    writes the state entering chunk c to states[b, c, h] (fp32), then S <- keep * exp(a_Q) S +
    (x * exp(a_Q - a) dt)^T B, the chunk taken BQ rows at a time. Writes the final state (fp32)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    hd = pid_bh % H
    gi = hd // hpg
    rp = tl.program_id(1) * BP + tl.arange(0, BP)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    mpn = (rp[:, None] < p) & (rn[None, :] < n)
    if HAS_INIT:
        S = tl.load(init_ptr + b.to(tl.int64) * s_ib + hd * s_ih + rp[:, None] * s_ip + rn[None, :] * s_in,
                    mask=mpn, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BP, BN), tl.float32)
    sq_base = seq_ptr + b.to(tl.int64) * s_qb
    prev = 0
    if HAS_SEQ:
        prev = tl.load(sq_base)
    xp = x_ptr + b.to(tl.int64) * s_xb + hd * s_xh + rp[None, :] * s_xp
    Bp = B_ptr + b.to(tl.int64) * s_Bb + gi * s_Bg + rn[None, :] * s_Bn
    for c in range(_bound(nc, INTERP)):
        off = (pid_bh.to(tl.int64) * nc + c) * Q
        a_last = tl.load(acs_ptr + off + Q - 1)
        decay = tl.exp(a_last)
        if HAS_SEQ:
            s_last = tl.load(sq_base + tl.minimum(c * Q + Q - 1, l - 1).to(tl.int64) * s_ql)
            decay = tl.where(s_last == prev, decay, 0.0)
            prev = s_last
        _store(states_ptr + ((((b * nc + c) * H + hd).to(tl.int64) * p + rp[:, None]) * n + rn[None, :]), S, mpn,
               INTERP)
        S = S * decay
        for k0 in tl.static_range(0, Q, BQ):   # unrolled: the chunk loop is then the innermost, pipelined one
            rq = k0 + tl.arange(0, BQ)
            t = c * Q + rq
            valid = t < l
            w = tl.exp(a_last - tl.load(acs_ptr + off + rq)) * tl.load(dtc_ptr + off + rq)
            if HAS_SEQ:
                w = tl.where(tl.load(sq_base + tl.minimum(t, l - 1).to(tl.int64) * s_ql) == s_last, w, 0.0)
            xt = tl.load(xp + t[:, None].to(tl.int64) * s_xl, mask=valid[:, None] & (rp[None, :] < p), other=0.0)
            bt = tl.load(Bp + t[:, None].to(tl.int64) * s_Bl, mask=valid[:, None] & (rn[None, :] < n), other=0.0)
            S += _mm_hl(tl.trans(xt.to(tl.float32) * w[:, None]), bt, DT, INTERP)
    tl.store(final_ptr + (pid_bh.to(tl.int64) * p + rp[:, None]) * n + rn[None, :], S, mask=mpn)


def _prune_out(configs, named_args, **kwargs):
    q, bp, bn = kwargs["Q"], _pow2(named_args["p"]), _pow2(named_args["n"])

    def fix(kw):
        bm = min(kw["BM"], q)
        return {"BM": bm, "BK": min(kw["BK"], bm), "BP": min(kw["BP"], bp), "BN": min(kw["BN"], bn)}
    return _fit(configs, fix)


@triton.autotune(
    configs=_configs(triton.Config({"BM": 16, "BK": 16, "BP": 16, "BN": 16}, num_warps=4),
                     [triton.Config({"BM": 64, "BK": 32, "BP": 64, "BN": 32}, num_warps=4, num_stages=3),
                      triton.Config({"BM": 64, "BK": 32, "BP": 64, "BN": 64}, num_warps=4, num_stages=3),
                      triton.Config({"BM": 128, "BK": 32, "BP": 64, "BN": 64}, num_warps=8, num_stages=3),
                      triton.Config({"BM": 128, "BK": 64, "BP": 64, "BN": 64}, num_warps=8, num_stages=2)]),
    key=["p", "n", "Q", "SIZE"], prune_configs_by={"early_config_prune": _prune_out})
@triton.jit
def _fwd_out_kernel(x_ptr, C_ptr, cb_ptr, dtc_ptr, acs_ptr, seq_ptr, D_ptr, states_ptr, y_ptr,
                    l, nc, H, hpg, G, p, n,
                    s_xb, s_xl, s_xh, s_xp, s_Cb, s_Cl, s_Cg, s_Cn, s_qb, s_ql, s_yb, s_yl, s_yh, s_yp,
                    Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr, INTERP: tl.constexpr,
                    SIZE: tl.constexpr):
    """Grid (H * (Q/BM) * cdiv(p, BP), b * nc): one BM x BP tile of y. Programs of one (b, c) are adjacent so the
    chunk's CB, B, C and states stay in L2 while all heads read them."""
    NM: tl.constexpr = Q // BM
    npb = tl.cdiv(p, BP)
    pid = tl.program_id(0)
    pb = pid % npb
    m = (pid // npb) % NM
    hd = pid // (npb * NM)
    bc = tl.program_id(1)
    c = bc % nc
    b = bc // nc
    gi = hd // hpg
    ri = m * BM + tl.arange(0, BM)
    ti = c * Q + ri
    vi = ti < l
    rp = pb * BP + tl.arange(0, BP)
    mp = rp < p
    off = ((b * H + hd).to(tl.int64) * nc + c) * Q
    a_i = tl.load(acs_ptr + off + ri)
    if HAS_SEQ:
        sq_base = seq_ptr + b.to(tl.int64) * s_qb
        s_i = tl.load(sq_base + tl.minimum(ti, l - 1).to(tl.int64) * s_ql)
        s_enter = tl.load(sq_base + tl.maximum(c * Q - 1, 0).to(tl.int64) * s_ql)

    # Entering state, read by every row: exp(a_i) C_i . S_in  (S_in stored (p, n): load it as an (n, p) tile)
    acc = tl.zeros((BM, BP), tl.float32)
    Cp = C_ptr + b.to(tl.int64) * s_Cb + ti[:, None].to(tl.int64) * s_Cl + gi * s_Cg
    Sp = states_ptr + (((b * nc + c) * H + hd).to(tl.int64) * p + rp[None, :]) * n
    for n0 in range(0, _bound(n, INTERP), BN):
        rn = n0 + tl.arange(0, BN)
        ct = tl.load(Cp + rn[None, :] * s_Cn, mask=vi[:, None] & (rn[None, :] < n), other=0.0)
        st = tl.load(Sp + rn[:, None], mask=(rn[:, None] < n) & mp[None, :], other=0.0)
        acc += _mm_lh(ct, st, DT, INTERP)
    fs = tl.exp(a_i)
    if HAS_SEQ:
        fs = tl.where(s_i == s_enter, fs, 0.0)
    acc = acc * fs[:, None]

    # Inside the chunk: sum_{j <= i} CB[i, j] exp(a_i - a_j) dt_j x_j, column blocks up to the diagonal
    cbp = cb_ptr + (((b * nc + c) * G + gi).to(tl.int64) * Q + ri[:, None]) * Q
    xp = x_ptr + b.to(tl.int64) * s_xb + hd * s_xh + rp[None, :] * s_xp
    for k0 in range(0, _bound((m + 1) * BM, INTERP), BK):
        rj = k0 + tl.arange(0, BK)
        cbt = tl.load(cbp + rj[None, :])
        a_j = tl.load(acs_ptr + off + rj)
        dt_j = tl.load(dtc_ptr + off + rj)
        keep = ri[:, None] >= rj[None, :]
        if HAS_SEQ:
            s_j = tl.load(sq_base + tl.minimum(c * Q + rj, l - 1).to(tl.int64) * s_ql)
            keep = keep & (s_i[:, None] == s_j[None, :])
        decay = tl.exp(tl.where(keep, a_i[:, None] - a_j[None, :], float("-inf")))
        xk = tl.load(xp + (c * Q + rj[:, None]).to(tl.int64) * s_xl, mask=(c * Q + rj[:, None] < l) & mp[None, :],
                     other=0.0)
        acc += _mm_hl(cbt * decay * dt_j[None, :], xk, DT, INTERP)

    xi = tl.load(xp + ti[:, None].to(tl.int64) * s_xl, mask=vi[:, None] & mp[None, :], other=0.0).to(tl.float32)
    if HAS_D:
        acc += tl.load(D_ptr + hd).to(tl.float32) * xi
    yp = y_ptr + b.to(tl.int64) * s_yb + ti[:, None].to(tl.int64) * s_yl + hd * s_yh + rp[None, :] * s_yp
    _store(yp, acc, vi[:, None] & mp[None, :], INTERP)


# ----------------------------------------------------------------------------------------------------------------
# Decode step
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _step_program(idx_ptr, hpg, p, n, BP: tl.constexpr, BN: tl.constexpr, HAS_IDX: tl.constexpr):
    """Where a decode-step program works, from its place in the grid (cdiv(p, BP), b, H): batch row b, head hd, its
    group gi, the state slot (state_indices[b], or b), the head-dim rows rp of its block and the state columns rn,
    with their masks mp, mn."""
    b = tl.program_id(1)
    hd = tl.program_id(2)
    slot = b.to(tl.int64)
    if HAS_IDX:
        slot = tl.load(idx_ptr + b).to(tl.int64)
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    rn = tl.arange(0, BN)
    return b, hd, hd // hpg, slot, rp, rn, rp < p, rn < n


@triton.jit
def _state_step(S, sptr, smask, x, dtv, A, Bv, Cv):
    """One token of the recurrence on the (BP, BN) fp32 state tile S loaded from sptr (masked by smask; the caller
    loads it, as early as it likes), stored back in place: S <- exp(dt A) S + (dt x) B^T. x (BP,), B and C (BN,)
    fp32; returns S . C (BP,)."""
    S = S * tl.exp(dtv * A) + (dtv * x)[:, None] * Bv[None, :]
    tl.store(sptr, S, mask=smask)
    return tl.sum(S * Cv[None, :], axis=1)


@triton.jit
def _step_kernel(state_ptr, idx_ptr, x_ptr, dt_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, z_ptr, y_ptr,
                 hpg, p, n, lo, hi, dt_scale, z_scale,
                 s_ss, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_db, s_dh, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
                 s_zb, s_zh, s_zp, s_yb, s_yh, s_yp,
                 BP: tl.constexpr, BN: tl.constexpr, HAS_IDX: tl.constexpr, HAS_D: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                 INTERP: tl.constexpr, PDL: tl.constexpr):
    """Grid (cdiv(p, BP), b, H): reads and writes one BP x n slice of a state slot once (a bandwidth-bound op)."""
    pdl_wait(PDL)
    b, hd, gi, slot, rp, rn, mp, mn = _step_program(idx_ptr, hpg, p, n, BP, BN, HAS_IDX)
    sptr = state_ptr + slot * s_ss + hd * s_sh + rp[:, None] * s_sp + rn[None, :] * s_sn
    smask = mp[:, None] & mn[None, :]
    S = tl.load(sptr, mask=smask, other=0.0)
    x = tl.load(x_ptr + b * s_xb + hd * s_xh + rp * s_xp, mask=mp, other=0.0).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(dt_bias_ptr + hd).to(tl.float32)
    dt_raw = tl.load(dt_ptr + b * s_db + hd * s_dh).to(tl.float32) * dt_scale
    dtv = _discretize(dt_raw, bias, SOFTPLUS, HAS_LIMIT, lo, hi)
    A = -tl.exp(tl.load(A_log_ptr + hd).to(tl.float32))
    Bv = tl.load(B_ptr + b * s_Bb + gi * s_Bg + rn * s_Bn, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + gi * s_Cg + rn * s_Cn, mask=mn, other=0.0).to(tl.float32)
    y = _state_step(S, sptr, smask, x, dtv, A, Bv, Cv)
    if HAS_D:
        y += tl.load(D_ptr + hd).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + hd * s_zh + rp * s_zp, mask=mp, other=0.0).to(tl.float32) * z_scale
        y = y * z / (1.0 + tl.exp(-z))
    _store(y_ptr + b * s_yb + hd * s_yh + rp * s_yp, y, mp, INTERP)


def ssd_step_triton(state, x, dt, A_log, B, C, D=None, dt_bias=None, *, dt_softplus: bool = True,
                    dt_limit=(0.0, math.inf), z=None, state_indices=None, dt_scale: float = 1.0,
                    z_scale: float = 1.0, launch: tuple[int, int] | None = None):
    """One token of the recurrence for a batch. state (num_slots, h, p, n) fp32, updated IN PLACE (row i uses slot
    state_indices[i], or slot i); x (b, h, p); dt (b, h), multiplied by dt_scale (in fp32) as it is read; B, C
    (b, g, n); z (b, h, p) optional gate, multiplied by z_scale (in fp32) as it is read.
    Returns y (b, h, p) in x's dtype: new_state . C + D x, times silu(z_scale z) when z is given.
    launch=(BP, num_warps) overrides the state rows per program and the warps (benchmarks)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    if state.dtype != torch.float32:
        raise ValueError(f"ssd_step: the state must be float32, got {state.dtype}")
    if h % g:
        raise ValueError(f"ssd_step: {g} B/C groups do not divide {h} heads")
    y = torch.empty_like(x)
    bn = max(16, triton.next_power_of_2(n))
    warps = 4 if bn <= 128 else 8
    # 16 state elements per thread (BP 16 at the 0.5B and 7B shapes): at batch 64 (0.5B) 43.5 us against 45.4 us
    # with 4 per thread (H100, bench/mamba_decode_kernels.py --sweep); below 9 rows the fused step runs instead.
    bp = max(1, min(triton.next_power_of_2(p), 512 * warps // bn))
    if launch is not None:
        bp, warps = launch
    lo, hi, has_limit = _limits(dt_limit)
    zz = z if z is not None else x
    pdl = pdl_supported(x.device)
    _step_kernel[(triton.cdiv(p, bp), b, h)](
        state, state_indices, x, dt, A_log, B, C, D, dt_bias, zz, y,
        h // g, p, n, lo, hi, float(dt_scale), float(z_scale),
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zz.stride(), *y.stride(),
        BP=bp, BN=bn, HAS_IDX=state_indices is not None, HAS_D=D is not None, HAS_BIAS=dt_bias is not None,
        HAS_Z=z is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit, INTERP=_INTERPRET, PDL=pdl, num_warps=warps,
        **launch_options(pdl))
    return y


# ----------------------------------------------------------------------------------------------------------------
# Host side of the scan
# ----------------------------------------------------------------------------------------------------------------

def _limits(dt_limit):
    """(lo, hi, clamp?) exactly as the reference: no clamp at all for the default (0, inf)."""
    lo, hi = (0.0, math.inf) if dt_limit is None else (float(dt_limit[0]), float(dt_limit[1]))
    has_limit = (lo, hi) != (0.0, math.inf)
    return lo, (hi if math.isfinite(hi) else 3.0e38), has_limit


def kernel_chunk(chunk_size: int) -> int:
    """The chunk length the kernels run at: chunk_size when it is a power of two in [16, 256], else the nearest such
    length (the scan's result does not depend on the chunk length, only its rounding does)."""
    return min(256, max(16, triton.next_power_of_2(int(chunk_size))))


def _dot_dtype(x, B, C):
    dtypes = {x.dtype, B.dtype, C.dtype}
    if len(dtypes) == 1 and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return torch.float32


def size_class(chunks: int) -> int:
    """The autotuning size class of a scan with `chunks` = batch x chunks: 0 below 32, 1 below 128, else 2. Part of
    every kernel's tuning key, so a config tuned on a short sequence (few programs: small tiles win) is not reused at
    32K tokens (many programs, or a long serial chunk walk: wide tiles win)."""
    return 0 if chunks < 32 else (1 if chunks < 128 else 2)


class _Problem:
    """Sizes, flags and the folded per-chunk buffers shared by the forward and backward launches."""

    def __init__(self, x, dt, A_log, B, C, D, dt_bias, seq_idx, chunk_size, dt_softplus, dt_limit):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        if self.h % self.g:
            raise ValueError(f"ssd_scan: {self.g} B/C groups do not divide {self.h} heads")
        if x.dtype not in _TL_DTYPE:
            raise ValueError(f"ssd_scan kernels take bf16, fp16 or fp32 inputs, got {x.dtype}")
        self.hpg = self.h // self.g
        self.Q = kernel_chunk(chunk_size)
        self.nc = triton.cdiv(self.l, self.Q)
        self.lo, self.hi, self.has_limit = _limits(dt_limit)
        self.softplus = bool(dt_softplus)
        self.dot_dtype = _dot_dtype(x, B, C)
        self.DT = _TL_DTYPE[self.dot_dtype]
        self.has_seq = seq_idx is not None
        self.has_bias = dt_bias is not None
        self.has_D = D is not None
        self.seq_strides = seq_idx.stride() if seq_idx is not None else (0, 0)
        self.size_class = size_class(self.b * self.nc)

    def prep(self, dt, A_log, B, C, dt_bias):
        """Launch _prep_kernel: returns cb (b, nc, g, Q, Q), dtc and acs (b, h, nc, Q), all fp32."""
        dev = dt.device
        cb = torch.empty(self.b, self.nc, self.g, self.Q, self.Q, device=dev, dtype=torch.float32)
        dtc = torch.empty(self.b, self.h, self.nc, self.Q, device=dev, dtype=torch.float32)
        acs = torch.empty_like(dtc)
        grid = lambda meta: (self.b * self.nc * self.g, (self.Q // meta["BT"]) ** 2 + 1)  # noqa: E731
        _prep_kernel[grid](
            C, B, dt, A_log, dt_bias if dt_bias is not None else A_log, cb, dtc, acs,
            self.l, self.nc, self.g, self.hpg, self.n, self.lo, self.hi,
            *C.stride(), *B.stride(), *dt.stride(),
            Q=self.Q, HAS_BIAS=self.has_bias, SOFTPLUS=self.softplus, HAS_LIMIT=self.has_limit, DT=self.DT,
            INTERP=_INTERPRET, SIZE=self.size_class)
        return cb, dtc, acs


def _forward(pr: _Problem, x, B, C, D, seq_idx, initial_state, cb, dtc, acs):
    """Launch the state and output kernels: returns y (x's dtype), states (b, nc, h, p, n) and the final state."""
    dev = x.device
    states = torch.empty(pr.b, pr.nc, pr.h, pr.p, pr.n, device=dev, dtype=torch.float32)
    final = torch.empty(pr.b, pr.h, pr.p, pr.n, device=dev, dtype=torch.float32)
    init = initial_state if initial_state is not None else final
    seq = seq_idx if seq_idx is not None else dtc
    grid = lambda meta: (pr.b * pr.h, triton.cdiv(pr.p, meta["BP"]), triton.cdiv(pr.n, meta["BN"]))  # noqa: E731
    _fwd_state_kernel[grid](
        x, B, dtc, acs, seq, init, states, final,
        pr.l, pr.nc, pr.h, pr.hpg, pr.p, pr.n,
        *x.stride(), *B.stride(), *pr.seq_strides, *(init.stride() if initial_state is not None else (0,) * 4),
        Q=pr.Q, HAS_INIT=initial_state is not None, HAS_SEQ=pr.has_seq, DT=pr.DT, INTERP=_INTERPRET,
        SIZE=pr.size_class)
    y = torch.empty(pr.b, pr.l, pr.h, pr.p, device=dev, dtype=x.dtype)
    grid = lambda meta: (pr.h * (pr.Q // meta["BM"]) * triton.cdiv(pr.p, meta["BP"]), pr.b * pr.nc)  # noqa: E731
    _fwd_out_kernel[grid](
        x, C, cb, dtc, acs, seq, D if D is not None else dtc, states, y,
        pr.l, pr.nc, pr.h, pr.hpg, pr.g, pr.p, pr.n,
        *x.stride(), *C.stride(), *pr.seq_strides, *y.stride(),
        Q=pr.Q, HAS_D=pr.has_D, HAS_SEQ=pr.has_seq, DT=pr.DT, INTERP=_INTERPRET, SIZE=pr.size_class)
    return y, states, final


class SSDScanFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs and the per-chunk entering states; the backward recomputes CB and dt."""

    @staticmethod
    def forward(ctx, x, dt, A_log, B, C, D, dt_bias, initial_state, seq_idx, chunk_size, dt_softplus, dt_limit):
        pr = _Problem(x, dt, A_log, B, C, D, dt_bias, seq_idx, chunk_size, dt_softplus, dt_limit)
        cb, dtc, acs = pr.prep(dt, A_log, B, C, dt_bias)
        y, states, final = _forward(pr, x, B, C, D, seq_idx, initial_state, cb, dtc, acs)
        ctx.problem = pr
        ctx.save_for_backward(x, dt, A_log, B, C, D, dt_bias, initial_state, seq_idx, states)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        from .ssd_triton_bwd import ssd_backward

        x, dt, A_log, B, C, D, dt_bias, initial_state, seq_idx, states = ctx.saved_tensors
        grads = ssd_backward(ctx.problem, dy, dfinal, x, dt, A_log, B, C, D, dt_bias, initial_state, seq_idx, states)
        return (*grads, None, None, None, None)


def ssd_scan_triton(x, dt, A_log, B, C, D=None, dt_bias=None, *, chunk_size: int, dt_softplus: bool = True,
                    dt_limit=(0.0, math.inf), initial_state=None, seq_idx=None, return_final_state: bool = False):
    """The chunked SSD scan on the Triton kernels; same signature and results as `ssd_scan_ref`.
    Returns y (b, l, h, p) in x's dtype [, final_state (b, h, p, n) fp32]."""
    y, final = SSDScanFunction.apply(x, dt, A_log, B, C, D, dt_bias, initial_state, seq_idx, chunk_size,
                                     dt_softplus, dt_limit)
    return (y, final) if return_final_state else y


def tuning_report() -> dict:
    """Per autotuned kernel: the chosen config and the seconds its last tuning took (None before any tuning)."""
    from . import ssd_triton_bwd

    report = {}
    kernels = {"prep": _prep_kernel, "fwd_state": _fwd_state_kernel, "fwd_out": _fwd_out_kernel,
               **ssd_triton_bwd.TUNED_KERNELS}
    for name, kernel in kernels.items():
        best = getattr(kernel, "best_config", None)
        report[name] = {"config": str(best) if best is not None else None,
                        "tuning_s": getattr(kernel, "bench_time", None)}
    return report
