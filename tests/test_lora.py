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
@pytest.mark.parametrize("n, layer_end", [(1, False), (1, True), (3, False), (3, True)])
def test_lora_group_matches_the_plain_expressions(n, layer_end, bias, train_base, dtype):
    """lora_linear (n = 1) and lora_group (projections of different widths, ranks and scales sharing x: one adapter
    product for the group, every input gradient accumulated inside the products; h kept on the context or saved)
    give the outputs and every gradient of x W_i^T + b_i + s_i (x A_i^T) B_i^T: exactly in float64 (up to
    rounding), and within bf16 rounding of the float64 values for a bf16 base with float32 adapters."""
    from gyrfalcon.lora_autograd import LoRAParts, lora_group, lora_linear

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=gen, dtype=torch.float64)
    outs, ranks, scales = [40, 16, 8][:n], [4, 2, 3][:n], [2.5, 0.5, 1.0][:n]
    projs = [dict(w=torch.randn(o, 24, generator=gen, dtype=torch.float64) / 5,
                  b=torch.randn(o, generator=gen, dtype=torch.float64) if bias else None,
                  A=torch.randn(r, 24, generator=gen, dtype=torch.float64) / 5,
                  B=torch.randn(o, r, generator=gen, dtype=torch.float64) / 2,
                  dy=torch.randn(2, 7, o, generator=gen, dtype=torch.float64)) for o, r in zip(outs, ranks)]

    def leaves(base_dtype, adapter_dtype):
        def leaf(t, dt, grad):
            return None if t is None else t.detach().to(dt).requires_grad_(grad)
        xs = leaf(x, base_dtype, True)
        return xs, [LoRAParts(leaf(p["w"], base_dtype, train_base), leaf(p["b"], base_dtype, train_base),
                              leaf(p["A"], adapter_dtype, True), leaf(p["B"], adapter_dtype, True), s)
                    for p, s in zip(projs, scales)]

    xr, ref_parts = leaves(torch.float64, torch.float64)
    refs = [torch.nn.functional.linear(xr, p.weight, p.bias) + p.scale * (xr @ p.lora_A.t()) @ p.lora_B.t()
            for p in ref_parts]
    torch.autograd.backward(refs, [p["dy"] for p in projs])
    xg, parts = leaves(dtype, torch.float32 if dtype == torch.bfloat16 else torch.float64)
    if n == 1 and not layer_end:
        p = parts[0]
        got = [lora_linear(xg, p.weight, p.bias, p.lora_A, p.lora_B, p.scale)]
    else:
        got = lora_group(xg, parts, layer_end=layer_end)
    torch.autograd.backward(got, [p["dy"].to(dtype) for p in projs])
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    for g, r in zip(got, refs):
        assert g.dtype == dtype and g.shape == r.shape and rel_err(g, r) < tol
    pairs = [(xg, xr)] + [(getattr(g, f), getattr(r, f)) for g, r in zip(parts, ref_parts)
                          for f in ("weight", "bias", "lora_A", "lora_B")]
    for g, r in pairs:
        if r is None:
            continue
        if r.requires_grad:
            assert g.grad is not None and g.grad.dtype == g.dtype and rel_err(g.grad, r.grad) < tol
        else:
            assert g.grad is None


