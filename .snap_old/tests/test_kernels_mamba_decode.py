"""The fused Mamba decode step (ops/mamba_decode.py): the Triton kernel (CPU interpreter in CI, the GPU on the device)
against the float64 reference, with slots, several programs per B/C group (the last-arrival write of the shared
windows), two groups, the gate and a dt clamp; two steps in a row; and the reference itself against the whole-sequence
conv + scan definition, token by token."""

from __future__ import annotations

import math

import pytest
import torch

from gyrfalcon.ops.conv import causal_conv1d_ref
from gyrfalcon.ops.mamba_decode import mamba_step, mamba_step_ref
from gyrfalcon.ops.ssd import ssd_sequential_ref
from helpers import BF16_FLOOR, DEV, rel_err

pytest.importorskip("triton")

from gyrfalcon.ops import mamba_decode_triton  # noqa: E402

F64 = torch.float64
FP32_TOL = 2e-6


def _layer(gen, *, b, slots, h, p, g, n, k, dtype, conv_bias=True):
    """Random inputs of one decode step: zxbcdt (b, 2 d_ssm + 2 g n + h) and the states, on DEV."""
    d_ssm = h * p
    conv_dim = d_ssm + 2 * g * n

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    return dict(
        zxbcdt=r(b, d_ssm + conv_dim + h).to(DEV, dtype),
        conv_state=r(slots, conv_dim, k - 1).to(DEV, dtype),
        ssm_state=r(slots, h, p, n).to(DEV, torch.float32),
        conv_weight=r(conv_dim, k, scale=0.5).to(DEV, torch.float32),
        conv_bias=r(conv_dim, scale=0.2).to(DEV, torch.float32) if conv_bias else None,
        A_log=r(h, scale=0.5).to(DEV, torch.float32),
        D=r(h).to(DEV, torch.float32),
        dt_bias=r(h, scale=0.3).to(DEV, torch.float32),
    )


def _exact(inputs, idx, **kw):
    """The reference on float64 copies: (y, conv_state, ssm_state) after the step."""
    copy = {name: (t.to(F64).clone() if t is not None else None) for name, t in inputs.items()}
    y = mamba_step_ref(**copy, state_indices=idx, **kw)
    return y, copy["conv_state"], copy["ssm_state"]


@pytest.mark.parametrize("gate, limit, dtype, launch", [
    (True, None, torch.float32, (2, 1)),
    (False, (0.05, 0.6), torch.float32, (4, 2)),
    (True, None, torch.bfloat16, (2, 1)),
    (True, (0.05, 0.6), torch.bfloat16, None),
])
def test_kernel_matches_float64_reference_with_slots(gate, limit, dtype, launch):
    gen = torch.Generator().manual_seed(5)
    h, p, g, n, k = 4, 5, 2, 12, 4
    inputs = _layer(gen, b=3, slots=5, h=h, p=p, g=g, n=n, k=k, dtype=dtype)
    idx = torch.tensor([3, 0, 4], device=DEV)
    kw = dict(n_groups=g, d_state=n, dt_limit=limit or (0.0, math.inf), dt_scale=1.3, z_scale=0.7, gate=gate)
    y_ref, conv_ref, ssm_ref = _exact(inputs, idx.cpu(), **kw)
    sync = torch.zeros(3 * g, dtype=torch.int32, device=DEV)
    conv, ssm = inputs["conv_state"].clone(), inputs["ssm_state"].clone()
    y = mamba_decode_triton.mamba_step_triton(**{**inputs, "conv_state": conv, "ssm_state": ssm}, state_indices=idx,
                                            sync=sync, launch=launch, **kw)
    assert y.shape == (3, h, p) and y.dtype == dtype
    # bf16: the kernel keeps the conv output in fp32 where the reference rounds it; one bf16 step of slack
    assert rel_err(y, y_ref) <= (FP32_TOL if dtype == torch.float32 else 2 * BF16_FLOOR)
    assert rel_err(ssm[idx], ssm_ref[idx.cpu()]) <= (FP32_TOL if dtype == torch.float32 else 2 * BF16_FLOOR)
    # the windows hold raw inputs: exact copies, shifted
    assert torch.equal(conv[idx].cpu().to(F64), conv_ref[idx.cpu()])
    untouched = [1, 2]
    assert torch.equal(conv[untouched], inputs["conv_state"][untouched])
    assert torch.equal(ssm[untouched], inputs["ssm_state"][untouched])
    assert int(sync.abs().sum()) == 0, "the last program of each (row, group) resets the counter"


