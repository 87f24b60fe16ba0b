"""The pure-PyTorch references in gyrfalcon.ops against their definitions, in float64: the chunked SSD scan against
the token-by-token recurrence (outputs, final states and every gradient), state carry-over between pieces, packed
documents (seq_idx), the causal conv, the gated norm, attention with padding and the RoPE frequencies."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gyrfalcon.ops import (attention, cached_prefill_attention, causal_conv1d_ref, gated_rms_norm_ref,
                           rope_inv_freq, ssd_scan_ref, ssd_sequential_ref)
from helpers import tiny_config

F64 = torch.float64


def ssd_inputs(b=2, l=37, h=4, p=8, g=2, n=6, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype).requires_grad_()

    return dict(x=r(b, l, h, p), dt=r(b, l, h, scale=0.5), A_log=r(h, scale=0.5), B=r(b, l, g, n), C=r(b, l, g, n),
                D=r(h), dt_bias=r(h, scale=0.3))


def grads(outputs, inputs, seed=1):
    """Gradients of a fixed random projection of the outputs."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def close(a, b, tol=1e-10):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= tol


@pytest.mark.parametrize("l, chunk, g, limit", [(1, 16, 1, None), (7, 16, 2, None), (37, 16, 2, None),
                                                 (32, 16, 1, (0.1, 0.8)), (37, 8, 4, None)])
def test_chunked_scan_equals_recurrence_forward_and_backward(l, chunk, g, limit):
    inp = ssd_inputs(l=l, g=g)
    init = torch.randn(2, 4, 8, 6, dtype=F64, requires_grad=True)
    kw = dict(dt_limit=limit or (0.0, math.inf), initial_state=init)
    y, state = ssd_scan_ref(**inp, chunk_size=chunk, return_final_state=True, **kw)
    y_ref, state_ref = ssd_sequential_ref(**inp, **kw)
    assert close(y, y_ref) and close(state, state_ref)
    leaves = [*inp.values(), init]
    for got, want in zip(grads([y, state], leaves), grads([y_ref, state_ref], leaves)):
        assert close(got, want)


def test_scan_in_two_pieces_equals_whole():
    inp = {k: v.detach() for k, v in ssd_inputs(l=50).items()}
    whole = ssd_scan_ref(**inp, chunk_size=16, return_final_state=True)
    first = {k: (v[:, :19] if v.dim() > 1 else v) for k, v in inp.items()}
    second = {k: (v[:, 19:] if v.dim() > 1 else v) for k, v in inp.items()}
    y1, s1 = ssd_scan_ref(**first, chunk_size=16, return_final_state=True)
    y2, s2 = ssd_scan_ref(**second, chunk_size=16, initial_state=s1, return_final_state=True)
    assert close(torch.cat([y1, y2], 1), whole[0]) and close(s2, whole[1])


def test_packed_documents_equal_separate_runs():
    lengths = [9, 20, 11]  # boundaries inside chunks and across a chunk edge (chunk 16)
    inp = ssd_inputs(b=1, l=sum(lengths))
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed = ssd_scan_ref(**inp, chunk_size=16, seq_idx=seq_idx)
    start, pieces = 0, []
    for n in lengths:
        piece = {k: (v[:, start:start + n] if v.dim() > 1 else v) for k, v in inp.items()}
        pieces.append(ssd_scan_ref(**piece, chunk_size=16))
        start += n
    separate = torch.cat(pieces, 1)
    assert close(packed, separate)
    leaves = list(inp.values())
    for got, want in zip(grads([packed], leaves), grads([separate], leaves)):
        assert close(got, want)
    # and the sequential definition agrees
    assert close(packed, ssd_sequential_ref(**inp, seq_idx=seq_idx)[0])


