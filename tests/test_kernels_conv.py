"""Triton causal conv1d kernels (gyrfalcon/ops/conv_triton.py) against the float64 reference: forward, every gradient
(x, weight, bias, initial state, and through the final state), packed documents, state carry-over between pieces,
strided inputs, and the decode update (step by step == the whole sequence; slot selection).

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
are small and odd, with a launch shape of small blocks and chunks so that every boundary is crossed.
The `gpu` tests run the real model shapes in bf16: python -m pytest tests/test_kernels_conv.py -m gpu
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gyrfalcon.ops.conv import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402
from gyrfalcon.ops.conv_triton import (ConvLaunch, _align, _param_grads, causal_conv1d_triton,  # noqa: E402
                                       causal_conv1d_update_triton, default_launch)
from helpers import BF16_FLOOR, DEV, rel_err  # noqa: E402

F64 = torch.float64
SMALL = ConvLaunch(block_d=16, chunk_l=8, num_warps=1)  # 37 channels -> 3 blocks, 37 tokens -> 5 chunks
gpu = pytest.mark.gpu


def make_inputs(b, l, d, k, *, bias=True, init=True, seq=None, dtype=torch.float32, seed=0):
    """Random leaves (x, weight, bias, initial_state) in `dtype` plus seq_idx from document lengths per row."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype).requires_grad_()

    leaves = dict(x=r(b, l, d), weight=r(d, k, scale=0.5), bias=r(d, scale=0.3) if bias else None,
                  initial_state=r(b, d, k - 1) if init else None)
    seq_idx = None
    if seq is not None:
        seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in seq])
        seq_idx = seq_idx.to(DEV, torch.int32)
    return leaves, seq_idx


def as_f64(leaves):
    return {k: (v.detach().to(F64).requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in leaves.items()}


def run(fn, leaves, seq_idx, activation, final, cotangents, **kw):
    """Outputs of fn and the gradients of sum(out * cotangent) w.r.t. every leaf that requires one."""
    out = fn(leaves["x"], leaves["weight"], leaves["bias"], activation=activation, seq_idx=seq_idx,
             initial_state=leaves["initial_state"], return_final_state=final, **kw)
    outs = out if final else (out,)
    loss = sum((o.to(F64) * c).sum() for o, c in zip(outs, cotangents))
    used = [v for v in leaves.values() if v is not None and v.requires_grad]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, used))


def cotangents_for(b, l, d, k, final, dtype, seed=7):
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(b, l, d, generator=gen).to(dtype)]
    if final:
        cots.append(torch.randn(b, d, k - 1, generator=gen).to(dtype))
    return [c.to(DEV, F64) for c in cots]


CASES = [  # b, l, d, k, bias, init, seq (document lengths per row), activation, final
    (2, 37, 37, 4, True, True, None, "silu", True),
    (2, 37, 37, 4, True, False, [[9, 1, 20, 7], [37]], "silu", False),
    (2, 7, 20, 3, False, True, [[3, 4], [1, 6]], None, True),
    (1, 1, 5, 4, True, True, None, "silu", True),           # shorter than the window: final state reaches history
    (3, 2, 9, 2, True, True, [[1, 1], [2], [2]], "silu", True),
]


@pytest.mark.parametrize("b, l, d, k, bias, init, seq, activation, final", CASES)
def test_fp32_forward_and_gradients_match_float64(b, l, d, k, bias, init, seq, activation, final):
    leaves, seq_idx = make_inputs(b, l, d, k, bias=bias, init=init, seq=seq)
    cots = cotangents_for(b, l, d, k, final, torch.float32)
    outs, grads = run(causal_conv1d_triton, leaves, seq_idx, activation, final, cots, launch=SMALL)
    outs64, grads64 = run(causal_conv1d_ref, as_f64(leaves), seq_idx, activation, final, cots)
    for got, want in zip(outs + grads, outs64 + grads64):
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("l, fwd_chunk", [(37, 16), (400, 32)])
def test_default_launch_shape_matches_float64(l, fwd_chunk):
    """Both forward chunk lengths of `default_launch` (16 tokens when 32 would leave few programs per SM)."""
    assert default_launch(2, l, 300, torch.device(DEV)).chunk_l == fwd_chunk or DEV != "cpu"
    leaves, seq_idx = make_inputs(2, l, 300, 4, seq=[[30, 7], [37]] if l == 37 else [[100, 300], [l]])
    cots = cotangents_for(2, l, 300, 4, True, torch.float32)
    outs, grads = run(causal_conv1d_triton, leaves, seq_idx, "silu", True, cots)
    outs64, grads64 = run(causal_conv1d_ref, as_f64(leaves), seq_idx, "silu", True, cots)
    for got, want in zip(outs + grads, outs64 + grads64):
        assert rel_err(got, want) <= 1e-5


