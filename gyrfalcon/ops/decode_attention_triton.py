"""Triton kernel: attention of one new query per row over that row's cached keys and values (a decode step).

    decode_attention_triton(q (b, hq, d), k_cache, v_cache (b, hk, capacity, d), lengths (b,) int, kv_len, scale)
        -> (b, hq, d) in q's dtype

Row i attends to cache columns 0 .. lengths[i] (its earlier tokens and the one this step stored at column
lengths[i]); no mask tensor is read. kv_len (>= every lengths[i] + 1; the CUDA-graph bucket) fixes the grid, so a
captured graph replays for every length in its bucket. The hq / hk query heads sharing a KV head are computed by one
program, so each key and value is read once. Long contexts are split over programs (flash-decoding): each split
keeps a running max, sum and output in fp32, and a few torch ops merge the splits. Semantics: those of softmax(q k^T
* scale) v over the valid columns, computed with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ssd_triton import _INTERPRET, _bound

SPLIT_LEN = 1024  # cache columns per program; a context of up to this many runs as one split (no merge ops)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, m_ptr, l_ptr, scale, G, D,
                             sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_s, sm_b, sm_h,
                             SPLIT_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr,
                             PARTIAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    g_mask = g < G
    d_mask = dd < D
    heads = kvh * G + g                                                                   # query heads of this KV head
    q = tl.load(q_ptr + row * sq_b + heads[:, None] * sq_h + dd[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    n_valid = tl.load(len_ptr + row).to(tl.int32) + 1
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, n_valid)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + row * sk_b + kvh * sk_h
    v_base = v_ptr + row * sv_b + kvh * sv_h
    for n0 in range(_bound(start, INTERP), _bound(end, INTERP), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_mask = cols < end
        kv_mask = c_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sk_t + dd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(c_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                           # a split with no column
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_t + dd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out_mask = g_mask[:, None] & d_mask[None, :]
    o_off = row * so_b + heads[:, None] * so_h + split * so_s + dd[None, :]
    if not PARTIAL:  # one split: the final output
        tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(o_ptr + o_off, acc, mask=out_mask)
        ml_off = row * sm_b + heads * sm_h + split
        tl.store(m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(l_ptr + ml_off, l_i, mask=g_mask)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            kv_len: int, scale: float) -> torch.Tensor:
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    group = hq // hk
    splits = triton.cdiv(kv_len, SPLIT_LEN)
    # fp32 inputs: exact fp32 dots (not TF32). The CPU interpreter has no bf16 arithmetic: fp32 dots there too.
    ieee = q.dtype in (torch.float32, torch.float64) or _INTERPRET
    common = dict(SPLIT_LEN=SPLIT_LEN, BLOCK_N=64, BLOCK_G=max(16, triton.next_power_of_2(group)),
                  BLOCK_D=max(16, triton.next_power_of_2(d)), IEEE=ieee, INTERP=_INTERPRET)
    if splits == 1:
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
        _decode_attention_kernel[(b, hk, 1)](
            q, k_cache, v_cache, lengths, out, out, out, float(scale), group, d,   # m, l unused (PARTIAL off)
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), 0, 0, 0,
            PARTIAL=False, **common)
        return out
    partial = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    s = torch.empty_like(m)
    _decode_attention_kernel[(b, hk, splits)](
        q, k_cache, v_cache, lengths, partial, m, s, float(scale), group, d,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), partial.stride(0), partial.stride(1),
        partial.stride(2), m.stride(0), m.stride(1), PARTIAL=True, **common)
    # merge: weights exp(m_split - max) (splits past a row's length have m = -inf and weigh 0)
    top = m.amax(dim=-1, keepdim=True)
    w = torch.exp(m - top)
    return ((partial * w[..., None]).sum(2) / (s * w).sum(-1, keepdim=True)).to(q.dtype)