def test_two_steps_in_a_row_without_slots():
    """Row i uses slot i; a second step reads the windows and states the first one wrote (and the counters it left
    at zero)."""
    gen = torch.Generator().manual_seed(8)
    h, p, g, n, k = 2, 6, 1, 8, 4
    first = _layer(gen, b=2, slots=2, h=h, p=p, g=g, n=n, k=k, dtype=torch.float32, conv_bias=False)
    second = _layer(gen, b=2, slots=2, h=h, p=p, g=g, n=n, k=k, dtype=torch.float32, conv_bias=False)
    kw = dict(n_groups=g, d_state=n, dt_scale=0.9, z_scale=1.2, gate=True)
    exact = {name: (t.to(F64).clone() if t is not None else None) for name, t in first.items()}
    live = dict(first)
    live["conv_state"], live["ssm_state"] = first["conv_state"].clone(), first["ssm_state"].clone()
    sync = torch.zeros(2, dtype=torch.int32, device=DEV)
    for step in (first, second):
        exact["zxbcdt"], live["zxbcdt"] = step["zxbcdt"].to(F64), step["zxbcdt"]
        y_ref = mamba_step_ref(**exact, **kw)
        y = mamba_decode_triton.mamba_step_triton(**live, sync=sync, launch=(2, 1), **kw)
        assert rel_err(y, y_ref) <= FP32_TOL
    assert rel_err(live["ssm_state"], exact["ssm_state"]) <= FP32_TOL
    assert torch.equal(live["conv_state"].to(F64), exact["conv_state"])


def test_reference_token_by_token_equals_whole_sequence():
    """mamba_step_ref over a sequence, one token at a time from zero states, gives the whole-sequence causal conv +
    SiLU and the sequential SSD recurrence (the training path's definitions), gate included."""
    gen = torch.Generator().manual_seed(2)
    b, l, h, p, g, n, k = 2, 7, 4, 3, 2, 5, 4
    d_ssm = h * p
    conv_dim = d_ssm + 2 * g * n
    zxbcdt = torch.randn(b, l, d_ssm + conv_dim + h, generator=gen, dtype=F64)
    weight = torch.randn(conv_dim, k, generator=gen, dtype=F64) * 0.5
    bias = torch.randn(conv_dim, generator=gen, dtype=F64) * 0.2
    A_log, D, dt_bias = (torch.randn(h, generator=gen, dtype=F64) * s for s in (0.5, 1.0, 0.3))
    dt_scale, z_scale = 1.1, 0.8
    conv_state = torch.zeros(b, conv_dim, k - 1, dtype=F64)
    ssm_state = torch.zeros(b, h, p, n, dtype=F64)
    steps = [mamba_step_ref(zxbcdt[:, t], conv_state, ssm_state, weight, bias, A_log, D, dt_bias, n_groups=g,
                            d_state=n, dt_scale=dt_scale, z_scale=z_scale) for t in range(l)]
    z, xbc, dt = zxbcdt.split([d_ssm, conv_dim, h], dim=-1)
    xbc = causal_conv1d_ref(xbc, weight, bias, activation="silu")
    xs, B, C = xbc.split([d_ssm, g * n, g * n], dim=-1)
    y, final = ssd_sequential_ref(xs.reshape(b, l, h, p), dt * dt_scale, A_log, B.reshape(b, l, g, n),
                                  C.reshape(b, l, g, n), D, dt_bias)
    y = y * torch.nn.functional.silu(z.reshape(b, l, h, p) * z_scale)
    assert rel_err(torch.stack(steps, dim=1), y) <= 1e-12
    assert rel_err(ssm_state, final) <= 1e-12
    assert torch.equal(conv_state, zxbcdt[:, l - k + 1:, d_ssm:d_ssm + conv_dim].transpose(1, 2))


def test_public_entry_on_cpu_takes_the_reference_and_updates_in_place():
    gen = torch.Generator().manual_seed(4)
    inputs = {name: t.cpu() for name, t in
              _layer(gen, b=2, slots=3, h=2, p=4, g=1, n=6, k=4, dtype=torch.bfloat16).items()}
    before = {name: t.clone() for name, t in inputs.items()}
    updated = {name: t.clone() for name, t in inputs.items()}
    idx = torch.tensor([2, 0])
    kw = dict(n_groups=1, d_state=6, dt_scale=1.0, z_scale=1.0, gate=True)
    y = mamba_step(**inputs, state_indices=idx, **kw)
    y_ref = mamba_step_ref(**updated, state_indices=idx, **kw)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    for name in ("conv_state", "ssm_state"):
        assert torch.equal(inputs[name], updated[name])
        assert not torch.equal(inputs[name][idx], before[name][idx])
        assert torch.equal(inputs[name][1], before[name][1])