def low_precision_errors(dtype, b, l, d, k, seq, launch, seed=0):
    """rel errors vs float64 of (kernel, eager reference) on the same low-precision inputs, for every output and
    gradient: the kernel may be at most about twice as far off as eager PyTorch in that dtype."""
    leaves, seq_idx = make_inputs(b, l, d, k, seq=seq, dtype=dtype, seed=seed)
    cots = cotangents_for(b, l, d, k, True, dtype)
    outs, grads = run(causal_conv1d_triton, leaves, seq_idx, "silu", True, cots, launch=launch)
    outs_e, grads_e = run(causal_conv1d_ref, leaves, seq_idx, "silu", True, cots)
    outs64, grads64 = run(causal_conv1d_ref, as_f64(leaves), seq_idx, "silu", True, cots)
    return [(rel_err(a, r), rel_err(e, r)) for a, e, r in zip(outs + grads, outs_e + grads_e, outs64 + grads64)]


@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, BF16_FLOOR), (torch.float16, 2 ** -11)])
def test_low_precision_error_within_twice_eager(dtype, floor):
    for kernel, eager in low_precision_errors(dtype, 2, 37, 37, 4, [[20, 17], [37]], SMALL):
        assert kernel <= 2 * eager + floor, (kernel, eager)


def test_packed_documents_equal_separate_runs():
    lengths = [9, 1, 20, 7]  # a one-token document; boundaries inside a chunk and on a chunk edge (chunk 8)
    leaves, seq_idx = make_inputs(1, sum(lengths), 21, 4, init=False, seq=[lengths])
    cots = cotangents_for(1, sum(lengths), 21, 4, False, torch.float32)
    packed, packed_grads = run(causal_conv1d_triton, leaves, seq_idx, "silu", False, cots, launch=SMALL)
    x, w, bias = leaves["x"], leaves["weight"], leaves["bias"]
    pieces, start = [], 0
    for n in lengths:
        pieces.append(causal_conv1d_triton(x[:, start:start + n], w, bias, launch=SMALL))
        start += n
    separate = torch.cat(pieces, 1)
    separate_grads = torch.autograd.grad((separate.to(F64) * cots[0]).sum(), [x, w, bias])
    assert rel_err(packed[0], separate) <= 1e-6
    for got, want in zip(packed_grads, separate_grads):
        assert rel_err(got, want) <= 1e-5


def test_two_pieces_with_carried_state_equal_whole():
    """conv(x[:, :13]) -> final state -> conv(x[:, 13:], initial_state=...) equals conv(x); gradients flow back
    through the carried state into the first piece."""
    leaves, _ = make_inputs(2, 30, 19, 4)
    x, w, bias, h = leaves["x"], leaves["weight"], leaves["bias"], leaves["initial_state"]
    cots = cotangents_for(2, 30, 19, 4, True, torch.float32)
    y, final = causal_conv1d_triton(x, w, bias, initial_state=h, return_final_state=True, launch=SMALL)
    y1, s1 = causal_conv1d_triton(x[:, :13], w, bias, initial_state=h, return_final_state=True, launch=SMALL)
    y2, s2 = causal_conv1d_triton(x[:, 13:], w, bias, initial_state=s1, return_final_state=True, launch=SMALL)
    assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-6 and rel_err(s2, final) <= 1e-6
    whole = torch.autograd.grad((y.to(F64) * cots[0]).sum() + (final.to(F64) * cots[1]).sum(), [x, w, bias, h])
    pieces = torch.autograd.grad((torch.cat([y1, y2], 1).to(F64) * cots[0]).sum() + (s2.to(F64) * cots[1]).sum(),
                                 [x, w, bias, h])
    for got, want in zip(pieces, whole):
        assert rel_err(got, want) <= 1e-5


