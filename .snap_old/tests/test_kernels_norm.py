"""Triton RMSNorm and gated grouped RMSNorm kernels (gyrfalcon/ops/norm_triton.py) against the float64 references:
forward and every gradient, both gate orders, the plain gate (no weight), one and several groups, mixed input dtypes,
strided inputs, frozen weights, and low precision measured against eager PyTorch's own error.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1): small odd
shapes. The `gpu` tests run the real model shapes: python -m pytest tests/test_kernels_norm.py -m gpu
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops.norm import gated_rms_norm_ref, rms_norm_ref  # noqa: E402
from gyrfalcon.ops.norm_triton import gated_rms_norm_triton, rms_norm_triton  # noqa: E402
from helpers import BF16_FLOOR, DEV, rel_err  # noqa: E402

F64 = torch.float64
EPS = 1e-5
gpu = pytest.mark.gpu


def rand(*shape, dtype=torch.float32, scale=1.0, shift=0.0, gen, grad=True):
    t = (torch.randn(*shape, generator=gen) * scale + shift).to(DEV, dtype)
    return t.requires_grad_(grad)


def forward_and_grads(fn, inputs, cot):
    """fn(*inputs), and the gradients of sum(out * cot) w.r.t. the inputs that require them."""
    out = fn(*inputs)
    used = [t for t in inputs if t is not None and t.requires_grad]
    return [out.detach(), *torch.autograd.grad((out.to(F64) * cot).sum(), used)], out.dtype


def f64(inputs):
    return [t.detach().to(F64).requires_grad_(t.requires_grad) if t is not None else None for t in inputs]


def compare(kernel, eager, inputs, cot, floor=None):
    """fp32 (floor None): kernel within 1e-5 of float64. Low precision: within twice eager's error plus floor."""
    got, out_dtype = forward_and_grads(kernel, inputs, cot)
    want, _ = forward_and_grads(eager, f64(inputs), cot)
    eager_vals = forward_and_grads(eager, inputs, cot)[0] if floor is not None else [None] * len(got)
    for g, w, e in zip(got, want, eager_vals):
        assert g.shape == w.shape
        if floor is None:
            assert rel_err(g, w) <= 1e-5
        else:
            assert rel_err(g, w) <= 2 * rel_err(e, w) + floor, (rel_err(g, w), rel_err(e, w))
    return out_dtype


# -------------------------------------------------------------------------------------------------------- RMSNorm

def rms_k(x, w):
    return rms_norm_triton(x, w, EPS)


def rms_e(x, w):
    return rms_norm_ref(x, w, EPS)


@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 100), (5, 1, 64)])
def test_rms_norm_fp32_matches_float64(shape):
    gen = torch.Generator().manual_seed(0)
    x, w = rand(*shape, gen=gen, scale=2.0, shift=0.5), rand(shape[-1], gen=gen, shift=1.0)
    cot = torch.randn(shape, generator=gen).to(DEV, F64)
    compare(rms_k, rms_e, [x, w], cot)


@pytest.mark.parametrize("x_dtype, w_dtype, floor", [(torch.bfloat16, torch.bfloat16, BF16_FLOOR),
                                                     (torch.bfloat16, torch.float32, BF16_FLOOR),
                                                     (torch.float16, torch.float16, 2 ** -11)])
def test_rms_norm_low_precision_within_twice_eager(x_dtype, w_dtype, floor):
    gen = torch.Generator().manual_seed(1)
    x, w = rand(4, 9, 37, dtype=x_dtype, gen=gen), rand(37, dtype=w_dtype, gen=gen, shift=1.0)
    cot = torch.randn(4, 9, 37, generator=gen).to(torch.promote_types(x_dtype, w_dtype)).to(DEV, F64)
    out_dtype = compare(rms_k, rms_e, [x, w], cot, floor)
    assert out_dtype == torch.promote_types(x_dtype, w_dtype)


def test_rms_norm_frozen_weight_and_strided_rows():
    """A frozen weight (the LoRA case: no weight gradient) and x as a column slice of a wider tensor."""
    gen = torch.Generator().manual_seed(2)
    wide = rand(6, 80, gen=gen)
    w = rand(37, gen=gen, shift=1.0, grad=False)
    cot = torch.randn(6, 37, generator=gen).to(DEV, F64)
    out = rms_norm_triton(wide[:, 10:47], w, EPS)
    (dwide,) = torch.autograd.grad((out.to(F64) * cot).sum(), [wide])
    wide64 = wide.detach().to(F64).requires_grad_()
    out64 = rms_norm_ref(wide64[:, 10:47], w.to(F64), EPS)
    (dwide64,) = torch.autograd.grad((out64 * cot).sum(), [wide64])
    assert rel_err(out, out64) <= 1e-5 and rel_err(dwide, dwide64) <= 1e-5


