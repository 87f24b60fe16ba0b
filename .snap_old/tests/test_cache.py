"""HybridCache: teacher forcing (a prefill, in one piece or several, then decode steps gives the logits of one full
forward over the same tokens), left-padded batches, what the cache stores, and the errors of the cache path.

float64 for the exact checks (1e-12 relative: any state handled wrongly shows far above that), float32 at the
oracle tolerance (1e-5). All on the CPU reference path; the CUDA (Triton + CUDA graph) version is in
test_generate.py, marked gpu."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM, ops
from gyrfalcon.cache import HybridCache, kv_bucket
from helpers import randomize_, rel_err, tiny_config

EXACT = 1e-12


def model_for(dtype=torch.float64, seed=0, **overrides):
    model = FalconH1ForCausalLM.from_config(tiny_config(**overrides), dtype=dtype, device="cpu", seed=seed)
    return randomize_(model, seed).eval()


def left_padded(lengths, width=None, seed=0, vocab=512):
    """ids (b, width) with random tokens right-aligned, mask (b, width) 1 on them."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


@torch.no_grad()
def teacher_forced(model, ids, mask, cuts, decode_from, kv_len=None, capacity=96, conv_weights=False):
    """Logits for every column of ids: prefill pieces [cuts[i], cuts[i+1]) up to decode_from, then one decode step
    per column. mask None = no padding. conv_weights: the decode steps read the cache's precomputed conv weights."""
    cache = HybridCache.for_model(model, ids.shape[0], capacity)
    if conv_weights:
        cache.load_conv_weights(model)
    bounds = list(cuts) + [decode_from]
    logits = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece_mask = None if mask is None else mask[:, start:end]
        logits.append(model(ids[:, start:end], attention_mask=piece_mask, cache=cache).logits)
    for t in range(decode_from, ids.shape[1]):
        longest = max(cache.host_lengths) + 1
        logits.append(model.decode_step(ids[:, t], cache, kv_len or longest)[:, None])
        cache.advance_host(1)
    return torch.cat(logits, dim=1), cache


