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