def test_rms_norm_weight_gradient_sums_many_rows_per_program():
    """More rows than backward programs (4 per SM): each program walks several rows."""
    gen = torch.Generator().manual_seed(3)
    x, w = rand(150, 19, gen=gen), rand(19, gen=gen, shift=1.0)
    compare(rms_k, rms_e, [x, w], torch.randn(150, 19, generator=gen).to(DEV, F64))


# --------------------------------------------------------------------------------------------- gated grouped norm

def gated(fn, groups, before, out_dtype=None):
    """fn with its options fixed; float64 inputs (the reference run) also give a float64 output."""
    def call(y, z, w):
        dtype = F64 if y.dtype == F64 else out_dtype
        return fn(y, z, w, eps=EPS, n_groups=groups, norm_before_gate=before, out_dtype=dtype)
    return call


GATED_CASES = [  # weight, groups, norm_before_gate
    (True, 1, False), (True, 3, False), (True, 1, True), (True, 3, True), (False, 1, False),
]


@pytest.mark.parametrize("weight, groups, before", GATED_CASES)
def test_gated_norm_fp32_matches_float64(weight, groups, before):
    gen = torch.Generator().manual_seed(4)
    y, z = rand(3, 7, 36, gen=gen), rand(3, 7, 36, gen=gen)
    w = rand(36, gen=gen, shift=1.0) if weight else None
    cot = torch.randn(3, 7, 36, generator=gen).to(DEV, F64)
    compare(gated(gated_rms_norm_triton, groups, before), gated(gated_rms_norm_ref, groups, before), [y, z, w], cot)


@pytest.mark.parametrize("weight, before", [(True, False), (True, True), (False, False)])
def test_gated_norm_z_scale(weight, before):
    """z_scale multiplies z as it is read: the same as scaling z first, forward and every gradient (dz included)."""
    gen = torch.Generator().manual_seed(9)
    y, z = rand(2, 5, 24, gen=gen), rand(2, 5, 24, gen=gen)
    w = rand(24, gen=gen, shift=1.0) if weight else None
    cot = torch.randn(2, 5, 24, generator=gen).to(DEV, F64)

    def scaled(fn):
        def call(y, z, w):
            return fn(y, z, w, eps=EPS, n_groups=2 if weight else 1, norm_before_gate=before, z_scale=0.35,
                      out_dtype=F64 if y.dtype == F64 else None)
        return call

    def by_definition(y, z, w):
        return gated_rms_norm_ref(y, z * 0.35, w, eps=EPS, n_groups=2 if weight else 1, norm_before_gate=before)

    compare(scaled(gated_rms_norm_triton), by_definition, [y, z, w], cot)
    compare(scaled(gated_rms_norm_ref), by_definition, [y, z, w], cot)


def test_gated_gate_only_odd_width():
    gen = torch.Generator().manual_seed(5)
    y, z = rand(2, 5, 37, gen=gen), rand(2, 5, 37, gen=gen)
    cot = torch.randn(2, 5, 37, generator=gen).to(DEV, F64)
    compare(gated(gated_rms_norm_triton, 1, False), gated(gated_rms_norm_ref, 1, False), [y, z, None], cot)


@pytest.mark.parametrize("y_dtype, weight, groups, before", [(torch.float32, True, 2, False),
                                                             (torch.bfloat16, True, 1, True),
                                                             (torch.bfloat16, False, 1, False)])
def test_gated_norm_bf16_within_twice_eager(y_dtype, weight, groups, before):
    """y in fp32 (the scan's output) or bf16, z and the output in bf16."""
    gen = torch.Generator().manual_seed(6)
    y, z = rand(4, 9, 40, dtype=y_dtype, gen=gen), rand(4, 9, 40, dtype=torch.bfloat16, gen=gen)
    w = rand(40, dtype=torch.bfloat16, gen=gen, shift=1.0) if weight else None
    cot = torch.randn(4, 9, 40, generator=gen).to(torch.bfloat16).to(DEV, F64)
    out_dtype = compare(gated(gated_rms_norm_triton, groups, before, torch.bfloat16),
                        gated(gated_rms_norm_ref, groups, before, torch.bfloat16), [y, z, w], cot, floor=BF16_FLOOR)
    assert out_dtype == torch.bfloat16


