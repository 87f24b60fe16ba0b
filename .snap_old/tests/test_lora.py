"""LoRA layers: the same function as PEFT's LoRA on transformers' model (logits and adapter gradients, Mamba
out_proj included), a fresh adapter changes nothing, only adapters train, and merging folds them in exactly."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1ForCausalLM
from gyrfalcon.lora import ALL_TARGETS, apply_lora, lora_parameters
from helpers import hf_model, rel_err, tiny_config


def randomize_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_on_transformers(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    config = tiny_config()
    oracle = hf_model(config, seed=0)
    oracle.save_pretrained(tmp_path / "base")
    # PEFT refuses the Mamba out_proj on Falcon-H1; compare on every other target (out_proj: next test)
    targets = [t for t in ALL_TARGETS if t != "out_proj"]
    ours = apply_lora(FalconH1ForCausalLM.from_pretrained(tmp_path / "base", device="cpu"), r=4, alpha=8,
                      rslora=rslora, targets=targets)
    randomize_adapters(ours)
    peft_model = peft.get_peft_model(oracle, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             use_rslora=rslora, lora_dropout=0.0))
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in lora_parameters(ours).items():
            peft_params[f"base_model.model.{name}.default.weight"].copy_(p)
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    ours.train(), peft_model.train()
    out, ref = ours(ids, labels=ids), peft_model(input_ids=ids, labels=ids)
    assert rel_err(out.logits, ref.logits) <= 1e-5
    out.loss.backward(), ref.loss.backward()
    for name, p in lora_parameters(ours).items():
        expected = peft_params[f"base_model.model.{name}.default.weight"].grad
        assert rel_err(p.grad, expected) <= 1e-4, name


def test_mamba_out_proj_adapter_trains():
    """Its gradient is the exact derivative (checked against a finite difference in float64)."""
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float64, device="cpu", seed=0)
    apply_lora(model, r=2, alpha=2, targets=("out_proj",))
    randomize_adapters(model, seed=5)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    b = model.model.layers[0].mamba.out_proj.lora_B
    model(ids, labels=ids).loss.backward()
    direction = torch.randn(b.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        b += eps * direction
        up = model(ids, labels=ids).loss
        b -= 2 * eps * direction
        down = model(ids, labels=ids).loss
    numeric = (up - down) / (2 * eps)
    analytic = (b.grad * direction).sum()
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic) and abs(analytic) > 0


def test_fresh_adapter_is_identity_and_only_adapters_train():
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu", seed=0)
    ids = torch.randint(0, 512, (1, 20))
    before = model(ids).logits.detach()
    apply_lora(model, r=8, alpha=16, targets=("q_proj", "in_proj", "out_proj"))
    assert torch.equal(model(ids).logits.detach(), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and len(trainable) == 2 * 3 * 2


def test_merge_folds_adapters_exactly():
    model = apply_lora(FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu", seed=0),
                       r=4, alpha=4)
    randomize_adapters(model, seed=3)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
        for module in model.modules():
            if hasattr(module, "merge"):
                module.merge()
        assert rel_err(model(ids).logits, before) <= 1e-5


def test_bad_targets():
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\]"):
        apply_lora(model, targets=("qkv",))


@pytest.mark.parametrize("bias, train_base, dtype", [(False, False, torch.float64), (True, True, torch.float64),
                                                     (True, False, torch.bfloat16)])
def test_lora_linear_function_matches_the_plain_expression(bias, train_base, dtype):
    """LoRALinearFn (one autograd function, its adapter gradient accumulated inside the products) gives the output and
    every gradient of x W^T + b + scale (x A^T) B^T: exactly in float64 (up to rounding), and within bf16 rounding of
    the float64 values for a bf16 base with float32 adapters."""
    from gyrfalcon.lora_autograd import lora_linear

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64) / 5
    b = torch.randn(40, generator=gen, dtype=torch.float64) if bias else None
    A = torch.randn(4, 24, generator=gen, dtype=torch.float64) / 5
    B = torch.randn(40, 4, generator=gen, dtype=torch.float64) / 2
    dy = torch.randn(2, 7, 40, generator=gen, dtype=torch.float64)
    scale = 2.5

    def leaves(base_dtype, adapter_dtype):
        out = [t.detach().to(dt) if t is not None else None
               for t, dt in zip((x, w, b, A, B), (base_dtype,) * 3 + (adapter_dtype,) * 2)]
        for t, grad in zip(out, (True, train_base, train_base, True, True)):
            if t is not None:
                t.requires_grad_(grad)
        return out

    ref_in = leaves(torch.float64, torch.float64)
    xr, wr, br, ar, lbr = ref_in
    ref = torch.nn.functional.linear(xr, wr, br) + scale * (xr @ ar.t()) @ lbr.t()
    ref.backward(dy)
    got_in = leaves(dtype, torch.float32 if dtype == torch.bfloat16 else torch.float64)
    got = lora_linear(*got_in, scale)
    got.backward(dy.to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert got.dtype == dtype and rel_err(got, ref) < tol
    for g, r in zip(got_in, ref_in):
        if r is None:
            continue
        if r.requires_grad:
            assert g.grad is not None and g.grad.dtype == g.dtype and rel_err(g.grad, r.grad) < tol
        else:
            assert g.grad is None


def test_lora_layer_uses_the_plain_expression_with_dropout():
    from gyrfalcon.lora import LoRALinear

    layer = LoRALinear.from_linear(torch.nn.Linear(16, 8, bias=False), r=2, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    x = torch.randn(3, 16)
    torch.manual_seed(0)
    y1 = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert not torch.allclose(y1, y_eval)   # dropout acted in training mode: the adapter saw a masked input