def test_large_dt_stays_finite():
    inp = ssd_inputs(dtype=torch.float32)
    with torch.no_grad():
        inp["dt"].fill_(30.0)
        inp["A_log"].fill_(3.0)
    y, state = ssd_scan_ref(**inp, chunk_size=16, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert all(torch.isfinite(g).all() for g in grads([y], list(inp.values())))


def conv_by_definition(x, w, bias, history=None):
    """y_t = silu(bias + sum_m w[:, m] * x_{t-(k-1)+m}), zeros (or history) before the start."""
    b, l, d = x.shape
    k = w.shape[1]
    padded = torch.cat([history.transpose(1, 2) if history is not None else torch.zeros(b, k - 1, d, dtype=x.dtype),
                        x], 1)
    y = torch.stack([(padded[:, t:t + k] * w.T).sum(1) + bias for t in range(l)], 1)
    return F.silu(y)


def test_conv_matches_definition_with_history_and_final_state():
    gen = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(2, 13, 6, generator=gen, dtype=F64), torch.randn(6, 4, generator=gen, dtype=F64),
                  torch.randn(6, generator=gen, dtype=F64))
    history = torch.randn(2, 6, 3, generator=gen, dtype=F64)
    y, final = causal_conv1d_ref(x, w, bias, initial_state=history, return_final_state=True)
    assert close(y, conv_by_definition(x, w, bias, history))
    assert close(final, x[:, -3:].transpose(1, 2))
    # two pieces with the state carried equal the whole
    y1, s1 = causal_conv1d_ref(x[:, :5], w, bias, return_final_state=True)
    y2 = causal_conv1d_ref(x[:, 5:], w, bias, initial_state=s1)
    assert close(torch.cat([y1, y2], 1), causal_conv1d_ref(x, w, bias))


def test_conv_packed_documents_equal_separate_runs():
    gen = torch.Generator().manual_seed(1)
    x, w, bias = (torch.randn(1, 12, 5, generator=gen, dtype=F64), torch.randn(5, 4, generator=gen, dtype=F64),
                  torch.randn(5, generator=gen, dtype=F64))
    seq_idx = torch.tensor([[0] * 2 + [1] * 7 + [2] * 3])
    packed = causal_conv1d_ref(x, w, bias, seq_idx=seq_idx)
    separate = torch.cat([causal_conv1d_ref(x[:, a:b], w, bias) for a, b in [(0, 2), (2, 9), (9, 12)]], 1)
    assert close(packed, separate)


@pytest.mark.parametrize("before", [True, False])
def test_gated_norm_matches_definition(before):
    gen = torch.Generator().manual_seed(2)
    y, z, w = (torch.randn(2, 5, 12, generator=gen, dtype=F64), torch.randn(2, 5, 12, generator=gen, dtype=F64),
               torch.randn(12, generator=gen, dtype=F64))
    out = gated_rms_norm_ref(y, z, w, eps=1e-5, n_groups=3, norm_before_gate=before)
    v = y if before else y * F.silu(z)
    groups = v.view(2, 5, 3, 4)
    normed = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(2, 5, 12) * w
    assert close(out, normed * F.silu(z) if before else normed)
    assert close(gated_rms_norm_ref(y, z, None), y * F.silu(z))


def test_attention_with_padding_and_cache_offset():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=F64)
    k, v = torch.randn(2, 2, 9, 8, generator=gen, dtype=F64), torch.randn(2, 2, 9, 8, generator=gen, dtype=F64)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    out = attention(q, k, v, scale=0.3, key_padding_mask=valid)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) * 0.3
    qpos, kpos = torch.arange(4, 9)[:, None], torch.arange(9)[None]
    allowed = (kpos <= qpos)[None, None] & valid[:, None, None]
    expected = scores.masked_fill(~allowed, -math.inf).softmax(-1) @ vv
    assert close(out, expected)


def explicit_attention(q, k, v, scale, allowed):
    """softmax(q k^T scale, masked to allowed (lq, lk)) v over repeated key heads, and its log-sum-exp (b, h, lq)."""
    rep = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    return scores.softmax(-1) @ v.repeat_interleave(rep, 1), scores.logsumexp(-1)


