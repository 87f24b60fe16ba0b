"""Generation: greedy equals transformers' greedy on the same weights, left-padded batches equal their prompts run
alone, sampling is reproducible and never emits an excluded token, stopping (EOS, stop strings, length), streaming,
bad input, the engine's reuse, and (on CUDA) the captured-graph decode against eager and against a full forward."""

from __future__ import annotations

import tempfile

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.assets import load_tiny_tokenizer
from gyrfalcon.generate import cached_engine, generate, release, stream
from gyrfalcon.sampling import GenerationError, SamplingParams, choose, draw, kept_probabilities
from helpers import hf_model, randomize_, rel_err, tiny_config

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_for(dtype=torch.float64, seed=0, device="cpu", **overrides):
    model = FalconH1ForCausalLM.from_config(tiny_config(**overrides), dtype=dtype, device=device, seed=seed)
    return randomize_(model, seed).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_by_full_forwards(model, prompt, n):
    seq = torch.tensor([prompt])
    for _ in range(n):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_equals_transformers_greedy():
    """transformers' greedy generate on each prompt alone (its left-padded batches fail in 5.17 with this model) vs
    ours on the left-padded batch; EOS 2 is hit by one row, which must stop there as transformers' does."""
    hf = hf_model(tiny_config(), dtype=torch.float64)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = FalconH1ForCausalLM.from_pretrained(folder, dtype=torch.float64, device="cpu")
    prompts = prompts_of([13, 5, 9], seed=1)
    ours = generate(model, prompts, max_new_tokens=16, eos_token_id=2, pad_token_id=0, prefill_chunk=6,
                        sync_every=5)
    width = 13
    for i, prompt in enumerate(prompts):
        ref = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0,
                          eos_token_id=2)[0, len(prompt):].tolist()
        mine = ours.sequences[i, width:].tolist()
        assert mine[:len(ref)] == ref and all(t == 0 for t in mine[len(ref):]), (i, mine, ref)
        assert ours.finish_reasons[i] == ("eos" if ref[-1] == 2 and len(ref) < 16 else "length")
    assert "eos" in ours.finish_reasons  # the case is exercised


def test_greedy_batch_equals_full_forwards_and_ids_form():
    model = model_for()
    prompts = prompts_of([20, 1, 7, 33], seed=2)
    out = generate(model, prompts, max_new_tokens=12, eos_token_id=[], prefill_chunk=8, sync_every=3)
    assert out.sequences.shape == (4, 33 + 12)
    for i, prompt in enumerate(prompts):
        assert out.new_tokens[i] == greedy_by_full_forwards(model, prompt, 12)
        assert out.sequences[i, 33 - len(prompt):33].tolist() == prompt
    # tensor + attention_mask form gives the same, with the inputs returned as given
    ids = out.sequences[:, :33]
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        mask[i, 33 - len(p):] = 1
    again = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(again.sequences, out.sequences)


def test_benchmark_harness_call_form():
    from gyrfalcon.benchmark.systems import GyrfalconSystem

    model = model_for(torch.float32, eos_token_id=None)    # no EOS: all new tokens are produced
    ids = torch.randint(3, 512, (2, 10))
    out = GyrfalconSystem().generate(model, ids, 6)
    assert out.shape == (2, 16) and torch.equal(out[:, :10], ids)


