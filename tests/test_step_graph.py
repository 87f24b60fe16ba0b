"""GraphedTrainStep: the CUDA-graph training micro-step gives the eager step's loss and gradients (GPU), accumulates
into .grad in place with the given weight, and falls back to eager where a graph cannot hold the step (CPU, dropout,
dynamic RoPE, another shape)."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.lora import apply_lora
from gyrfalcon.step_graph import GraphedTrainStep, graph_blockers, unsupported_reason


def lora_model(device, dtype=torch.float32, dropout=0.0, layers=2, **overrides):
    config = FalconH1Config.from_preset("tiny", num_hidden_layers=layers, **overrides)
    model = FalconH1ForCausalLM.from_config(config, dtype=dtype, device=device, seed=0)
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    randomize_lora_b(model, device)
    model.enable_gradient_checkpointing()
    model.train()
    return model


def randomize_lora_b(model, device):
    """lora_B away from its zero init, so that the adapters change the function (and lora_A gets gradients)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(len(name)))


def batch(config, b, l, device, seed, packed=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (b, l), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    seq_idx = None
    if packed:
        cut = l // 3
        seq_idx = torch.zeros(b, l, dtype=torch.int32)
        seq_idx[:, cut:] = 1
        labels[:, cut] = -100  # the first token of a document predicts nothing from the previous one
    return ids.to(device), labels.to(device), None if seq_idx is None else seq_idx.to(device)


def eager_grads(model, ids, labels, seq_idx, weight=1.0):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, seq_idx=seq_idx, return_logits=False).loss
    (loss * weight).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_cpu_model_runs_eagerly_with_the_eager_gradients():
    model = lora_model("cpu")
    assert "not a CUDA device" in unsupported_reason(model)
    ids, labels, _ = batch(model.config, 2, 24, "cpu", 0)
    loss_ref, grads_ref = eager_grads(model, ids, labels, None, weight=0.5)
    step = GraphedTrainStep(model, batch_size=2, seq_len=24)
    step.zero_grad()
    addresses = {n: p.grad.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    loss = step(ids, labels, weight=0.5)
    assert not step.graphed and "not a CUDA device" in step.disabled
    assert torch.equal(loss, loss_ref.float())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.data_ptr() == addresses[name]  # accumulated in place
            torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-6, atol=1e-9)
    step(ids, labels, weight=0.5)  # a second call adds the same again
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * grads_ref[name], rtol=1e-5, atol=1e-9)
    step.zero_grad()
    assert all(p.grad.abs().max() == 0 for p in model.parameters() if p.requires_grad)


def test_blockers_name_each_cause():
    assert graph_blockers(lora_model("cpu")) == ["the model is on cpu, not a CUDA device"]
    reasons = graph_blockers(lora_model("cpu", dropout=0.1, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert len(reasons) == 3
    assert "dynamic RoPE" in reasons[1] and "dropout is active" in reasons[2]
    model = lora_model("cpu", dropout=0.1)
    model.eval()  # dropout off outside training
    assert len(graph_blockers(model)) == 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_graph_replay_equals_the_eager_step(packed):
    """fp32 on the GPU, Triton kernels: replays with new batches give the eager loss and gradients, accumulate
    with their weights, and a batch of another shape runs eagerly beside the graph."""
    model = lora_model("cuda", layers=3)
    assert unsupported_reason(model) is None
    cfg = model.config
    first, second = batch(cfg, 2, 96, "cuda", 1, packed), batch(cfg, 2, 96, "cuda", 2, packed)
    loss1, grads1 = eager_grads(model, *first, weight=0.25)
    loss2, grads2 = eager_grads(model, *second, weight=0.75)

    step = GraphedTrainStep(model, batch_size=2, seq_len=96)
    step.zero_grad()
    got1 = step(*first, weight=0.25)
    assert step.graphed, step.disabled
    got2 = step(*second, weight=0.75)
    torch.testing.assert_close(got1, loss1.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got2, loss2.float(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads1[name] + grads2[name], rtol=1e-4, atol=1e-7)

    step.zero_grad()
    other = batch(cfg, 1, 40, "cuda", 3, packed)
    loss3, grads3 = eager_grads(model, *other)
    step.zero_grad()
    torch.testing.assert_close(step(*other), loss3.float(), rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads3[name], rtol=1e-5, atol=1e-8)


def assert_packed_replays_equal_eager(model, config):
    """Two packed batches of 2 x 96, each a fresh graph step (zeroed gradients): the replay gives each batch's eager
    loss and the gradients of every trainable parameter."""
    first, second = batch(config, 2, 96, "cuda", 1, True), batch(config, 2, 96, "cuda", 2, True)
    loss1, grads1 = eager_grads(model, *first)
    loss2, grads2 = eager_grads(model, *second)
    step = GraphedTrainStep(model, batch_size=2, seq_len=96)
    for (ids, labels, seq_idx), loss, grads in ((first, loss1, grads1), (second, loss2, grads2)):
        step.zero_grad()
        got = step(ids, labels, seq_idx)
        assert step.graphed, step.disabled
        torch.testing.assert_close(got, loss.float(), rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
@needs_cuda
def test_gpu_full_fine_tuning_graph_replay_equals_the_eager_step():
    """Every weight trains (the conv's weight-gradient sum then runs, launched with PDL inside the graph): replays
    give the eager loss and gradients."""
    config = FalconH1Config.from_preset("tiny", num_hidden_layers=2)
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cuda", seed=0)
    model.enable_gradient_checkpointing()
    model.train()
    assert unsupported_reason(model) is None
    assert_packed_replays_equal_eager(model, config)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("targets", ["all", "q_v"])
def test_gpu_qlora_graph_replay_equals_the_eager_step(targets):
    """A 4-bit (NF4) base: adapted layers dequantize their weight inside each product, layers without an adapter run
    bitsandbytes' matmul (targets q_v); replays give the eager loss and gradients."""
    pytest.importorskip("bitsandbytes")
    from gyrfalcon.lora import ALL_TARGETS
    from gyrfalcon.quant import from_config_4bit

    config = FalconH1Config.from_preset("tiny", num_hidden_layers=3)
    model = from_config_4bit(config, device="cuda", compute_dtype=torch.float32, seed=0)
    apply_lora(model, r=4, alpha=8, targets=ALL_TARGETS if targets == "all" else ("q_proj", "v_proj"),
               adapter_dtype=torch.float32)
    randomize_lora_b(model, "cuda")
    model.enable_gradient_checkpointing()
    model.train()
    assert unsupported_reason(model) is None
    assert_packed_replays_equal_eager(model, config)


@pytest.mark.gpu
@needs_cuda
def test_gpu_dropout_runs_eagerly():
    model = lora_model("cuda", dropout=0.1)
    step = GraphedTrainStep(model, batch_size=1, seq_len=32)
    step(*batch(model.config, 1, 32, "cuda", 0)[:2])
    assert not step.graphed and "dropout is active" in step.disabled
