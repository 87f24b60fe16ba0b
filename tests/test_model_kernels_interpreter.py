"""The whole model with every Triton kernel taking its call (run by Triton's CPU interpreter, as on a GPU the
dispatch would choose them) against the pure-PyTorch references: the prefill's logits, and greedy decoding through
the cache (fused RoPE + KV store, decode attention, residual and SwiGLU kernels, conv update, SSD step) token for
token. The dispatch check is patched to accept CPU tensors; tests/conftest.py sets TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM  # noqa: E402
from gyrfalcon.generate import generate  # noqa: E402
from gyrfalcon.ops import conv, dispatch, fused, norm, ssd  # noqa: E402
from helpers import rel_err  # noqa: E402


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    def patch():
        for module in (conv, dispatch, fused, norm, ssd):
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