# ---------------------------------------------------------------------------------------------- sampling
def test_seed_reproduces_and_seeds_differ(tokenizer):
    model = model_for(torch.float32)
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, eos_token_id=[])
    a = generate(model, tokenizer, ["hello", "the rose"], seed=7, **kwargs)
    b = generate(model, tokenizer, ["hello", "the rose"], seed=7, **kwargs)
    c = generate(model, tokenizer, ["hello", "the rose"], seed=8, **kwargs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def crafted_logits(b=64, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, vocab, generator=g) * 2


def settings(b, **values):
    base = dict(temperature=1.0, top_p=1.0, min_p=0.0, penalty=1.0)
    base.update(values)
    return {k: torch.full((b,), float(v)) for k, v in base.items()}


def sample_many(logits, mode, rounds=40, seed=0, seen=None, **values):
    g = torch.Generator().manual_seed(seed)
    s = settings(logits.shape[0], **values)
    return torch.stack([choose(logits, mode, seen=seen, u=torch.rand(logits.shape[0], generator=g), **s)
                        for _ in range(rounds)], dim=1)                                  # (b, rounds)


def test_top_k_never_emits_excluded_tokens():
    logits = crafted_logits()
    mode = SamplingParams(temperature=1.0, top_k=5).mode(50)
    out = sample_many(logits, mode)
    allowed = logits.topk(5, dim=-1).indices
    assert all(set(out[i].tolist()) <= set(allowed[i].tolist()) for i in range(64))
    assert len(set(out[0].tolist())) > 1  # it does sample


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(8, 4))
    mode = SamplingParams(temperature=1.0, top_p=0.75).mode(4)
    probs, candidates = kept_probabilities(logits, mode, torch.ones(8), top_p=torch.full((8,), 0.75))
    assert (probs[:, 2:] == 0).all() and (probs[:, :2] > 0).all() and candidates[0].tolist() == [0, 1, 2, 3]
    out = sample_many(logits, mode, top_p=0.75, rounds=200)
    assert set(out.unique().tolist()) == {0, 1}
    # the top token alone when it exceeds p; at least one token always
    out = sample_many(logits, mode, top_p=0.2, rounds=50)
    assert set(out.unique().tolist()) == {0}


def test_min_p_and_top_k_with_top_p_together():
    logits = crafted_logits(seed=3)
    mode = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05).mode(50)
    out = sample_many(logits, mode, temperature=0.7, top_p=0.9, min_p=0.05, rounds=100)
    probs = torch.softmax(logits / 0.7, dim=-1)
    top10 = probs.topk(10, dim=-1)
    for i in range(64):
        p = top10.values[i] / top10.values[i].sum()
        keep = (p.cumsum(0) - p < 0.9) & (p >= 0.05 * p.max())
        assert set(out[i].tolist()) <= set(top10.indices[i][keep].tolist())


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    mode = SamplingParams(temperature=1.0).mode(4)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g)
    tokens = draw(torch.softmax(logits, -1).expand(20000, 4), None, u)
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    assert (freq - torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double)).abs().max() < 0.015
    assert mode.greedy is False


def test_draw_never_lands_on_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]] * 3)
    u = torch.tensor([0.0, 0.999999999, 1.0])           # 1.0 (never drawn) as the rounding worst case
    assert set(draw(probs, None, u).tolist()) <= {1, 2}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = crafted_logits(b=4, vocab=20)
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 3, 4], [19, 18, 1, 1], [6, 6, 6, 6]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    seen = torch.zeros(4, 20, dtype=torch.bool).scatter_(1, ids, True)
    mode = SamplingParams(repetition_penalty=1.3).mode(20)
    assert mode.greedy and mode.penalty
    got = choose(logits, mode, seen=seen, u=None, **settings(4, penalty=1.3))
    assert torch.equal(got, expected.argmax(-1))


def test_repetition_penalty_in_generation(tokenizer):
    model = model_for(torch.float32)
    plain = generate(model, tokenizer, "the rose is", max_new_tokens=30, eos_token_id=[])
    penalised = generate(model, tokenizer, "the rose is", max_new_tokens=30, eos_token_id=[],
                             repetition_penalty=1000.0)
    assert len(set(plain.token_ids)) < len(plain.token_ids)          # greedy repeats itself here...
    assert len(set(penalised.token_ids)) == len(penalised.token_ids)  # ...a huge penalty: no token twice,
    assert not set(tokenizer("the rose is").input_ids) & set(penalised.token_ids)  # nor one of the prompt's


