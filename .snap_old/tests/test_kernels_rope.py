"""The RoPE kernel (gyrfalcon/ops/rope_triton.py) against the float64 reference, forward and backward: q and k as
the model lays them out (transposed views of the projections), GQA head counts, a padded head dim, fp32 and bf16
(bf16 within 2x eager's own error). Runs in Triton's CPU interpreter without a GPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops.rope import apply_rope_ref, rope_cos_sin, rope_inv_freq  # noqa: E402
from gyrfalcon.ops.rope_triton import rope_triton  # noqa: E402
from helpers import BF16_FLOOR, DEV, rel_err  # noqa: E402


@pytest.mark.parametrize("dtype, h, d", [(torch.float32, 5, 16), (torch.bfloat16, 3, 32), (torch.float32, 2, 24)])
def test_rope_forward_and_backward(dtype, h, d):
    gen = torch.Generator().manual_seed(0)
    b, l = 2, 13
    proj = (torch.randn(b, l, h * d + 7, generator=gen)).to(DEV, dtype)                # a wider projection output
    x = proj[..., :h * d].view(b, l, h, d).transpose(1, 2).detach().requires_grad_()   # (b, h, l, d), strided
    positions = torch.arange(l, device=DEV).expand(b, l) + torch.tensor([[0], [5]], device=DEV)
    inv_freq, scaling = rope_inv_freq({"rope_type": "default", "rope_theta": 10000.0}, d, 4096, device=DEV)
    cos, sin = rope_cos_sin(positions, inv_freq, scaling, dtype)
    dy = torch.randn(b, h, l, d, generator=gen).to(DEV, dtype)

    def run(fn, x, cos, sin):
        out = fn(x, cos, sin)
        return [out.detach(), *torch.autograd.grad(out, [x], dy.to(out.dtype))]

    def reference(x, cos, sin):
        return apply_rope_ref(x, x, cos, sin)[0]

    got = run(rope_triton, x, cos, sin)
    exact = run(reference, x.detach().double().requires_grad_(), cos.double(), sin.double())
    eager = run(reference, x, cos, sin)
    for name, a, e, ref in zip(("out", "dx"), got, eager, exact):
        assert a.shape == ref.shape
        if dtype == torch.float32:
            assert rel_err(a, ref) <= 1e-6, name
        else:
            assert rel_err(a, ref) <= 2 * rel_err(e, ref) + BF16_FLOOR, name
