"""Checkpointing with the saved layer inputs offloaded to host memory gives the loss and every gradient of plain
checkpointing (float64; with LoRA dropout the same masks are replayed; packed rows too), and refuses to run without
checkpointing or inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.lora import apply_lora
from gyrfalcon.recipes import FinetuneConfig, RecipeError
from gyrfalcon.step_graph import graph_blockers


def lora_model(dropout: float) -> FalconH1ForCausalLM:
    config = FalconH1Config.from_preset("tiny", num_hidden_layers=3)
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.float64, device="cpu", seed=0)
    apply_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def loss_and_grads(model, offload: bool, packed: bool):
    model.enable_gradient_checkpointing(True, offload=offload)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=gen)
    seq_idx = torch.cat([torch.zeros(2, 15, dtype=torch.int32), torch.ones(2, 25, dtype=torch.int32)], 1) if packed \
        else None
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout masks
    loss = model(ids, labels=ids, seq_idx=seq_idx, return_logits=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dropout, packed", [(0.0, False), (0.0, True), (0.2, False)])
def test_offloaded_checkpointing_equals_checkpointing(dropout, packed):
    model = lora_model(dropout)
    ref_loss, ref_grads = loss_and_grads(model, offload=False, packed=packed)
    loss, grads = loss_and_grads(model, offload=True, packed=packed)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-12, atol=1e-15), name
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_A"))  # every layer's adapters train


def test_offload_needs_checkpointing_and_no_graph():
    model = lora_model(0.0)
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        model.enable_gradient_checkpointing(False, offload=True)
    model.enable_gradient_checkpointing(True, offload=True)
    assert any("activation offload" in reason for reason in graph_blockers(model))
    with pytest.raises(RecipeError, match="offload_activations needs gradient_checkpointing"):
        FinetuneConfig(offload_activations=True, gradient_checkpointing=False).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_offload_through_pinned_memory_equals_checkpointing():
    model = lora_model(0.0).to("cuda", torch.float32)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=gen).cuda()
    results = []
    for offload in (False, True):
        model.enable_gradient_checkpointing(True, offload=offload)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref_loss, ref), (loss, got) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for name, grad in got.items():
        torch.testing.assert_close(grad, ref[name], rtol=1e-5, atol=1e-7)