def test_strided_input_and_frozen_weight():
    """x as a channel slice of a wider tensor (as in_proj's output is split); weight and bias without gradients."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 11, 50, generator=gen).to(DEV).requires_grad_()
    w = (torch.randn(23, 4, generator=gen) * 0.5).to(DEV)
    bias = torch.randn(23, generator=gen).to(DEV)
    cot = torch.randn(2, 11, 23, generator=gen).to(DEV, F64)
    y = causal_conv1d_triton(wide[..., 20:43], w, bias, launch=SMALL)
    (dwide,) = torch.autograd.grad((y.to(F64) * cot).sum(), [wide])
    wide64 = wide.detach().to(F64).requires_grad_()
    y64 = causal_conv1d_ref(wide64[..., 20:43], w.to(F64), bias.to(F64))
    (dwide64,) = torch.autograd.grad((y64 * cot).sum(), [wide64])
    assert rel_err(y, y64) <= 1e-5 and rel_err(dwide, dwide64) <= 1e-5
    assert dwide[..., :20].abs().max() == 0 and dwide[..., 43:].abs().max() == 0


def test_initial_state_without_gradient_still_feeds_the_backward():
    """A detached carried state (no gradient wanted) must still enter the recomputed pre-activations."""
    leaves, seq_idx = make_inputs(2, 11, 19, 4, seq=[[4, 7], [11]])
    leaves["initial_state"] = leaves["initial_state"].detach()
    cots = cotangents_for(2, 11, 19, 4, False, torch.float32)
    outs, grads = run(causal_conv1d_triton, leaves, seq_idx, "silu", False, cots, launch=SMALL)
    outs64, grads64 = run(causal_conv1d_ref, as_f64(leaves), seq_idx, "silu", False, cots)
    assert len(grads) == 3
    for got, want in zip(outs + grads, outs64 + grads64):
        assert rel_err(got, want) <= 1e-5


def test_weight_gradients_over_many_programs_match_float64_and_repeat_bitwise():
    """3 rows x 8 chunks x 3 channel blocks: 24 partials per channel summed by the second kernel. A second backward
    through the same graph gives the same bits (a fixed summation order; on the CPU any order repeats, so this part
    speaks only on the GPU, where the `gpu` runs of this file take it), and both match float64."""
    leaves, seq_idx = make_inputs(3, 61, 37, 4, seq=[[61], [30, 31], [5, 56]])
    cots = cotangents_for(3, 61, 37, 4, False, torch.float32)
    y = causal_conv1d_triton(leaves["x"], leaves["weight"], leaves["bias"], seq_idx=seq_idx,
                             initial_state=leaves["initial_state"], launch=SMALL)
    used = [v for v in leaves.values() if v.requires_grad]
    first = torch.autograd.grad((y.to(F64) * cots[0]).sum(), used, retain_graph=True)
    second = torch.autograd.grad((y.to(F64) * cots[0]).sum(), used)
    _, grads64 = run(causal_conv1d_ref, as_f64(leaves), seq_idx, "silu", False, cots)
    for a, b, want in zip(first, second, grads64):
        assert torch.equal(a, b)
        assert rel_err(a, want) <= 1e-5


def test_frozen_weight_with_trained_bias():
    """Only the bias's gradient wanted (through the autograd function): the weight's is None, the rest match float64."""
    leaves, seq_idx = make_inputs(2, 37, 37, 4, init=False, seq=[[20, 17], [37]])
    leaves["weight"] = leaves["weight"].detach()
    cots = cotangents_for(2, 37, 37, 4, False, torch.float32)
    outs, grads = run(causal_conv1d_triton, leaves, seq_idx, "silu", False, cots, launch=SMALL)
    outs64, grads64 = run(causal_conv1d_ref, as_f64(leaves), seq_idx, "silu", False, cots)
    assert len(grads) == 2                                                # x and bias
    for got, want in zip(outs + grads, outs64 + grads64):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("k, want_dw, want_db", [(4, True, True), (3, True, False), (2, False, True)])
def test_param_grad_sum_of_partials(k, want_dw, want_db):
    """The partials' sum: 150 partials (three loads of 64, the last part-masked), 37 channels (two blocks of 32, the
    last part-masked), window slots before the kernel's first column skipped; dw in bf16 (the weight's dtype)."""
    gen = torch.Generator().manual_seed(4)
    dw_part = torch.randn(150, 4, 37, generator=gen).to(DEV) if want_dw else None
    db_part = torch.randn(150, 37, generator=gen).to(DEV) if want_db else None
    weight = torch.zeros(37, k, device=DEV, dtype=torch.bfloat16)
    bias = torch.zeros(37, device=DEV)
    dw, db = _param_grads(dw_part, db_part, weight, bias, 37, k, False)
    if want_dw:
        want = dw_part.to(F64).sum(0)[4 - k:].t()
        assert dw.dtype == torch.bfloat16 and dw.shape == (37, k)
        assert rel_err(dw, want) <= BF16_FLOOR
        # rounded to nearest (within half a bf16 ulp of each value), not truncated (up to a whole ulp)
        assert ((dw.to(F64) - want).abs() <= 2 ** -8 * want.abs() * 1.001).all()
    else:
        assert dw is None
    if want_db:
        assert db.dtype == torch.float32 and rel_err(db, db_part.to(F64).sum(0)) <= 1e-6
    else:
        assert db is None


def test_alignment_hint_counts_batch_and_token_strides_only():
    """The kernels' row offsets are multiples of _align(x): the channel dim's unit stride must not count, or the hint
    is 1 and every GPU load is a 2-byte one (it was, until the eighth session)."""
    zxbcdt = torch.zeros(2, 5, 3352)                                     # 0.5B: in_proj width 3352 = 8 x 419
    assert _align(zxbcdt[..., 1536:1536 + 1792]) == 8
    assert _align(torch.zeros(2, 7, 48)) == 16
    assert _align(torch.zeros(3, 4, 6)) == 2
    assert _align(torch.zeros(1, 1, 5)) == 16                            # length-1 dims have no stride to honour


def test_bad_arguments_raise():
    x = torch.randn(1, 5, 8, device=DEV)
    with pytest.raises(ValueError):
        causal_conv1d_triton(x, torch.randn(8, 5, device=DEV))                 # k > 4
    with pytest.raises(ValueError):
        causal_conv1d_triton(x, torch.randn(8, 4, device=DEV), activation="gelu")
    with pytest.raises(ValueError):
        causal_conv1d_triton(x, torch.randn(8, 4, device=DEV), initial_state=torch.randn(1, 8, 2, device=DEV))


# ----------------------------------------------------------------------------------------------------- decode update

@pytest.mark.parametrize("k, bias, activation", [(4, True, "silu"), (3, False, None), (2, True, "silu")])
def test_update_steps_equal_whole_sequence(k, bias, activation):
    """Rows live in slots 3, 0, 4 of a 5-slot cache; feeding the tokens one at a time gives the whole sequence's
    outputs and leaves its final state in those slots; the other slots are untouched."""
    b, l, d = 3, 7, 37
    leaves, _ = make_inputs(b, l, d, k, bias=bias)
    x, w, bias_t, h = (v.detach() if v is not None else None for v in leaves.values())
    whole, final = causal_conv1d_ref(x.to(F64), w.to(F64), bias_t.to(F64) if bias else None, activation=activation,
                                     initial_state=h.to(F64), return_final_state=True)
    slots = torch.tensor([3, 0, 4], device=DEV)
    for update in (causal_conv1d_update_triton, causal_conv1d_update_ref):
        cache = torch.randn(5, d, k - 1, device=DEV)
        cache[slots] = h
        spare = cache[[1, 2]].clone()
        steps = torch.stack([update(x[:, t], cache, w, bias_t, activation, slots) for t in range(l)], 1)
        assert rel_err(steps, whole) <= 1e-5
        assert rel_err(cache[slots], final) <= 1e-6
        assert torch.equal(cache[[1, 2]], spare)


def test_update_kernel_without_indices_in_bf16():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 37, generator=gen).to(DEV, torch.bfloat16)
    w = (torch.randn(37, 4, generator=gen) * 0.5).to(DEV, torch.bfloat16)
    bias = torch.randn(37, generator=gen).to(DEV, torch.bfloat16)
    cache = torch.randn(4, 37, 3, generator=gen).to(DEV, torch.bfloat16)
    cache_eager, cache64 = cache.clone(), cache.to(F64)
    y = causal_conv1d_update_triton(x, cache, w, bias)
    y_eager = causal_conv1d_update_ref(x, cache_eager, w, bias)
    y64 = causal_conv1d_update_ref(x.to(F64), cache64, w.to(F64), bias.to(F64))
    assert torch.equal(cache, cache_eager) and torch.equal(cache.to(F64), cache64)
    assert rel_err(y, y64) <= 2 * rel_err(y_eager, y64) + BF16_FLOOR


# ------------------------------------------------------------------------------------------------ GPU, real shapes

SHAPES = {"0.5B": (4, 2048, 1536 + 2 * 128), "7B": (1, 8192, 3072 + 2 * 256), "34B": (1, 4096, 4096 + 2 * 2 * 256)}


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(SHAPES))
def test_gpu_real_shapes_bf16_within_twice_eager(name):
    b, l, d = SHAPES[name]
    seq = [[l // 3, l // 2, l - l // 3 - l // 2]] * b
    for kernel, eager in low_precision_errors(torch.bfloat16, b, l, d, 4, seq, launch=None):
        assert kernel <= 2 * eager + BF16_FLOOR, (kernel, eager)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("b, l", [(1, 2048), (4, 8192)])
def test_gpu_weight_gradient_sum_launched_early_gives_the_same_bits(b, l):
    """The weight/bias-gradient sum launched with PDL (its programs wait on the SMs for the backward's partials)
    gives the same bits as one launched after the backward completes, run after run: a missing or misplaced wait
    would read partials still being written. Both match float64."""
    import dataclasses
    leaves, _ = make_inputs(b, l, 1792, 4, dtype=torch.bfloat16, init=False)
    cot = torch.randn(b, l, 1792, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    used = [leaves["x"], leaves["weight"], leaves["bias"]]
    base = default_launch(b, l, 1792, leaves["x"].device, backward=True)
    results = {}
    for pdl in (False, True):
        launch = dataclasses.replace(base, pdl=pdl)
        runs = [torch.autograd.grad(causal_conv1d_triton(*used, launch=launch), used, cot) for _ in range(20)]
        for other in runs[1:]:
            assert all(torch.equal(a, c) for a, c in zip(runs[0], other))
        results[pdl] = runs[0]
    assert all(torch.equal(a, c) for a, c in zip(results[False], results[True]))
    ref = as_f64({"x": leaves["x"], "weight": leaves["weight"], "bias": leaves["bias"], "initial_state": None})
    want = torch.autograd.grad(causal_conv1d_ref(ref["x"], ref["weight"], ref["bias"]), list(ref.values())[:3],
                               cot.to(F64))
    for got, w in zip(results[True], want):
        assert rel_err(got, w) <= 4 * BF16_FLOOR


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_public_entry_dispatches_to_kernel():
    from gyrfalcon import ops
    leaves, _ = make_inputs(2, 300, 1792, 4, dtype=torch.bfloat16)
    x, w, bias = leaves["x"], leaves["weight"], leaves["bias"]
    y = ops.causal_conv1d(x, w, bias)
    assert y.grad_fn is not None and "CausalConv1dFn" in type(y.grad_fn).__name__