def test_gated_norm_strided_gate_frozen_weight_fp32_out():
    """z as a slice of in_proj's output (row stride != d), weight without gradient, fp32 output from bf16 inputs."""
    gen = torch.Generator().manual_seed(7)
    zx = rand(2, 5, 90, dtype=torch.bfloat16, gen=gen)
    y = rand(2, 5, 24, dtype=torch.bfloat16, gen=gen)
    w = rand(24, gen=gen, shift=1.0, grad=False)
    cot = torch.randn(2, 5, 24, generator=gen).to(DEV, F64)
    kw = dict(eps=EPS, n_groups=2, norm_before_gate=False, out_dtype=torch.float32)
    out = gated_rms_norm_triton(y, zx[..., 30:54], w, **kw)
    dy, dzx = torch.autograd.grad((out.to(F64) * cot).sum(), [y, zx])
    y64, zx64 = y.detach().to(F64).requires_grad_(), zx.detach().to(F64).requires_grad_()
    out64 = gated_rms_norm_ref(y64, zx64[..., 30:54], w.to(F64), **kw)
    dy64, dzx64 = torch.autograd.grad((out64 * cot).sum(), [y64, zx64])
    assert out.dtype == torch.float32 and rel_err(out, out64) <= 1e-5
    assert rel_err(dy, dy64) <= BF16_FLOOR and rel_err(dzx, dzx64) <= BF16_FLOOR      # stored in bf16
    assert dzx[..., :30].abs().max() == 0 and dzx[..., 54:].abs().max() == 0


def test_empty_input_and_bad_groups():
    w = torch.ones(12, device=DEV, requires_grad=True)
    x = torch.randn(0, 12, device=DEV, requires_grad=True)
    out = rms_norm_triton(x, w, EPS)
    assert out.shape == (0, 12)
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(ValueError):
        gated_rms_norm_triton(torch.randn(2, 12, device=DEV), torch.randn(2, 12, device=DEV), w.detach(), n_groups=5)


# ------------------------------------------------------------------------------------------------ GPU, real shapes

RMS_SHAPES = {"0.5B": (4 * 2048, 1024), "7B": (8192, 3072), "34B": (4096, 5120)}
GATED_SHAPES = {  # rows, d_ssm, weight, groups, norm_before_gate
    "0.5B": (4 * 2048, 1536, False, 1, False), "1.5B": (4 * 2048, 3072, True, 1, False),
    "7B": (8192, 3072, True, 1, False), "34B": (4096, 4096, True, 2, False), "34B-before": (4096, 4096, True, 2, True),
}


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(RMS_SHAPES))
def test_gpu_rms_norm_real_shapes_bf16(name):
    n, d = RMS_SHAPES[name]
    gen = torch.Generator().manual_seed(8)
    x, w = rand(n, d, dtype=torch.bfloat16, gen=gen), rand(d, dtype=torch.bfloat16, gen=gen, shift=1.0)
    cot = torch.randn(n, d, generator=gen).to(torch.bfloat16).to(DEV, F64)
    compare(rms_k, rms_e, [x, w], cot, floor=BF16_FLOOR)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(GATED_SHAPES))
def test_gpu_gated_norm_real_shapes_bf16(name):
    n, d, weight, groups, before = GATED_SHAPES[name]
    gen = torch.Generator().manual_seed(9)
    y, z = rand(n, d, dtype=torch.bfloat16, gen=gen), rand(n, d, dtype=torch.bfloat16, gen=gen)
    w = rand(d, dtype=torch.bfloat16, gen=gen, shift=1.0) if weight else None
    cot = torch.randn(n, d, generator=gen).to(torch.bfloat16).to(DEV, F64)
    compare(gated(gated_rms_norm_triton, groups, before), gated(gated_rms_norm_ref, groups, before), [y, z, w], cot,
            floor=BF16_FLOOR)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_public_entries_dispatch_to_kernels():
    from gyrfalcon import ops
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert "RMSNormFn" in type(ops.rms_norm(x, w, EPS).grad_fn).__name__
    assert "GatedRMSNormFn" in type(ops.gated_rms_norm(x, x, w).grad_fn).__name__
    with ops.use_reference():
        assert "RMSNormFn" not in type(ops.rms_norm(x, w, EPS).grad_fn).__name__