def test_many_rows_take_the_two_kernel_path_with_the_same_result(monkeypatch):
    """Above FUSED_MAX_ROWS the dispatch runs the conv-update and SSD-step kernels (gate in the step's epilogue, with
    its z factor): same contract, checked against float64 (kernels run on CPU tensors in the interpreter)."""
    from gyrfalcon.ops import conv, dispatch, mamba_decode, ssd

    for module in (conv, mamba_decode, ssd):
        monkeypatch.setattr(module, "kernels_enabled", lambda *tensors: not dispatch.reference_forced())
    monkeypatch.setattr(mamba_decode_triton, "mamba_step_triton", None)  # would raise if the fused path ran
    gen = torch.Generator().manual_seed(6)
    b = mamba_decode.FUSED_MAX_ROWS + 2
    h, p, g, n, k = 4, 3, 2, 8, 4
    inputs = {name: (t.cpu() if t is not None else None) for name, t in
              _layer(gen, b=b, slots=b + 1, h=h, p=p, g=g, n=n, k=k, dtype=torch.float32).items()}
    idx = torch.randperm(b + 1, generator=gen)[:b]
    for gate in (True, False):
        kw = dict(n_groups=g, d_state=n, dt_scale=1.3, z_scale=0.6, gate=gate)
        y_ref, conv_ref, ssm_ref = _exact(inputs, idx, **kw)
        live = {**inputs, "conv_state": inputs["conv_state"].clone(), "ssm_state": inputs["ssm_state"].clone()}
        y = mamba_step(**live, state_indices=idx, **kw)
        assert rel_err(y, y_ref) <= FP32_TOL
        assert rel_err(live["ssm_state"], ssm_ref) <= FP32_TOL
        assert torch.equal(live["conv_state"].to(F64), conv_ref)


def test_bad_shapes_are_refused_with_the_expected_shape():
    gen = torch.Generator().manual_seed(1)
    inputs = _layer(gen, b=1, slots=1, h=2, p=4, g=1, n=8, k=4, dtype=torch.float32)
    kw = dict(n_groups=1, d_state=8)
    with pytest.raises(ValueError, match="zxbcdt must be"):
        mamba_decode_triton.mamba_step_triton(**{**inputs, "zxbcdt": inputs["zxbcdt"][:, :-1]}, **kw)
    with pytest.raises(ValueError, match="ssm_state must be float32"):
        mamba_decode_triton.mamba_step_triton(**{**inputs, "ssm_state": inputs["ssm_state"].double()}, **kw)
    with pytest.raises(ValueError, match="do not describe"):
        mamba_decode_triton.mamba_step_triton(**inputs, n_groups=3, d_state=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["0.5B", "7B", "34B"])
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_released_shapes_with_slots_and_large_dt(shape, fused):
    """The fused kernel's default launch (block_rows), and the dispatch at 16 rows (the two-kernel path), at the
    released layer shapes (34B: two B/C groups), 16 rows in 24 slots through two steps, with some dt values far out
    in softplus's linear range: finite, within the bf16 floor of the float64 reference, conv windows exact."""
    from gyrfalcon import FalconH1Config

    cfg = FalconH1Config.from_preset(shape)
    h, p, g, n, k = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_d_conv
    gen = torch.Generator().manual_seed(21)
    inputs = _layer(gen, b=16, slots=24, h=h, p=p, g=g, n=n, k=k, dtype=torch.bfloat16)
    inputs["zxbcdt"][:, -h:] = torch.linspace(-8, 40, h, device=DEV).to(torch.bfloat16)   # dt up to 40
    inputs["ssm_state"] *= 0.1
    idx = torch.randperm(24, generator=gen)[:16].to(DEV)
    kw = dict(n_groups=g, d_state=n, dt_scale=0.5, z_scale=0.8, gate=True)
    sync = torch.zeros(16 * g, dtype=torch.int32, device=DEV)
    live = {**inputs, "conv_state": inputs["conv_state"].clone(), "ssm_state": inputs["ssm_state"].clone()}
    exact = {name: (t.to(F64).clone() if t is not None else None) for name, t in inputs.items()}
    step = mamba_decode_triton.mamba_step_triton if fused else mamba_step
    for _ in range(2):
        y = step(**live, state_indices=idx, sync=sync, **kw)
        y_ref = mamba_step_ref(**exact, state_indices=idx, **kw)
        assert torch.isfinite(y).all()
        assert rel_err(y, y_ref) <= 2 * BF16_FLOOR
    assert rel_err(live["ssm_state"][idx], exact["ssm_state"][idx]) <= 2 * BF16_FLOOR
    assert torch.equal(live["conv_state"].to(F64), exact["conv_state"])
    assert int(sync.abs().sum()) == 0
