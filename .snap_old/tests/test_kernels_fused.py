"""The fused inference kernels (gyrfalcon/ops/fused_triton.py) against float64 references: residual mixes, the
SwiGLU gate, and RoPE + KV-cache store for a decode step (odd batch, GQA, strided inputs, a padded head dim), in
fp32 and bf16 (bf16 within 2x the reference's own error in bf16). Without a GPU the kernels run in Triton's CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Also: the dispatching entries keep the references where a
gradient is needed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops import fused  # noqa: E402
from gyrfalcon.ops.fused_triton import (residual_mix_triton, rope_store_decode_triton,  # noqa: E402
                                        swiglu_triton)
from helpers import BF16_FLOOR, DEV, check_against_float64, rand_on_device, rel_err  # noqa: E402

F64 = torch.float64
rand = rand_on_device


def check(got, ref_fn, inputs, dtype):
    check_against_float64(got, ref_fn, inputs, dtype, fp32_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_mix_add_and_swiglu(dtype):
    gen = torch.Generator().manual_seed(0)
    x, m, a = (rand(3, 5, 333, dtype=dtype, gen=gen) for _ in range(3))
    check(residual_mix_triton(x, m, a, 0.37, 1.9), fused.residual_mix_ref, (x, m, a, 0.37, 1.9), dtype)
    check(residual_mix_triton(x, m, None, 0.8, 0.0), fused.residual_add_ref, (x, m, 0.8), dtype)
    g, u = rand(7, 1100, dtype=dtype, gen=gen, scale=3.0), rand(7, 1100, dtype=dtype, gen=gen)
    check(swiglu_triton(g, u, 0.6), fused.swiglu_ref, (g, u, 0.6), dtype)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 24)])
def test_rope_store_decode(dtype, d):
    gen = torch.Generator().manual_seed(1)
    b, hq, hk, capacity = 3, 6, 2, 11
    # q, k, v as slices of one projection output row, as the model's views are (strided heads)
    qkv = rand(b, (hq + 2 * hk) * d + 5, dtype=dtype, gen=gen)
    q = qkv[:, :hq * d].view(b, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(b, hk, d)
    v = qkv[:, (hq + hk) * d:(hq + 2 * hk) * d].view(b, hk, d)
    angles = torch.rand(b, d // 2, generator=gen) * 6
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(DEV, dtype), emb.sin().to(DEV, dtype)
    positions = torch.tensor([0, 7, 10], device=DEV)
    k_cache = rand(b, hk, capacity, d, dtype=dtype, gen=gen)
    v_cache = rand(b, hk, capacity, d, dtype=dtype, gen=gen)
    k_ref, v_ref = k_cache.to(F64), v_cache.to(F64)

    q_rot = rope_store_decode_triton(q, k, v, cos, sin, 1.7, k_cache, v_cache, positions, 0.6, 1.3)
    q_exact = fused.rope_store_decode_ref(q.to(F64), k.to(F64), v.to(F64), cos.to(F64), sin.to(F64), 1.7,
                                          k_ref, v_ref, positions, 0.6, 1.3)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert rel_err(q_rot, q_exact) <= tol
    assert rel_err(k_cache, k_ref) <= tol and rel_err(v_cache, v_ref) <= tol
    for row, pos in enumerate(positions.tolist()):  # every other column of the caches is left as it was
        others = [c for c in range(capacity) if c != pos]
        assert torch.equal(k_cache[row][:, others].to(F64), k_ref[row][:, others])
        assert torch.equal(v_cache[row][:, others].to(F64), v_ref[row][:, others])


def test_dispatch_keeps_references_where_gradients_flow():
    x = torch.randn(4, 8, requires_grad=True)
    m, a = torch.randn(4, 8), torch.randn(4, 8)
    out = fused.residual_mix(x, m, a, 0.5, 2.0)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with torch.no_grad():  # on the CPU the reference runs here too: same values
        assert torch.equal(fused.residual_mix(x, m, a, 0.5, 2.0), fused.residual_mix_ref(x, m, a, 0.5, 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_and_gradients(dtype):
    from gyrfalcon.ops.fused_triton import SwiGLUFn

    gen = torch.Generator().manual_seed(4)
    g = rand(5, 777, dtype=dtype, gen=gen, scale=3.0).requires_grad_()
    u = rand(5, 777, dtype=dtype, gen=gen).requires_grad_()
    dout = rand(5, 777, dtype=dtype, gen=gen)

    def run(fn, *inputs):
        out = fn(*inputs, 0.6)
        return [out.detach(), *torch.autograd.grad(out, inputs, dout.to(out.dtype))]

    got = run(SwiGLUFn.apply, g, u)
    exact = run(fused.swiglu_ref, g.detach().double().requires_grad_(), u.detach().double().requires_grad_())
    eager = run(fused.swiglu_ref, g, u)
    for name, a, e, ref in zip(("out", "dg", "du"), got, eager, exact):
        if dtype == torch.float32:
            assert rel_err(a, ref) <= 1e-6, name
        else:
            assert rel_err(a, ref) <= 2 * rel_err(e, ref) + BF16_FLOOR, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_mix_norm(dtype):
    from gyrfalcon.ops.fused_triton import residual_mix_norm_triton
    from gyrfalcon.ops.norm import rms_norm_ref

    gen = torch.Generator().manual_seed(5)
    x, m, a = (rand(2, 3, 200, dtype=dtype, gen=gen) for _ in range(3))
    weight = (1 + 0.1 * torch.randn(200, generator=gen)).to(DEV, dtype)
    new, normed = residual_mix_norm_triton(x, m, a, 0.4, 1.3, weight, 1e-5)

    def reference(x, m, a, weight):
        out = fused.residual_mix_ref(x, m, a, 0.4, 1.3)
        return out, rms_norm_ref(out, weight, 1e-5)

    exact = reference(*(t.double() for t in (x, m, a, weight)))
    eager = reference(x, m, a, weight)
    for got, e, ref in zip((new, normed), eager, exact):
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(got, ref) <= 1e-6
        else:
            assert rel_err(got, ref) <= 2 * rel_err(e, ref) + BF16_FLOOR


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", ["both", "norm_only", "new_only"])
def test_residual_mix_norm_gradients(dtype, grads):
    """ResidualMixNormFn: the gradients of x, m, a and the norm weight against float64 autograd of the reference,
    with a gradient arriving on both outputs, on the normed output only, or on the residual only (the other None).
    Rows of 333 channels (odd, masked) and fewer programs than rows (each program walks several)."""
    from gyrfalcon.ops.fused_triton import ResidualMixNormFn
    from gyrfalcon.ops.norm import rms_norm_ref

    gen = torch.Generator().manual_seed(7)
    x, m, a = (rand(3, 5, 333, dtype=dtype, gen=gen) for _ in range(3))
    weight = (1 + 0.1 * torch.randn(333, generator=gen)).to(DEV, dtype)
    d_new, d_norm = (rand(3, 5, 333, dtype=dtype, gen=gen) for _ in range(2))

    def run(fn, leaves):
        new, normed = fn(*leaves)
        outs, cots = [], []
        if grads in ("both", "new_only"):
            outs.append(new), cots.append(d_new.to(new.dtype))
        if grads in ("both", "norm_only"):
            outs.append(normed), cots.append(d_norm.to(normed.dtype))
        return torch.autograd.grad(outs, leaves, cots, allow_unused=True)

    def reference(x, m, a, w):
        new = fused.residual_mix_ref(x, m, a, 0.4, 1.3)
        return new, rms_norm_ref(new, w, 1e-5)

    leaves = [t.detach().requires_grad_() for t in (x, m, a, weight)]
    got = run(lambda *t: ResidualMixNormFn.apply(t[0], t[1], t[2], 0.4, 1.3, t[3], 1e-5), leaves)
    exact = run(reference, [t.detach().double().requires_grad_() for t in (x, m, a, weight)])
    eager = run(reference, [t.detach().requires_grad_() for t in (x, m, a, weight)])
    for name, g, e, ref in zip(("x", "m", "a", "weight"), got, eager, exact):
        if ref is None:      # the weight gets no gradient when none arrives on the normed output
            assert g is None or not g.abs().any(), name
            continue
        assert g.dtype == dtype, name
        if dtype == torch.float32:
            assert rel_err(g, ref) <= 1e-5, name
        else:
            assert rel_err(g, ref) <= 2 * rel_err(e, ref) + BF16_FLOOR, name


def test_residual_add_gradients():
    from gyrfalcon.ops.fused_triton import ResidualAddFn

    gen = torch.Generator().manual_seed(8)
    x, y, dout = (rand(4, 77, dtype=torch.float32, gen=gen) for _ in range(3))
    x.requires_grad_(), y.requires_grad_()
    out = ResidualAddFn.apply(x, y, 0.7)
    assert rel_err(out, x.double() + 0.7 * y.double()) <= 1e-6
    dx, dy = torch.autograd.grad(out, (x, y), dout)
    assert torch.equal(dx, dout) and rel_err(dy, 0.7 * dout.double()) <= 1e-6
