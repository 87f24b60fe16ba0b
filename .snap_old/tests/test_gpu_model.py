"""On the GPU, at the released shapes (a few layers each): gyrfalcon with its Triton kernels against gyrfalcon on
the pure-PyTorch references and against transformers, all in bf16 and all measured against a float64 run of the
same weights. The kernel path may be off by at most 2x what the bf16 reference path is off by (plus a floor of
1e-3 relative for numbers that are tiny in bf16 terms). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.ops import use_reference
from helpers import randomize_

pytestmark = pytest.mark.gpu

SHAPES = {  # preset, overrides to keep a test short
    "0.5B": {"num_hidden_layers": 3},
    "7B": {"num_hidden_layers": 2, "vocab_size": 32768},
    "34B": {"num_hidden_layers": 2, "vocab_size": 32768},
}


def run(model, ids, reference: bool):
    model.zero_grad(set_to_none=True)
    with use_reference(reference):
        out = model(ids, labels=ids)
        out.loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return out.logits.double(), grads


def err(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernels_match_references_at_released_shapes(shape, tmp_path):
    config = FalconH1Config.from_preset(shape, **SHAPES[shape])
    base = randomize_(FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu"), seed=0)
    base.save_pretrained(tmp_path / "m")
    ref64 = FalconH1ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64, device="cuda")
    bf16 = FalconH1ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, config.vocab_size, (2, 300), device="cuda")  # 300: not a multiple of any chunk size
    logits64, grads64 = run(ref64, ids, reference=True)
    logits_ref, grads_ref = run(bf16, ids, reference=True)
    logits_k, grads_k = run(bf16, ids, reference=False)
    assert torch.isfinite(logits_k).all() and torch.isfinite(grads_k).all()
    assert err(logits_k, logits64) <= max(2 * err(logits_ref, logits64), 1e-3)
    assert err(grads_k, grads64) <= max(2 * err(grads_ref, grads64), 1e-3)


def test_matches_transformers_on_gpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = FalconH1Config.from_preset("0.5B", num_hidden_layers=2)
    base = randomize_(FalconH1ForCausalLM.from_config(config, dtype=torch.float32, device="cpu"), seed=1)
    base.save_pretrained(tmp_path / "m")
    ours = FalconH1ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device="cuda")
    theirs = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).cuda()
    ids = torch.randint(0, config.vocab_size, (2, 300), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        a = ours(ids).logits.double()
        b = theirs(input_ids=ids).logits.double()
    # fp32 on GPU: the kernels and transformers' torch path agree to float32 rounding of 2 layers
    assert err(a, b) <= 1e-4
