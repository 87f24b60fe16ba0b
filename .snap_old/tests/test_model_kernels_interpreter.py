"""The whole model with every Triton kernel taking its call (run by Triton's CPU interpreter, as on a GPU the
dispatch would choose them) against the pure-PyTorch references: the prefill's logits, and greedy decoding through
the cache (fused RoPE + KV store, decode attention, residual and SwiGLU kernels, conv update, SSD step) token for
token. The dispatch check is patched to accept CPU tensors; tests/conftest.py sets TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM  # noqa: E402
from gyrfalcon.generate import generate  # noqa: E402
from gyrfalcon.ops import conv, dispatch, fused, mamba_decode, norm, rope, skinny, skinny_triton, ssd  # noqa: E402
from helpers import randomize_, rel_err, tiny_config  # noqa: E402


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    def patch():
        # ops/attention.py by its module path: the package exports a function of that name
        attention = importlib.import_module("gyrfalcon.ops.attention")
        loss = importlib.import_module("gyrfalcon.ops.loss")
        for module in (attention, conv, fused, loss, mamba_decode, norm, rope, skinny, ssd):
            monkeypatch.setattr(module, "kernels_enabled", lambda *tensors: not dispatch.reference_forced())
    return patch


def test_kernel_path_equals_reference_path(kernels_on_cpu):
    config = FalconH1Config.from_preset("tiny", num_hidden_layers=2)
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=3).eval()
    prompt = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = model(prompt).logits
        ref = generate(model, prompt, max_new_tokens=5, temperature=0, eos_token_id=[], cuda_graphs=False)
        kernels_on_cpu()
        logits = model(prompt).logits
        out = generate(model, prompt, max_new_tokens=5, temperature=0, eos_token_id=[], cuda_graphs=False)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert out.sequences.tolist() == ref.sequences.tolist()


@pytest.mark.parametrize("mamba_norm", [
    {},                                                         # RMSNorm after the gate: folded into out_proj
    {"mamba_rms_norm": False},                                  # the gate alone: inside the Mamba step
    {"mamba_n_groups": 2, "mamba_norm_before_gate": True},      # the gated norm kernel after an ungated step
])
def test_decode_step_logits_kernel_path_equals_reference_path(kernels_on_cpu, mamba_norm):
    """Three decode steps' logits (few-row products with the norms folded in, the fused Mamba step, fused RoPE + KV
    store, decode attention) against the reference path's, each path with its own cache after the same prefill;
    non-unit µP factors and random norm weights, so a factor or a norm applied in the wrong place shows."""
    config = tiny_config(num_hidden_layers=2, **mamba_norm)
    model = randomize_(FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=6), 6).eval()
    prompt, tokens = decode_inputs(config, 3)
    ref = decode_logits(model, prompt, tokens)
    kernels_on_cpu()
    assert rel_err(decode_logits(model, prompt, tokens), ref) <= 1e-5


def test_decode_step_with_tensor_core_products_bf16(kernels_on_cpu, monkeypatch):
    """Six rows in bf16: the decode step's products run in tensor-core tiles (ops/skinny.py, above
    CUDA_CORE_MAX_ROWS), the norms before them as kernels of their own; its logits' error against the float64
    reference path is within 2x the bf16 reference path's own."""
    config = tiny_config(num_hidden_layers=2)
    assert 6 > skinny.CUDA_CORE_MAX_ROWS
    prompt, tokens = decode_inputs(config, 6)
    model = randomize_(FalconH1ForCausalLM.from_config(config, dtype=torch.float64, device="cpu", seed=7), 7).eval()
    exact = decode_logits(model, prompt, tokens)
    model = model.to(torch.bfloat16)
    eager = rel_err(decode_logits(model, prompt, tokens), exact)
    kernels_on_cpu()
    tilings = []
    real_tiling = skinny_triton._row_tiling
    monkeypatch.setattr(skinny_triton, "_row_tiling", lambda *a: tilings.append(real_tiling(*a)) or tilings[-1])
    ours = rel_err(decode_logits(model, prompt, tokens), exact)
    assert ours <= 2 * eager + 1e-3, (ours, eager)
    assert tilings and all(tile for tile, _ in tilings)  # every product of the steps ran in tensor-core tiles


def decode_inputs(config, batch: int):
    """A (batch, 7) prompt and (batch, 3) tokens to feed the decode steps."""
    prompt = torch.randint(3, config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(3, config.vocab_size, (batch, 3), generator=torch.Generator().manual_seed(2))
    return prompt, tokens


@torch.no_grad()
def decode_logits(model, prompt, tokens):
    """(batch, steps, vocab) logits of model.decode_step fed tokens after a prefill of prompt, in a fresh cache."""
    from gyrfalcon.cache import HybridCache

    cache = HybridCache.for_model(model, prompt.shape[0], 16)
    model(prompt, cache=cache, logits_to_keep=1)
    out = []
    for t in range(tokens.shape[1]):
        out.append(model.decode_step(tokens[:, t], cache, prompt.shape[1] + t + 1))
        cache.advance_host(1)
    return torch.stack(out, 1)


def test_training_step_kernel_path_equals_reference_path(kernels_on_cpu):
    """Loss and every LoRA gradient through the kernels' backward passes (SSD, conv, norms, SwiGLU, residual mix,
    the fused loss with its gradient made in the forward) with activation checkpointing and packed rows, against the
    references."""
    from gyrfalcon.lora import apply_lora

    config = FalconH1Config.from_preset("tiny", num_hidden_layers=2)
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu", seed=4)
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.enable_gradient_checkpointing(True)
    model.train()
    ids = torch.randint(3, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    seq_idx = torch.cat([torch.zeros(2, 17, dtype=torch.int32), torch.ones(2, 23, dtype=torch.int32)], dim=1)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, seq_idx=seq_idx, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    kernels_on_cpu()
    loss, grads = loss_and_grads()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) <= 1e-4, name