CASES = {
    "release_like": {},
    "groups2_norm_before_gate": {"mamba_n_groups": 2, "mamba_norm_before_gate": True},
    "no_mamba_norm": {"mamba_rms_norm": False},
    "all_biases": {"mamba_proj_bias": True, "projectors_bias": True, "attention_bias": True, "mlp_bias": True},
    "time_step_limit": {"time_step_limit": [0.05, 0.9]},
    "rope_yarn": {"rope_theta": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                          "original_max_position_embeddings": 16}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_forcing_one_prefill_then_decode(case):
    model = model_for(**CASES[case])
    ids = torch.randint(3, 512, (2, 41), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    got, cache = teacher_forced(model, ids, None, [0], decode_from=29)
    assert rel_err(got, full) <= EXACT, rel_err(got, full)
    assert cache.host_lengths == [41, 41] and cache.lengths.tolist() == [41, 41]


def test_teacher_forcing_prompt_in_three_pieces_across_scan_chunks():
    # chunk size 16: the pieces end mid-chunk, on a chunk edge and mid-chunk again; one piece is a single token
    model = model_for()
    ids = torch.randint(3, 512, (3, 50), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    got, _ = teacher_forced(model, ids, None, [0, 7, 16, 17], decode_from=40, conv_weights=True)
    assert rel_err(got, full) <= EXACT


def test_teacher_forcing_left_padded_batch_in_pieces():
    # row 1 is padding throughout the first piece and part of the second
    model = model_for(mamba_proj_bias=True, mamba_conv_bias=True)   # biases: padding would leak if not zeroed
    ids, mask = left_padded([37, 12, 29], width=37, seed=3)
    full = model(ids, attention_mask=mask).logits
    ids_more = torch.cat([ids, torch.randint(3, 512, (3, 9), generator=torch.Generator().manual_seed(4))], 1)
    mask_more = torch.cat([mask, torch.ones(3, 9, dtype=torch.long)], 1)
    full_more = model(ids_more, attention_mask=mask_more).logits
    got, cache = teacher_forced(model, ids_more, mask_more, [0, 10, 30], decode_from=37, conv_weights=True)
    valid = mask_more.bool()
    assert rel_err(got[valid], full_more[valid]) <= EXACT
    assert rel_err(got[:, :37][mask.bool()], full[mask.bool()]) <= EXACT
    assert cache.host_lengths == [46, 21, 38]


def test_padded_rows_equal_the_same_prompts_alone():
    model = model_for()
    ids, mask = left_padded([23, 6], seed=5)
    batch, _ = teacher_forced(model, torch.cat([ids, ids[:, -4:]], 1),
                              torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1), [0, 11], decode_from=23)
    for i, n in enumerate([23, 6]):
        row = torch.cat([ids[i:i + 1, 23 - n:], ids[i:i + 1, -4:]], 1)
        alone, _ = teacher_forced(model, row, None, [0], decode_from=n)
        assert rel_err(batch[i, 23 - n:], alone[0]) <= EXACT


def test_decode_reading_a_longer_bucket_changes_nothing():
    model = model_for()
    ids = torch.randint(3, 512, (2, 30), generator=torch.Generator().manual_seed(6))
    exact, _ = teacher_forced(model, ids, None, [0], decode_from=20)
    padded, _ = teacher_forced(model, ids, None, [0], decode_from=20, kv_len=96)
    assert rel_err(padded, exact) <= EXACT


def test_float32_within_oracle_tolerance():
    model = model_for(torch.float32)
    ids, mask = left_padded([33, 19], seed=7)
    full = model(ids, attention_mask=mask).logits
    got, _ = teacher_forced(model, ids, mask, [0, 13], decode_from=25)
    assert rel_err(got[mask.bool()], full[mask.bool()]) <= 1e-5


@torch.no_grad()
def test_cache_holds_unscaled_conv_inputs_and_rotated_multiplied_keys():
    model = model_for()
    cfg = model.config
    ids = torch.randint(3, 512, (2, 11), generator=torch.Generator().manual_seed(8))
    cache = HybridCache.for_model(model, 2, 32)
    model(ids, cache=cache)
    layer = model.model.layers[0]
    h = layer.input_layernorm(model.model.embed(ids))
    xbc = layer.mamba.in_proj(h).split([cfg.d_ssm, cfg.conv_dim, cfg.mamba_n_heads], dim=-1)[1]   # no bias: as is
    assert rel_err(cache.conv[0], xbc[:, -(cfg.mamba_d_conv - 1):].transpose(1, 2)) <= EXACT
    attn = layer.self_attn
    hk = h * layer.self_attn.in_multiplier
    q = attn.q_proj(hk).view(2, 11, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hk).view(2, 11, -1, attn.head_dim).transpose(1, 2) * cfg.key_multiplier
    cos, sin = model.model.rope(torch.arange(11).expand(2, 11), h.dtype)
    _, k = ops.apply_rope(q, k, cos, sin)
    assert rel_err(cache.k[0, :, :, :11], k) <= EXACT
    assert cache.ssm.dtype == torch.float64 and cache.k[0, :, :, 11:].abs().max() == 0


def test_ssm_state_is_float32_for_low_precision_models():
    model = model_for(torch.bfloat16)
    cache = HybridCache.for_model(model, 1, 8)
    assert cache.ssm.dtype == torch.float32 and cache.k.dtype == torch.bfloat16


def test_reset_empties_every_row():
    model = model_for()
    ids = torch.randint(3, 512, (2, 9))
    cache = HybridCache.for_model(model, 2, 16)
    first = model(ids, cache=cache).logits
    cache.reset()
    assert cache.host_lengths == [0, 0] and int(cache.lengths.sum()) == 0
    assert rel_err(model(ids, cache=cache).logits, first) == 0


def test_kv_buckets():
    assert [kv_bucket(n) for n in (1, 256, 257, 768, 769, 1024, 1025, 2049, 4097)] == \
        [256, 256, 512, 768, 1024, 1024, 1280, 2560, 5120]
    for n in range(1, 20000, 37):
        assert n <= kv_bucket(n) <= max(n + 255, 1.25 * n)  # at most 25% more columns past 1024


@torch.no_grad()
def test_cache_path_errors():
    model = model_for()
    cache = HybridCache.for_model(model, 2, 12)
    ids = torch.randint(3, 512, (2, 5))
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1], [1] * 5]), cache=cache)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="already hold tokens"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]), cache=cache)
    with pytest.raises(ValueError, match="holds 12 tokens"):
        model(torch.randint(3, 512, (2, 8)), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(torch.randint(3, 512, (3, 2)), cache=cache)
    with pytest.raises(ValueError, match="positions come from the cache"):
        model(ids, labels=ids, cache=cache)
    with pytest.raises(ValueError, match="kv_len"):
        model.decode_step(ids[:, 0], cache, kv_len=13)
