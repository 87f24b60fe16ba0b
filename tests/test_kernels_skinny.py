"""The few-row product kernels (gyrfalcon/ops/skinny_triton.py) against float64 references: four weights of
different row counts in one launch, the out_proj + o_proj residual sum, down_proj into the residual and the fused
gate/up SwiGLU, at 1-4 rows, odd N and K (tiles cross the edges), strided rows; fp32 and bf16 (bf16 within 2x the
eager reference's own error). Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py). Also:
the dispatching entries keep the references where a gradient is needed or there are too many rows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops import skinny  # noqa: E402
from gyrfalcon.ops.skinny_triton import MODE_SUM, MODE_SWIGLU, multi_linear_triton, pair_linear_triton  # noqa: E402
from helpers import DEV, check_against_float64, rand_on_device  # noqa: E402

rand = rand_on_device


def check(got, ref_fn, inputs, dtype):
    check_against_float64(got, ref_fn, inputs, dtype, fp32_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_multi_linear_concatenates_four_products(dtype, m):
    gen = torch.Generator().manual_seed(m)
    k = 37
    x = rand(m, k, dtype=dtype, gen=gen)
    weights = [rand(n, k, dtype=dtype, gen=gen, scale=0.2) for n in (13, 5, 8, 1)]
    out = torch.empty(m, 27, dtype=dtype, device=DEV)
    check(multi_linear_triton(x, weights, out), skinny.multi_linear_ref, (x, weights), dtype)
    two = weights[:2]  # fewer than four weights: the unused segments are empty
    check(multi_linear_triton(x, two, torch.empty(m, 18, dtype=dtype, device=DEV)), skinny.multi_linear_ref,
          (x, two), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pair_epilogues(dtype):
    gen = torch.Generator().manual_seed(5)
    m, n, k1, k2 = 2, 21, 40, 19
    wide = rand(m, 50, dtype=dtype, gen=gen)
    x1 = wide[:, 3:3 + k1]                     # rows with a stride other than k1
    x2 = rand(m, k2, dtype=dtype, gen=gen)
    w1, w2 = rand(n, k1, dtype=dtype, gen=gen, scale=0.2), rand(n, k2, dtype=dtype, gen=gen, scale=0.2)
    res = rand(m, n, dtype=dtype, gen=gen)
    got = pair_linear_triton(x1, w1, x2, w2, res, torch.empty_like(res), 0.7, -1.3, MODE_SUM)
    check(got, skinny.dual_linear_residual_ref, (res, x1, w1, 0.7, x2, w2, -1.3), dtype)
    got = pair_linear_triton(x1, w1, None, None, res, torch.empty_like(res), 2.5, 0.0, MODE_SUM)
    check(got, skinny.linear_residual_ref, (res, x1, w1, 2.5), dtype)
    w_up = rand(n, k1, dtype=dtype, gen=gen, scale=0.2)
    got = pair_linear_triton(x1, w1, None, w_up, None, torch.empty(m, n, dtype=dtype, device=DEV), 0.6, 0.0,
                             MODE_SWIGLU)
    check(got, skinny.linear_swiglu_ref, (x1, w1, w_up, 0.6), dtype)


def test_dispatch_keeps_references_for_gradients_and_many_rows(monkeypatch):
    monkeypatch.setattr(skinny, "kernels_enabled", lambda *tensors: True)  # as on a GPU
    gen = torch.Generator().manual_seed(2)
    w = rand(6, 8, dtype=torch.float32, gen=gen)
    x = rand(skinny.MAX_ROWS + 1, 8, dtype=torch.float32, gen=gen)
    assert not skinny.skinny_ok(x, w)
    assert not skinny.skinny_ok(x[:1].clone().requires_grad_(), w)
    assert skinny.skinny_ok(x[:1], w)
    xg = x[:2].clone().requires_grad_()
    out = skinny.linear_residual(torch.zeros(2, 6, device=DEV), xg, w, 1.0)
    assert out.requires_grad  # the reference ran, so the gradient flows
