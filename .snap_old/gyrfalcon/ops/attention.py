"""Grouped-query causal attention through PyTorch's scaled_dot_product_attention (flash / memory-efficient
kernels on CUDA, math on CPU), with optional left padding.

Shapes: q (b, hq, lq, d); k, v (b, hk, lk, d) with hq % hk == 0 and lk >= lq (the last lq keys are the queries'
own positions, earlier ones come from a cache); key_padding_mask (b, lk) bool, True = a real token;
doc_ids (b, lk) integer: documents packed in one row, a query attends only to keys of its own document.
Returns (b, hq, lq, d). cached_prefill_attention: a prompt piece over the keys a cache holds before it.
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


def cached_prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """A prompt piece's attention over the cache: q (b, hq, lq, d) are the last lq of the lk >= lq positions of keys,
    values (b, hk, lk, d) (bottom-right causal; every row holds the same columns). Returns (b, hq, lq, d).

    Long pieces with no gradient, on CUDA in 16-bit, go to cuDNN's attention in two parts merged by their
    log-sum-exp (_split_cudnn_attention): on the H100 that is 1.8-1.95x faster than the one bottom-right causal call,
    which runs FlashAttention-2 (2K queries over 64K keys, 8K over 32K and 128K; cuDNN takes only top-left causal
    masks through the public call). Elsewhere that public call (see below for grouped heads)."""
    lq, lk = q.shape[2], keys.shape[2]
    gqa = q.shape[1] != keys.shape[1]
    if lq == lk:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    if _cudnn_split_ok(q, keys, values):
        return _split_cudnn_attention(q, keys, values, scale)
    from torch.nn.attention.bias import causal_lower_right

    if gqa and not _flash_takes(q, keys, values):
        # Without FlashAttention, PyTorch's bottom-right causal path takes grouped heads only by building the whole
        # (lq, lk) mask: repeat the key heads instead, so the memory-efficient kernel applies the mask itself.
        rep = q.shape[1] // keys.shape[1]
        keys, values, gqa = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1), False
    # Where FlashAttention runs it takes grouped key heads as they are (no copy per query head): on the H100 1.07x
    # faster than on repeated heads for an 8K piece over 32K-128K keys, 3.4x for 64 queries over 64K (a chat turn
    # after a long history).
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(lq, lk), scale=scale,
                                          enable_gqa=gqa)


def _flash_takes(q, keys, values) -> bool:
    """True where FlashAttention takes these operands with grouped key heads (PyTorch's own check)."""
    if not q.is_cuda:
        return False
    return torch.backends.cuda.can_use_flash_attention(torch.backends.cuda.SDPAParams(q, keys, values, None, 0.0,
                                                                                      False, True))


SPLIT_MIN_QUERIES = 2048  # the shortest piece measured faster split (2K queries: 1.95x); shorter ones keep one call


def _cudnn_split_ok(q, keys, values) -> bool:
    """Long 16-bit pieces with no gradient on a Hopper GPU (where the split was measured) that cuDNN's attention
    takes (PyTorch's own check; the private op below skips it)."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and keys.dtype == values.dtype == q.dtype
            and q.shape[2] >= SPLIT_MIN_QUERIES and torch.version.hip is None
            and torch.cuda.get_device_capability(q.device) >= (9, 0)
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values)):
        return False
    params = torch.backends.cuda.SDPAParams(q, keys, values, None, 0.0, True, q.shape[1] != keys.shape[1])
    return torch.backends.cuda.can_use_cudnn_attention(params)


def _split_cudnn_attention(q, keys, values, scale: float) -> torch.Tensor:
    """Bottom-right causal attention as (a) every query over the cached keys before its piece, no mask, and (b) the
    piece over its own keys, top-left causal (a square), each output with its log-sum-exp, merged by
    merge_by_log_sum_exp. cuDNN returns both parts rounded to q's dtype, so the result is rounded twice (measured
    error 1.2x the single call's)."""
    b, hq, lq, _ = q.shape
    past = keys.shape[2] - lq
    attend = torch.ops.aten._scaled_dot_product_cudnn_attention
    # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask): (out, lse, ...)
    o_a, l_a = attend(q, keys[:, :, :past], values[:, :, :past], None, True, 0.0, False, False, scale=scale)[:2]
    o_b, l_b = attend(q, keys[:, :, past:], values[:, :, past:], None, True, 0.0, True, False, scale=scale)[:2]
    return merge_by_log_sum_exp(o_a, l_a.reshape(b, hq, lq), o_b, l_b.reshape(b, hq, lq)).to(q.dtype)


def merge_by_log_sum_exp(o_a, l_a, o_b, l_b) -> torch.Tensor:
    """Attention over two disjoint key sets, o (b, h, lq, d) with log-sum-exp l (b, h, lq) each, as one attention
    over their union: o_a exp(l_a - l) + o_b exp(l_b - l) with l = logaddexp(l_a, l_b), in at least fp32."""
    lse = torch.logaddexp(l_a, l_b)[..., None]
    dtype = torch.promote_types(torch.float32, l_a.dtype)
    return o_a.to(dtype) * torch.exp(l_a[..., None] - lse) + o_b.to(dtype) * torch.exp(l_b[..., None] - lse)


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