def test_cached_prefill_attention_is_bottom_right_causal():
    """A piece of 5 queries over 9 keys (4 cached before it), grouped heads: the explicit bottom-right causal
    softmax; and a piece with nothing cached before it: the causal square."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=F64)
    k, v = torch.randn(2, 2, 9, 8, generator=gen, dtype=F64), torch.randn(2, 2, 9, 8, generator=gen, dtype=F64)
    bottom_right = torch.arange(9)[None] <= torch.arange(4, 9)[:, None]
    assert close(cached_prefill_attention(q, k, v, 0.3), explicit_attention(q, k, v, 0.3, bottom_right)[0])
    square = torch.arange(5)[None] <= torch.arange(5)[:, None]
    assert close(cached_prefill_attention(q, k[:, :, 4:], v[:, :, 4:], 0.3),
                 explicit_attention(q, k[:, :, 4:], v[:, :, 4:], 0.3, square)[0])


def test_merge_by_log_sum_exp_equals_attention_over_the_union():
    """The split's merge (ops/attention.py): attention over the cached keys (no mask) and over the piece's own keys
    (causal square), merged, equals the bottom-right causal attention over all of them (float64)."""
    from gyrfalcon.ops.attention import merge_by_log_sum_exp

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 8, generator=gen, dtype=F64)
    k, v = torch.randn(2, 2, 9, 8, generator=gen, dtype=F64), torch.randn(2, 2, 9, 8, generator=gen, dtype=F64)
    o_a, l_a = explicit_attention(q, k[:, :, :4], v[:, :, :4], 0.3, torch.ones(5, 4, dtype=torch.bool))
    o_b, l_b = explicit_attention(q, k[:, :, 4:], v[:, :, 4:], 0.3, torch.arange(5)[None] <= torch.arange(5)[:, None])
    whole = explicit_attention(q, k, v, 0.3, torch.arange(9)[None] <= torch.arange(4, 9)[:, None])[0]
    merged = merge_by_log_sum_exp(o_a, l_a, o_b, l_b)
    assert merged.dtype == F64 and close(merged, whole)
    assert not close(o_a, whole) and not close(o_b, whole)  # neither part alone is the answer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("batch", "lq", "lk"), [(1, 2048, 2048 + 3000), (2, 4096, 4096 + 64)])
def test_cached_prefill_attention_split_on_cuda(batch, lq, lk):
    """Long bf16 pieces on CUDA take cuDNN's attention in two parts merged by log-sum-exp, laid out as the model
    passes them (q transposed from (b, l, h, d), keys and values a slice of a longer cache buffer): within 2x the
    error of the one bottom-right causal call against float32."""
    from torch.nn.attention.bias import causal_lower_right

    attention_module = importlib.import_module("gyrfalcon.ops.attention")  # the package exports the function
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch, lq, 12, 128, generator=gen).cuda().transpose(1, 2)
    cache_k, cache_v = (torch.randn(batch, 2, lk + 100, 128, generator=gen).cuda() for _ in range(2))
    k, v = cache_k[:, :, :lk], cache_v[:, :, :lk]
    exact = attention(q, k, v, scale=0.088)  # fp32, the masked path
    q16, k16, v16 = q.bfloat16(), cache_k.bfloat16()[:, :, :lk], cache_v.bfloat16()[:, :, :lk]
    assert attention_module._cudnn_split_ok(q16, k16, v16)
    ours = cached_prefill_attention(q16, k16, v16, 0.088)
    one_call = F.scaled_dot_product_attention(q16, k16, v16, attn_mask=causal_lower_right(lq, lk), scale=0.088,
                                              enable_gqa=True)
    err = (ours.float() - exact).norm() / exact.norm()
    assert err <= 2 * (one_call.float() - exact).norm() / exact.norm() + 1e-4, err


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                  {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                   "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5}])
def test_rope_frequencies_match_transformers(rope):
    config = tiny_config(rope_theta=None, rope_parameters={**rope, "rope_theta": 1e4}, max_position_embeddings=64)
    hf = transformers.FalconH1Config.from_dict(config.to_dict())
    for seq_len in (None, 200):
        ours, our_scale = rope_inv_freq(config.rope, config.attn_head_dim, config.max_position_embeddings, seq_len)
        theirs, their_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, None, seq_len=seq_len)
        assert torch.allclose(ours, theirs.float(), rtol=1e-6, atol=0) and math.isclose(our_scale, their_scale)