# ---------------------------------------------------------------------------------------------- stopping, streaming
def test_eos_stops_rows_and_min_new_tokens_delays_it():
    model = model_for(eos_token_id=2)
    prompts = prompts_of([13, 5, 9], seed=5)                 # with these weights, row 1 meets EOS 2 after 8 tokens
    out = generate(model, prompts, max_new_tokens=16)
    assert out.finish_reasons[1] == "eos" and 2 not in out.new_tokens[1]
    n = len(out.new_tokens[1])
    assert out.sequences[1, 13 + n].item() == 2 and (out.sequences[1, 13 + n + 1:] == 0).all()
    later = generate(model, prompts, max_new_tokens=16, min_new_tokens=n + 3)
    assert len(later.new_tokens[1]) >= n + 3 and later.new_tokens[1][:n] == out.new_tokens[1]


def test_all_rows_done_ends_early():
    model = model_for(eos_token_id=2)
    out = generate(model, prompts_of([5], seed=3), max_new_tokens=200, sync_every=2)   # EOS after 5 tokens
    assert out.finish_reasons == ["eos"] and out.sequences.shape[1] < 5 + 20


def test_stop_strings_cut_the_text_and_never_stream_part_of_one(tokenizer):
    model = model_for(torch.float32)
    free = generate(model, tokenizer, "hello", max_new_tokens=40, eos_token_id=[])
    stop = free.text[10:13]
    assert len(stop) == 3 and free.text.find(stop) == 10
    cut = generate(model, tokenizer, "hello", max_new_tokens=40, eos_token_id=[], stop=["zzzz", stop])
    assert cut.finish_reason == "stop" and cut.text == free.text[:10]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert stop in tokenizer.decode(cut.token_ids) and stop not in tokenizer.decode(cut.token_ids[:-1])
    events = list(stream(model, tokenizer, "hello", max_new_tokens=40, eos_token_id=[], stop=stop, sync_every=1))
    assert "".join(e.text for e in events) == cut.text and events[-1].finished
    assert [e.finished for e in events].count(True) == 1


def test_stream_pieces_join_to_the_completions(tokenizer):
    model = model_for(torch.float32)
    prompts = ["hello", [{"role": "user", "content": "Count to seven."}], "a"]
    done = generate(model, tokenizer, prompts, max_new_tokens=20, sync_every=4)
    texts, tokens, reasons = {}, {}, {}
    for e in stream(model, tokenizer, prompts, max_new_tokens=20, sync_every=4):
        texts[e.index] = texts.get(e.index, "") + e.text
        tokens[e.index] = tokens.get(e.index, []) + e.token_ids
        if e.finished:
            reasons[e.index] = e.finish_reason
    for i, c in enumerate(done):
        assert (texts[i], tokens[i], reasons[i]) == (c.text, c.token_ids, c.finish_reason)
        assert c.prompt_tokens > 0


def test_batch_size_keeps_the_prompt_order(tokenizer):
    model = model_for(torch.float32)
    prompts = ["a", "the rose is red", "hi", "count to seven please", "b"]
    whole = generate(model, tokenizer, prompts, max_new_tokens=8)
    split = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]


def test_context_limit_caps_the_new_tokens():
    model = model_for(max_position_embeddings=40, eos_token_id=None)
    out = generate(model, prompts_of([30, 3]), max_new_tokens=25)
    assert out.sequences.shape[1] == 40 and out.finish_reasons == ["length", "length"]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must lie in"),
    (dict(top_k=-1), "top_k must be"),
    (dict(min_p=1.0), "min_p must lie in"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(stop=3), "stop must be a string or a list of strings, got int"),
    (dict(stop=["ok", b"bytes"]), "stop must be a string or a list of strings"),
    (dict(stop=""), "must not be empty"),
    (dict(seed="1"), "seed must be"),
    (dict(eos_token_id=9999), "eos_token_id"),
    (dict(temprature=1.0), "unknown generation option"),
])
def test_bad_settings(tokenizer, kwargs, message):
    model = model_for(torch.float32)
    with pytest.raises(GenerationError, match=message):
        generate(model, tokenizer, "hello", **kwargs)