def test_project_groups_only_layers_that_offer_their_adapters():
    """project() runs LoRA layers that share an input as one group (one node makes all of their outputs); a plain
    linear layer, or a LoRA layer with dropout in training, makes each layer run on its own, with the same outputs."""
    from gyrfalcon.lora import LoRALinear
    from gyrfalcon.lora_autograd import project

    torch.manual_seed(0)
    layers = [LoRALinear.from_linear(torch.nn.Linear(16, o, bias=False), r=2, alpha=4) for o in (8, 12)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16, requires_grad=True)

    def product_node(y):
        """The autograd node that made y, behind its reshape."""
        node = y.grad_fn
        return node.next_functions[0][0] if type(node).__name__ == "ViewBackward0" else node

    grouped = project(x, layers)
    assert product_node(grouped[0]) is product_node(grouped[1])
    assert type(product_node(grouped[0])).__name__ == "LoRAProductFnBackward"
    for y, layer in zip(grouped, layers):
        assert rel_err(y, layer(x)) < 1e-6
    plain = torch.nn.Linear(16, 4, bias=False)
    mixed = project(x, [layers[0], plain])
    assert product_node(mixed[0]) is not product_node(mixed[1]) and torch.equal(mixed[1], plain(x))
    dropout = LoRALinear.from_linear(torch.nn.Linear(16, 8, bias=False), r=2, alpha=4, dropout=0.5).train()
    assert dropout.lora_parts() is None and dropout.eval().lora_parts() is not None
    separate = project(x, [layers[0], dropout.train()])
    assert product_node(separate[0]) is not product_node(separate[1])


def test_checkpointed_layers_do_not_recompute_down_proj():
    """With activation checkpointing the backward recomputes each layer only up to down_proj's adapter input: the
    down projection's base product runs once in the forward and once in the backward (its input gradient), where
    gate_proj's runs again in the recomputation. The gradients equal those without checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float64, device="cpu", seed=0)
    apply_lora(model, r=4, alpha=8)
    randomize_adapters(model, seed=4)
    model.train()
    layers = model.model.layers
    down = {layer.feed_forward.down_proj.weight.data_ptr() for layer in layers}
    gate = {layer.feed_forward.gate_proj.weight.data_ptr() for layer in layers}

    class ProductCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.down = self.gate = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                ptrs = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
                self.down += bool(ptrs & down)
                self.gate += bool(ptrs & gate)
            return func(*args, **(kwargs or {}))

    ids = torch.randint(3, 512, (2, 30), generator=torch.Generator().manual_seed(1))

    def run(checkpointing: bool):
        model.enable_gradient_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        with ProductCount() as forward:
            loss = model(ids, labels=ids, return_logits=False).loss
        with ProductCount() as backward:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_parameters(model).items()}
        return forward, backward, grads

    forward, backward, grads = run(True)
    n = len(layers)
    assert (forward.down, backward.down) == (n, n)
    assert (forward.gate, backward.gate) == (n, 2 * n)       # the count sees a recomputed product
    _, _, ref_grads = run(False)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-10, atol=1e-14), name


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


@pytest.mark.parametrize("layer_end", [False, True])
def test_changing_a_weight_between_forward_and_backward_is_an_error(layer_end):
    """The product node keeps the weights on its context (not autograd's saved tensors): an in-place change before
    the backward is caught as autograd would catch it, not turned into a wrong gradient."""
    from gyrfalcon.lora import LoRALinear
    from gyrfalcon.lora_autograd import project

    layer = LoRALinear.from_linear(torch.nn.Linear(16, 8, bias=False), r=2, alpha=4)
    x = torch.randn(3, 16, requires_grad=True)
    (y,) = project(x, [layer], layer_end=layer_end)
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        y.sum().backward()


def test_a_plain_model_still_calls_its_mixer_modules():
    """Without adapters nothing is grouped: the uncached forward calls the Mamba mixer and q_proj as modules (so
    forward hooks on them fire), as before grouping existed."""
    model = FalconH1ForCausalLM.from_config(tiny_config(), dtype=torch.float32, device="cpu", seed=0)
    called = []
    layer = model.model.layers[0]
    for name, module in (("mamba", layer.mamba), ("q_proj", layer.self_attn.q_proj),
                         ("down_proj", layer.feed_forward.down_proj)):
        module.register_forward_hook(lambda *args, name=name: called.append(name))
    model(torch.randint(3, 512, (1, 12)))
    assert sorted(called) == ["down_proj", "mamba", "q_proj"]
