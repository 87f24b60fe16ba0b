"""Grouped-query causal attention through PyTorch's scaled_dot_product_attention (flash / memory-efficient
kernels on CUDA, math on CPU), with optional left padding.

Shapes: q (b, hq, lq, d); k, v (b, hk, lk, d) with hq % hk == 0 and lk >= lq (the last lq keys are the queries'
own positions, earlier ones come from a cache); key_padding_mask (b, lk) bool, True = a real token;
doc_ids (b, lk) integer: documents packed in one row, a query attends only to keys of its own document.
Returns (b, hq, lq, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import kernels_enabled


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              key_padding_mask: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    lq, lk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and doc_ids is None and lq == lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p,
                                              enable_gqa=gqa)
    qpos = torch.arange(lk - lq, lk, device=q.device)
    kpos = torch.arange(lk, device=q.device)
    mask = (kpos[None, :] <= qpos[:, None])[None, None]                        # (1, 1, lq, lk)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, lk - lq:, None] == doc_ids[:, None, :])[:, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
        # A padding query sees no key at all; let it see itself so its (unused) output is finite, not NaN.
        mask = mask | (kpos[None, :] == qpos[:, None])[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                         kv_len: int, scale: float) -> torch.Tensor:
    """One query per row over the row's cached columns 0..lengths[i]: q (b, hq, d), caches (b, hk, capacity, d),
    lengths (b,). The query heads sharing a KV head are laid along the query axis, so each KV head's keys are read
    once by a plain (no GQA) SDPA call. Returns (b, hq, d)."""
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    cols = torch.arange(kv_len, device=q.device)
    mask = (cols[None, :] <= lengths[:, None])[:, None, None, :]                       # (b, 1, 1, kv_len)
    out = F.scaled_dot_product_attention(q.reshape(b, hk, hq // hk, d), k_cache[:, :, :kv_len],
                                         v_cache[:, :, :kv_len], attn_mask=mask, scale=scale)
    return out.reshape(b, hq, d)


def decode_attention(q, k_cache, v_cache, lengths, kv_len: int, scale: float) -> torch.Tensor:
    """decode_attention_ref's result; on CUDA a Triton kernel that reads each row's valid columns only
    (ops/decode_attention_triton.py) takes the call."""
    if kernels_enabled(q, k_cache, v_cache, lengths) and q.stride(-1) == 1:
        from .decode_attention_triton import decode_attention_triton
        return decode_attention_triton(q, k_cache, v_cache, lengths, kv_len, scale)
    return decode_attention_ref(q, k_cache, v_cache, lengths, kv_len, scale)
