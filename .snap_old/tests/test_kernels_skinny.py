"""The few-row product kernels (gyrfalcon/ops/skinny_triton.py) against float64 references: four weights of different
row counts in one launch, the out_proj + o_proj residual sum, down_proj into the residual and the fused gate/up
SwiGLU, at 1-4 rows (CUDA cores; fp32 and bf16) and 5-128 (tensor-core tiles; bf16 and fp16), odd N and K (tiles
cross the edges), strided rows (16-bit results within 2x the eager reference's own error). The same with an RMSNorm
folded into the product at 1-4 rows (of x, x1, or both SwiGLU inputs), on rows of very different scales with a norm
weight far from 1 and an eps that sets one row's norm, so a fold that dropped or misplaced any of them fails.
Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py). Also: the dispatching entries keep
the references where a gradient is needed, there are too many rows or the norm weight is not one the kernels take,
and with a norm weight they are rms_norm_ref followed by the plain op."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops import skinny  # noqa: E402
from gyrfalcon.ops.norm import rms_norm_ref  # noqa: E402
from gyrfalcon.ops.skinny_triton import MODE_SUM, MODE_SWIGLU, multi_linear_triton, pair_linear_triton  # noqa: E402
from helpers import DEV, check_against_float64, rand_on_device, rel_err  # noqa: E402

rand = rand_on_device


def check(got, ref_fn, inputs, dtype):
    check_against_float64(got, ref_fn, inputs, dtype, fp32_tol=1e-5)


# (dtype, rows): the CUDA-core product at 1-4 rows in fp32 and bf16, the tensor-core tiles above in 16-bit dtypes
# (5 and 17 rows pad the tile to 16 and 32 rows; 64 fills it; 128 is skinny.MAX_ROWS)
ROWS = [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 1), (torch.bfloat16, 3), (torch.bfloat16, 5),
        (torch.float16, 17), (torch.bfloat16, 64), (torch.float16, 128)]


@pytest.mark.parametrize(("dtype", "m"), ROWS)
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


@pytest.mark.parametrize(("dtype", "m"), ROWS)
def test_pair_epilogues(dtype, m):
    gen = torch.Generator().manual_seed(5 + m)
    n, k1, k2 = 21, 40, 19
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
    assert not skinny.skinny_ok(x.bfloat16(), w.bfloat16())  # too many rows in any dtype
    assert not skinny.skinny_ok(x[:1].clone().requires_grad_(), w)
    assert skinny.skinny_ok(x[:1], w)
    # more rows than the CUDA cores take: the tensor-core tiles in 16-bit dtypes; fp32 keeps the reference (no tf32)
    rows = skinny.CUDA_CORE_MAX_ROWS + 1
    assert not skinny.skinny_ok(x[:rows], w)
    assert skinny.skinny_ok(x[:rows].bfloat16(), w.bfloat16()) and skinny.skinny_ok(x.half()[:-1], w.half())
    # called directly, the tile kernels refuse a folded norm (skinny.py norms first) and fp32 (it would be tf32)
    bf16_out = torch.empty(rows, 6, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="no folded norm"):
        multi_linear_triton(x[:rows].bfloat16(), [w.bfloat16()], bf16_out, torch.ones(8, device=DEV))
    with pytest.raises(ValueError, match="bf16 or fp16"):
        multi_linear_triton(x[:rows], [w], torch.empty(rows, 6, device=DEV))
    xg = x[:2].clone().requires_grad_()
    out = skinny.linear_residual(torch.zeros(2, 6, device=DEV), xg, w, 1.0)
    assert out.requires_grad  # the reference ran, so the gradient flows


# ------------------------------------------------------------------------------------------- RMSNorm folded in
EPS = 0.01  # against row 0's mean square of 0.0025 (scale 0.05): eps more than halves that row's 1/rms
ROW_SCALES = (0.05, 30.0, 1.0, 0.3, 3.0, 0.1)


def normed_rows(m, k, dtype, gen, nw_dtype):
    """x (m, k) whose rows differ in scale by up to 600x, and a norm weight (k,) of mean 2.5 with both signs."""
    scales = torch.tensor(ROW_SCALES[:m])[:, None]
    x = (torch.randn(m, k, generator=gen) * scales).to(DEV, dtype)
    nw = (2.5 + 1.5 * torch.randn(k, generator=gen)).to(DEV, nw_dtype)
    return x, nw


def assert_norm_matters(got, ref_fn, args, nw):
    """The folded result is far (>1000x the fp32 tolerance) from the same op (in float64) without the norm, with a
    unit norm weight, and with eps 0: the checks against the reference do test each part of the fold."""
    f64 = [[w.double() for w in t] if isinstance(t, list) else t.double() if torch.is_tensor(t) else t for t in args]
    nw = nw.double()
    for other in (ref_fn(*f64), ref_fn(*f64, torch.ones_like(nw), EPS), ref_fn(*f64, nw, 0.0)):
        assert rel_err(got, other) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_multi_linear_folds_rms_norm(dtype, m):
    gen = torch.Generator().manual_seed(10 + m)
    k = 37
    x, nw = normed_rows(m, k, dtype, gen, nw_dtype=dtype)
    weights = [rand(n, k, dtype=dtype, gen=gen, scale=0.2) for n in (13, 5, 1)]
    got = multi_linear_triton(x, weights, torch.empty(m, 19, dtype=dtype, device=DEV), nw, EPS)
    check(got, skinny.multi_linear_ref, (x, weights, nw, EPS), dtype)
    assert_norm_matters(got, skinny.multi_linear_ref, (x, weights), nw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_pair_epilogues_fold_rms_norm_of_x1(dtype, m):
    gen = torch.Generator().manual_seed(20 + m)
    n, k1, k2 = 21, 40, 19
    x1, nw = normed_rows(m, k1, dtype, gen, nw_dtype=dtype)
    x1 = torch.cat([rand(m, 3, dtype=dtype, gen=gen), x1], dim=1)[:, 3:]  # rows with a stride other than k1
    x2 = rand(m, k2, dtype=dtype, gen=gen, scale=5.0)  # never normed: normed, its product would be ~5x smaller
    w1, w2 = rand(n, k1, dtype=dtype, gen=gen, scale=0.2), rand(n, k2, dtype=dtype, gen=gen, scale=0.2)
    res = rand(m, n, dtype=dtype, gen=gen)
    got = pair_linear_triton(x1, w1, x2, w2, res, torch.empty_like(res), 0.7, -1.3, MODE_SUM, nw, EPS)
    check(got, skinny.dual_linear_residual_ref, (res, x1, w1, 0.7, x2, w2, -1.3, nw, EPS), dtype)
    assert_norm_matters(got, skinny.dual_linear_residual_ref, (res, x1, w1, 0.7, x2, w2, -1.3), nw)
    # SwiGLU: the gate and up products both read the normed x1; a norm weight in fp32 whatever x's dtype
    nw32 = nw.float()
    w_up = rand(n, k1, dtype=dtype, gen=gen, scale=0.2)
    got = pair_linear_triton(x1, w1, None, w_up, None, torch.empty(m, n, dtype=dtype, device=DEV), 0.6, 0.0,
                             MODE_SWIGLU, nw32, EPS)
    check(got, skinny.linear_swiglu_ref, (x1, w1, w_up, 0.6, nw32, EPS), dtype)
    assert_norm_matters(got, skinny.linear_swiglu_ref, (x1, w1, w_up, 0.6), nw32)


# one row folds the norm (FOLD_MAX_ROWS); three run the norm first; six run it before the tensor-core tiles
@pytest.mark.parametrize(("m", "dtype"), [(1, torch.float32), (3, torch.float32), (6, torch.bfloat16)])
def test_norm_weight_is_rms_norm_ref_then_the_plain_op(monkeypatch, m, dtype):
    gen = torch.Generator().manual_seed(3)
    k, n = 24, 10
    x, nw = normed_rows(m, k, dtype, gen, nw_dtype=torch.float32)
    w1, w2 = rand(n, k, dtype=dtype, gen=gen), rand(n, k, dtype=dtype, gen=gen)
    x2, res = rand(m, k, dtype=dtype, gen=gen), rand(m, n, dtype=dtype, gen=gen)
    h = rms_norm_ref(x, nw, EPS).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the kernel and the reference round the norm differently
    ops = {  # each public op of x and, optionally, (norm_weight, eps)
        "multi_linear": lambda x, *norm: skinny.multi_linear(x, [w1, w2], *norm),
        "dual_linear_residual": lambda x, *norm: skinny.dual_linear_residual(res, x, w1, 0.7, x2, w2, -1.3, *norm),
        "linear_swiglu": lambda x, *norm: skinny.linear_swiglu(x, w1, w2, 0.6, *norm),
        "linear_scaled": lambda x, *norm: skinny.linear_scaled(x, w1, 0.45, *norm),
    }
    monkeypatch.setattr(skinny, "kernels_enabled", lambda *tensors: False)  # the reference path (as on a CPU)
    for name, op in ops.items():
        assert torch.equal(op(x, nw, EPS), op(h)), name
    monkeypatch.setattr(skinny, "kernels_enabled", lambda *tensors: True)  # as on a GPU: the kernels run
    for name, op in ops.items():
        assert rel_err(op(x, nw, EPS), op(h)) <= tol, name
    # norm weights the kernels do not take: the dispatch keeps the references
    assert skinny.norm_ok(x, nw) and skinny.norm_ok(x, None) and skinny.norm_ok(x, nw.bfloat16())
    assert not skinny.norm_ok(x, nw.double())
    assert not skinny.norm_ok(x, torch.cat([nw, nw])[::2])  # not contiguous
    assert not skinny.norm_ok(x, nw[:-1])
    assert not skinny.norm_ok(x, nw[None])
    assert not skinny.norm_ok(x, nw.clone().requires_grad_())
    with torch.no_grad():
        assert skinny.norm_ok(x, nw.clone().requires_grad_())
    xg = x.clone().requires_grad_()
    assert skinny.multi_linear(xg, [w1], nw, EPS).requires_grad  # the reference ran, so the gradient flows