def test_bad_prompts_fail_before_any_generation(tokenizer):
    model = model_for(torch.float32, max_position_embeddings=64)
    release(model)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["fine", "", "fine too"])
    with pytest.raises(GenerationError, match="prompt 2 has 70 tokens.*context.*64"):
        generate(model, [[5], [6, 7], list(range(3, 73))])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[5, 512]])
    with pytest.raises(GenerationError, match="must be a string, a list of chat messages"):
        generate(model, tokenizer, ["ok", 3.5])
    with pytest.raises(GenerationError, match="stop strings need a tokenizer"):
        generate(model, [[5, 6]], stop="x")
    with pytest.raises(GenerationError, match="left padding"):
        generate(model, torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 0, 1]]))
    assert cached_engine(model) is None  # nothing was started


def test_temperature_error_is_a_value_error():
    assert issubclass(GenerationError, ValueError)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


# ---------------------------------------------------------------------------------------------- the engine
def test_engine_is_reused_and_rebuilt_when_weights_move(tokenizer):
    model = model_for(torch.float32)
    generate(model, tokenizer, "hello", max_new_tokens=4)
    engine = cached_engine(model)
    generate(model, tokenizer, "hello there", max_new_tokens=6)
    assert cached_engine(model) is engine
    model.to_model_dtype(torch.float64)                  # new weight storage: graphs would read stale addresses
    generate(model, tokenizer, "hello", max_new_tokens=4)
    assert cached_engine(model) is not engine
    release(model)
    assert cached_engine(model) is None


def test_engines_do_not_keep_models_alive():
    import gc
    import weakref

    model = model_for(torch.float32)
    generate(model, [[5, 6, 7]], max_new_tokens=3)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_training_mode_is_restored(tokenizer):
    model = model_for(torch.float32).train()
    generate(model, tokenizer, "hello", max_new_tokens=3)
    assert model.training


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@gpu
def test_cuda_graph_decode_equals_eager_decode():
    model = model_for(torch.bfloat16, device="cuda")
    prompts = prompts_of([40, 7, 300, 1], seed=3)
    for options in (dict(), dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=5)):
        graphed = generate(model, prompts, max_new_tokens=300, eos_token_id=[], cuda_graphs=True, **options)
        eager = generate(model, prompts, max_new_tokens=300, eos_token_id=[], cuda_graphs=False, **options)
        assert graphed.new_tokens == eager.new_tokens


@pytest.mark.gpu
@gpu
@torch.no_grad()
@pytest.mark.parametrize("batch", [3, 12])  # the few-row products on the CUDA cores (3 rows) and in tensor-core tiles
def test_cuda_teacher_forcing_through_a_captured_step(batch):
    """Triton kernels, a left-padded batch prefilled in two pieces, then a captured decode step fed given tokens,
    against one full forward (fp32: 1e-4 relative; bf16: within 2x of eager bf16's error against fp32 logits)."""
    from gyrfalcon.cache import HybridCache

    lengths, width = [300, 180, 250, 300, 210, 201, 299, 260, 222, 290, 230, 205][:batch], 300
    ids = torch.randint(3, 512, (batch, width), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.zeros(batch, width, dtype=torch.long, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    valid = mask.bool()
    reference = model_for(torch.float32, device="cuda")(ids, attention_mask=mask).logits
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, None)):
        model = model_for(dtype, device="cuda")
        full = model(ids, attention_mask=mask).logits.float()
        cache = HybridCache.for_model(model, batch, 512)
        cache.load_conv_weights(model)
        token = ids[:, 200].clone()
        model(ids[:, :200], attention_mask=mask[:, :200], cache=cache)
        model.decode_step(token, cache, 512)           # warm-up (kernels compiled), then start again
        cache.reset()
        pieces = [model(ids[:, a:b], attention_mask=mask[:, a:b], cache=cache).logits.float()
                  for a, b in ((0, 120), (120, 200))]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model.decode_step(token, cache, 512)
        steps = []
        for t in range(200, width):
            token.copy_(ids[:, t])
            graph.replay()
            steps.append(logits.float().clone())
        got = torch.cat([*pieces, torch.stack(steps, 1)], 1)
        if tolerance is not None:
            assert rel_err(got[valid], full[valid]) <= tolerance, rel_err(got[valid], full[valid])
        else:
            ours, eager = rel_err(got[valid], reference[valid]), rel_err(full[valid], reference[valid])
            assert ours <= 2 * eager + 1e-3, (ours, eager)
