"""Triton kernel: attention of one new query per row over that row's cached keys and values (a decode step).

    decode_attention_triton(q (b, hq, d), k_cache, v_cache (b, hk, capacity, d), lengths (b,) int, kv_len, scale)
        -> (b, hq, d) in q's dtype

Row i attends to cache columns 0 .. lengths[i] (its earlier tokens and the one this step stored at column
lengths[i]); no mask tensor is read. The hq / hk query heads sharing a KV head are computed by one program, so each
key and value is read once. The kv_len columns (>= every lengths[i] + 1; the CUDA-graph bucket) are cut into splits
(flash-decoding) so that the (b, hk, splits) grid fills the GPU: split_plan picks them from (b, hk, kv_len, device)
alone, never from the lengths, so a captured graph replays for every length in its bucket. One split: one launch
writes the output. Several: each split writes its running max, sum and output in fp32 (a split past a row's length
writes max -inf) and a second kernel merges them. The split length is a runtime argument: a new kv_len compiles
nothing. Semantics: those of softmax(q k^T * scale) v over the valid
columns, computed with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import sm_count
from .pdl import launch_options, pdl_supported, pdl_wait
from .ssd_triton import _INTERPRET, _bound, _store

BLOCK_N = 64             # cache columns per loop step of a program, and the shortest split
SPLIT_LEN = 1024         # the longest split: a cap on each program's serial walk (tests lower it to force splits)
INTERPRET_PROGRAMS = 4   # the grid to fill without a GPU (CPU interpreter): small, as its programs run one by one
# Splitting adds the merge launch (~1-1.5 us in a CUDA graph on an H100), worth ~2 blocks of a program's walk (~0.8 us
# a block at d 64, ~1 us at d 128): split only where it saves at least this many blocks per program.
MIN_SAVED_BLOCKS = 3
MERGE_BLOCK_S = 32       # the merge kernel reads the splits in chunks of at most this many


def _target_programs(device: torch.device) -> int:
    """Programs wanted in the grid: two per SM, so every SM has work while the other's loads are in flight
    (INTERPRET_PROGRAMS without a GPU)."""
    return 2 * sm_count(device, cpu_default=INTERPRET_PROGRAMS // 2)


def split_plan(b: int, hk: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    """(splits, split_len) for a (b, hk, kv_len) call: the shortest split (a multiple of BLOCK_N, at least one block,
    at most the SPLIT_LEN cap) that still needs no more splits than b * hk * splits reaching the target grid; one
    split instead where that would shorten each program's walk by fewer than MIN_SAVED_BLOCKS. Covers kv_len:
    splits * split_len >= kv_len, and every split starts before kv_len."""
    wanted = triton.cdiv(_target_programs(device), b * hk)
    cap = max(BLOCK_N, SPLIT_LEN // BLOCK_N * BLOCK_N)
    blocks = triton.cdiv(kv_len, BLOCK_N)
    split_len = min(triton.cdiv(blocks, wanted) * BLOCK_N, cap)
    if blocks * BLOCK_N <= cap and blocks - split_len // BLOCK_N < MIN_SAVED_BLOCKS:
        split_len = blocks * BLOCK_N
    return triton.cdiv(kv_len, split_len), split_len


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, m_ptr, l_ptr, scale, G, D, split_len,
                             sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_s, sm_b, sm_h,
                             BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                             IEEE: tl.constexpr, INTERP: tl.constexpr, PARTIAL: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
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
    start = split * split_len
    end = tl.minimum(start + split_len, n_valid)
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
        _store(o_ptr + o_off, acc / l_i[:, None], out_mask, INTERP)
    else:
        tl.store(o_ptr + o_off, acc, mask=out_mask)
        ml_off = row * sm_b + heads * sm_h + split
        tl.store(m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(l_ptr + ml_off, l_i, mask=g_mask)


@triton.jit
def _merge_splits_kernel(p_ptr, m_ptr, l_ptr, o_ptr, S, D, sp_b, sp_h, sp_s, sm_b, sm_h, so_b, so_h,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    """Per (row, query head): out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max_s m_s). The max is
    finite (every row has a valid column), so a split with m = -inf weighs exp(-inf) = 0."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    d_mask = dd < D
    m_base = m_ptr + row * sm_b + head * sm_h
    l_base = l_ptr + row * sm_b + head * sm_h
    p_base = p_ptr + row * sp_b + head * sp_h
    m_top = tl.full([BLOCK_S], float("-inf"), tl.float32)
    # _bound(S) inline: the interpreter turns an int bound to a name into a 1-element tensor, which range() refuses.
    for s0 in range(0, _bound(S, INTERP), BLOCK_S):
        m_top = tl.maximum(m_top, tl.load(m_base + s0 + ss, mask=s0 + ss < S, other=float("-inf")))
    top = tl.max(m_top, axis=0)
    num = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, _bound(S, INTERP), BLOCK_S):
        s_mask = s0 + ss < S
        w = tl.exp(tl.load(m_base + s0 + ss, mask=s_mask, other=float("-inf")) - top)
        den += w * tl.load(l_base + s0 + ss, mask=s_mask, other=0.0)
        num += w[:, None] * tl.load(p_base + (s0 + ss)[:, None] * sp_s + dd[None, :],
                                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(num, axis=0) / tl.sum(den, axis=0)
    _store(o_ptr + row * so_b + head * so_h + dd, out, d_mask, INTERP)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            kv_len: int, scale: float) -> torch.Tensor:
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    group = hq // hk
    splits, split_len = split_plan(b, hk, kv_len, q.device)
    # fp32 inputs: exact fp32 dots (not TF32). The CPU interpreter has no bf16 arithmetic: fp32 dots there too.
    ieee = q.dtype in (torch.float32, torch.float64) or _INTERPRET
    block_d = max(16, triton.next_power_of_2(d))
    pdl = pdl_supported(q.device)
    common = dict(BLOCK_N=BLOCK_N, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, IEEE=ieee,
                  INTERP=_INTERPRET, PDL=pdl, num_warps=4, **launch_options(pdl))
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if splits == 1:
        _decode_attention_kernel[(b, hk, 1)](
            q, k_cache, v_cache, lengths, out, out, out, float(scale), group, d, split_len,  # m, l unused
            *strides, out.stride(0), out.stride(1), 0, 0, 0, PARTIAL=False, **common)
        return out
    partial = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    s = torch.empty_like(m)
    _decode_attention_kernel[(b, hk, splits)](
        q, k_cache, v_cache, lengths, partial, m, s, float(scale), group, d, split_len,
        *strides, partial.stride(0), partial.stride(1), partial.stride(2), m.stride(0), m.stride(1),
        PARTIAL=True, **common)
    _merge_splits_kernel[(b, hq)](
        partial, m, s, out, splits, d, partial.stride(0), partial.stride(1), partial.stride(2), m.stride(0),
        m.stride(1), out.stride(0), out.stride(1), BLOCK_S=min(MERGE_BLOCK_S, triton.next_power_of_2(splits)),
        BLOCK_D=block_d, INTERP=_INTERPRET, PDL=pdl, num_warps=2, **launch_options(pdl))
    return out
