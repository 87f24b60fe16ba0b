"""The Triton SSD kernels (gyrfalcon/ops/ssd_triton*.py) against float64 references: the chunked scan's forward and
every gradient (odd lengths, one and two groups, chunk 16 and 32, fp32 / bf16 / fp16, clamp and softplus options),
initial and final states, a sequence run in two pieces, packed documents, huge dt, the head-split backward path, and
the decode step with slot indices. On CPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small; one test compiles every kernel for an H100 (sm_90) in a subprocess, so GPU
compile errors show without a GPU. Tests marked `gpu` run the released Falcon-H1 shapes on CUDA.

Tolerances: fp32 inputs within 1e-5 (relative to the largest reference value) of the float64 reference; bf16/fp16
inputs at most 2x the error of the eager reference in the same dtype (ssd_scan_ref, which computes in fp32) plus a
1e-4 floor. The floor is for fp32 outputs (final state, A_log / D / dt_bias gradients): eager's error there is ~1e-7,
the kernels' ~1e-6 to 1e-5 (their 16-bit tensor-core products are split into two parts, exact to ~2^-17, not to
fp32's 2^-24); without the split it would be ~3e-3.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from gyrfalcon.ops.ssd import ssd_scan_ref, ssd_sequential_ref, ssd_step_ref

ssd_triton = pytest.importorskip("gyrfalcon.ops.ssd_triton")
from gyrfalcon.ops import ssd_triton_bwd  # noqa: E402
from helpers import compile_script_last_line  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
FLOOR = 1e-4
NAMES = ["x", "dt", "A_log", "B", "C", "D", "dt_bias", "initial_state"]


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|; NaN or inf anywhere gives inf."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return math.inf
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make_inputs(b=2, l=37, h=4, p=12, g=2, n=10, seed=0, realistic=False, device=DEVICE):
    """float64 master values. realistic: Mamba-2's init ranges (dt in [1e-3, 0.1], A in [-16, -1]), where the
    entering state dominates the output; otherwise dt ~ 0.7 and fast decay, where the in-chunk term does."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    vals = dict(x=r(b, l, h, p), dt=r(b, l, h, scale=0.5), A_log=r(h, scale=0.5), B=r(b, l, g, n), C=r(b, l, g, n),
                D=r(h), dt_bias=r(h, scale=0.3), initial_state=r(b, h, p, n))
    if realistic:
        dt0 = torch.exp(torch.rand(h, generator=gen, dtype=F64) * math.log(100.0) + math.log(1e-3))
        vals["dt_bias"] = dt0 + torch.log(-torch.expm1(-dt0))
        vals["A_log"] = torch.log(1 + 15 * torch.rand(h, generator=gen, dtype=F64))
    return {k: v.to(device) for k, v in vals.items()}


def leaves(vals, dtype, names=NAMES):
    """Leaf tensors: x, dt, B, C in `dtype`, the per-head parameters and the initial state in fp32 (as in the model)."""
    out = {}
    for k in names:
        v = vals[k].to(dtype if k in ("x", "dt", "B", "C") else torch.float32)
        out[k] = v.detach().requires_grad_()
    return out


def as_f64(inputs):
    return {k: v.detach().double().requires_grad_() for k, v in inputs.items()}


def run(fn, inputs, seed=1, **kw):
    """y and the final state of fn(**inputs, **kw), and the gradients of a fixed random projection of both."""
    y, final = fn(**inputs, return_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    # bf16-representable weights: every path (16-bit ones included) then receives exactly the same cotangents
    wy = torch.randn(y.shape, generator=gen).bfloat16().to(F64).to(y.device)
    wf = torch.randn(final.shape, generator=gen).bfloat16().to(F64).to(y.device)
    loss = (y.double() * wy).sum() + (final.double() * wf).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return {"y": y.detach(), "final": final.detach(), **{"d" + k: gv for k, gv in zip(inputs, grads)}}


def compare(kernel_inputs, dtype, tol=None, **kw):
    """Kernel vs float64 reference; for 16-bit dtypes also the eager reference in that dtype. Returns the errors."""
    got = run(ssd_triton.ssd_scan_triton, kernel_inputs, **kw)
    ref = run(ssd_scan_ref, as_f64(kernel_inputs), **kw)
    errors = {k: rel_err(got[k], ref[k]) for k in ref}
    if dtype == torch.float32:
        bad = {k: e for k, e in errors.items() if not e <= (tol or FP32_TOL)}
    else:
        eager = run(ssd_scan_ref, {k: v.detach().clone().requires_grad_() for k, v in kernel_inputs.items()}, **kw)
        eager_err = {k: rel_err(eager[k], ref[k]) for k in ref}
        bad = {k: (e, eager_err[k]) for k, e in errors.items() if not e <= 2 * eager_err[k] + FLOOR}
        errors = {k: (e, eager_err[k]) for k, e in errors.items()}
    assert not bad, f"errors above tolerance: {bad}"
    return errors


@pytest.mark.parametrize("l, chunk, g, case", [
    (1, 16, 1, "plain"), (7, 16, 2, "plain"), (37, 16, 2, "plain"), (37, 32, 1, "plain"),
    (37, 16, 2, "limit"), (29, 16, 1, "no_softplus"), (23, 32, 2, "bare"), (45, 32, 2, "wide_state")])
def test_scan_fp32_matches_float64_reference(l, chunk, g, case):
    # wide_state: n = 40 spans three state-column blocks of the dB/dC kernels (16 wide under the interpreter)
    vals = make_inputs(l=l, g=g, n=40 if case == "wide_state" else 10, seed=l + g)
    names = NAMES if case != "bare" else ["x", "dt", "A_log", "B", "C"]   # no D, no dt_bias, no initial state
    kw = {"chunk_size": chunk}
    if case == "limit":
        kw["dt_limit"] = (0.3, 0.9)          # active on both sides for dt ~ softplus(N(0, 0.5))
    if case == "no_softplus":
        vals["dt"] = vals["dt"].abs() + 0.05
        vals["dt_bias"] = vals["dt_bias"].abs()
        kw["dt_softplus"] = False
    compare(leaves(vals, torch.float32, names), torch.float32, **kw)


@pytest.mark.parametrize("dtype, realistic, chunk", [(torch.bfloat16, False, 16), (torch.bfloat16, True, 32),
                                                     (torch.float16, True, 16)])
def test_scan_16bit_error_at_most_twice_eager(dtype, realistic, chunk):
    vals = make_inputs(b=1, l=70, h=4, p=16, g=1, n=16, seed=3, realistic=realistic)
    compare(leaves(vals, dtype), dtype, chunk_size=chunk)


def test_two_pieces_with_carried_state_equal_whole():
    vals = make_inputs(l=50, seed=4)
    inp = leaves(vals, torch.float32)
    whole = run(ssd_triton.ssd_scan_triton, inp, chunk_size=16)

    def pieces(x, dt, A_log, B, C, D, dt_bias, initial_state, return_final_state):
        common = dict(A_log=A_log, D=D, dt_bias=dt_bias, chunk_size=16, return_final_state=True)
        y1, s1 = ssd_triton.ssd_scan_triton(x[:, :19], dt[:, :19], B=B[:, :19], C=C[:, :19],
                                            initial_state=initial_state, **common)
        y2, s2 = ssd_triton.ssd_scan_triton(x[:, 19:], dt[:, 19:], B=B[:, 19:], C=C[:, 19:], initial_state=s1,
                                            **common)
        return torch.cat([y1, y2], 1), s2

    split = run(pieces, inp)
    bad = {k: rel_err(split[k], whole[k]) for k in whole if not rel_err(split[k], whole[k]) <= FP32_TOL}
    assert not bad, bad


@pytest.mark.parametrize("with_state", [False, True])
def test_packed_documents_equal_separate_runs(with_state):
    lengths = [9, 20, 11]    # boundaries inside a chunk and across a chunk edge (chunk 16)
    vals = make_inputs(b=1, l=sum(lengths), seed=5)
    names = NAMES if with_state else NAMES[:-1]
    inp = leaves(vals, torch.float32, names)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].to(torch.int32).to(DEVICE)
    packed = run(ssd_triton.ssd_scan_triton, inp, chunk_size=16, seq_idx=seq_idx)

    def separate(x, dt, A_log, B, C, D, dt_bias, initial_state=None, return_final_state=True):
        ys, start, state = [], 0, None
        for i, n in enumerate(lengths):
            part = slice(start, start + n)
            y, state = ssd_triton.ssd_scan_triton(x[:, part], dt[:, part], A_log, B[:, part], C[:, part], D, dt_bias,
                                                  chunk_size=16, initial_state=initial_state if i == 0 else None,
                                                  return_final_state=True)
            ys.append(y)
            start += n
        return torch.cat(ys, 1), state     # the final state is the last document's

    apart = run(separate, inp)
    bad = {k: rel_err(packed[k], apart[k]) for k in apart if not rel_err(packed[k], apart[k]) <= FP32_TOL}
    assert not bad, bad
    # and the packed kernel agrees with the float64 reference of the packed row
    compare(inp, torch.float32, chunk_size=16, seq_idx=seq_idx)


def test_huge_dt_stays_finite_and_correct():
    vals = make_inputs(l=37, seed=6)
    vals["dt"].fill_(30.0)                  # softplus(30 + bias) ~ 30, A = -exp(3): exp(dt A) underflows to 0
    vals["A_log"].fill_(3.0)
    got = run(ssd_triton.ssd_scan_triton, leaves(vals, torch.float32), chunk_size=16)
    assert all(torch.isfinite(v).all() for v in got.values())
    compare(leaves(vals, torch.float32), torch.float32, chunk_size=16)


def test_head_split_backward_sums_partials(monkeypatch):
    """Two head splits per group: dB and dC are reduced from fp32 partials (the path taken when a GPU needs more
    programs than batch x chunks x groups provide)."""
    monkeypatch.setattr(ssd_triton_bwd, "_head_splits", lambda problem, device: 2)
    vals = make_inputs(l=37, h=6, g=2, seed=7)
    compare(leaves(vals, torch.float32), torch.float32, chunk_size=16)


def test_single_token_matches_recurrence():
    vals = make_inputs(l=1, seed=8)
    inp = leaves(vals, torch.float32)
    y, final = ssd_triton.ssd_scan_triton(**inp, chunk_size=16, return_final_state=True)
    ref = {k: v.detach().double() for k, v in inp.items()}
    y_ref, final_ref = ssd_sequential_ref(**ref)
    assert rel_err(y, y_ref) <= FP32_TOL and rel_err(final, final_ref) <= FP32_TOL


@pytest.mark.parametrize("with_z, limit, dtype", [(False, None, torch.float32), (True, (0.05, 0.6), torch.float32),
                                                  (True, None, torch.bfloat16)])
def test_decode_step_matches_reference_with_slots(with_z, limit, dtype):
    gen = torch.Generator().manual_seed(9)
    slots, b, h, p, g, n = 5, 3, 4, 12, 2, 10

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(DEVICE)

    state = r(slots, h, p, n)
    x, dt, B, C, z = r(b, h, p).to(dtype), r(b, h, scale=0.5).to(dtype), r(b, g, n).to(dtype), r(b, g, n).to(dtype), \
        r(b, h, p).to(dtype)
    A_log, D, dt_bias = r(h, scale=0.5).float(), r(h).float(), r(h, scale=0.3).float()
    idx = torch.tensor([3, 0, 4], device=DEVICE)
    kw = dict(dt_limit=limit or (0.0, math.inf), dt_scale=1.7 if with_z else 1.0)  # dt's µP factor, read in
    live = state.float().clone()
    y = ssd_triton.ssd_step_triton(live, x, dt, A_log, B, C, D, dt_bias, z=z if with_z else None,
                                   state_indices=idx, **kw)
    y_ref, new_ref = ssd_step_ref(state[idx].float().double(), x.double(), dt.double(), A_log.double(), B.double(),
                                  C.double(), D.double(), dt_bias.double(), **kw)
    if with_z:
        y_ref = y_ref * torch.nn.functional.silu(z.double())
    assert y.dtype == dtype
    assert rel_err(y, y_ref) <= (FP32_TOL if dtype == torch.float32 else 2 ** -8)
    assert rel_err(live[idx], new_ref) <= FP32_TOL
    untouched = [1, 2]
    assert torch.equal(live[untouched], state.float()[untouched])
    # no indices: row i uses slot i
    live2 = state.float().clone()
    ssd_triton.ssd_step_triton(live2, x, dt, A_log, B, C, D, dt_bias, **kw)
    _, new0 = ssd_step_ref(state[:b].double(), x.double(), dt.double(), A_log.double(), B.double(), C.double(),
                           D.double(), dt_bias.double(), **kw)
    assert rel_err(live2[:b], new0) <= FP32_TOL and torch.equal(live2[b:], state.float()[b:])


def test_public_step_reference_path_updates_slots_in_place():
    """gyrfalcon.ops.ssd.ssd_step on CPU (the reference path) has the kernel's contract: in-place slots, y in x's
    dtype, gate applied."""
    from gyrfalcon.ops.ssd import ssd_step

    gen = torch.Generator().manual_seed(10)
    state = torch.randn(4, 2, 3, 5, generator=gen)
    x, dt, B, C = (torch.randn(2, 2, 3, generator=gen), torch.randn(2, 2, generator=gen),
                   torch.randn(2, 1, 5, generator=gen), torch.randn(2, 1, 5, generator=gen))
    A_log, z = torch.randn(2, generator=gen), torch.randn(2, 2, 3, generator=gen)
    before = state.clone()
    y = ssd_step(state, x.bfloat16(), dt, A_log, B, C, z=z.bfloat16(), state_indices=torch.tensor([2, 0]))
    y_ref, new = ssd_step_ref(before[[2, 0]], x.bfloat16(), dt, A_log, B, C)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), (y_ref * torch.nn.functional.silu(z.bfloat16().float())).bfloat16().float())
    assert torch.equal(state[[2, 0]], new) and torch.equal(state[[1, 3]], before[[1, 3]])


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import gyrfalcon.ops.ssd_triton as F, gyrfalcon.ops.ssd_triton_bwd as B

    def compile_for_h100(kernel, consts, scalars, bf16_ptrs, num_warps, num_stages):
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        sig, cx, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name], cx[name] = "constexpr", consts[name]
            elif name.endswith("_ptr"):
                sig[name] = "*bf16" if name in bf16_ptrs else ("*i64" if name == "seq_ptr" else "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                v = scalars.get(name, 64)
                sig[name] = "fp32" if isinstance(v, float) else "i32"
                if isinstance(v, int) and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
        return ck.metadata.shared

    out = {}
    bf16 = {"x_ptr", "dy_ptr", "B_ptr", "C_ptr", "dt_ptr", "y_ptr", "dx_ptr", "z_ptr"}
    # every option on at the 0.5B and 7B shapes; every option off (and fp32 operands) at the 0.5B shape
    for p, n, q, on in [(64, 128, 128, True), (128, 256, 256, True), (64, 128, 128, False)]:
        sc = dict(p=p, n=n, l=2048, nc=2048 // q, H=24, G=1, hpg=24, hps=24, lo=0.0, hi=1e30, s_qb=2048, s_dl=3000)
        base = dict(Q=q, DT=tl.bfloat16 if on else tl.float32, INTERP=False, HAS_SEQ=on, HAS_D=on, HAS_INIT=on,
                    HAS_DFINAL=on, HAS_BIAS=on, SOFTPLUS=on, HAS_LIMIT=on, BP=p, BN=n, NQ=q // 16, SIZE=2)
        p = f"{p}{'' if on else '-off'}"
        bt, bns = B.side_blocks(q, n)
        nn, nb = n // bns, q // bt
        side = dict(BN=bns, NS=2 * nb + 2 * nn, BP=sc["p"])
        tuned = [("prep", F._prep_kernel, F._prune_prep, {}), ("fwd_state", F._fwd_state_kernel, F._prune_state, {}),
                 ("fwd_out", F._fwd_out_kernel, F._prune_out, {}),
                 ("bwd_state", B._bwd_state_kernel, F._prune_state, {}),
                 ("bwd_dcb", B._bwd_dcb_kernel, lambda configs, *args, **kw: configs,
                  dict(BT=bt, BP=sc["p"], BPK=sc["p"], NS=2 * nb + 2 * nn)),
                 ("bwd_dc", B._bwd_dc_kernel, B._prune_side, dict(side, SLOT=2 * nb)),
                 ("bwd_db", B._bwd_db_kernel, B._prune_side, dict(side, SLOT=2 * nb + nn, NQ=(q // 16) * nn)),
                 ("bwd_dx", B._bwd_dx_kernel, B._prune_dx, dict(BP=sc["p"], BN=n))]
        for name, kernel, prune, extra in tuned:
            arg_names = kernel.fn.arg_names
            consts = {k: v for k, v in {**base, **extra}.items()
                      if k in arg_names and (k not in ("BP", "BN") or k in extra)}
            cfg = prune(kernel.configs, dict(sc), **consts)[0]
            out[f"{name} p{p}"] = compile_for_h100(kernel, {**consts, **cfg.kwargs}, sc, bf16, cfg.num_warps,
                                                   cfg.num_stages)
        dt_consts = {k: base[k] for k in ("Q", "HAS_BIAS", "SOFTPLUS", "HAS_LIMIT", "INTERP")}
        dt_consts.update(BT=bt, NS=2 * nb + 2 * nn, NSP=triton.next_power_of_2(2 * nb + 2 * nn), NQ=(q // 16) * nn)
        out[f"bwd_dt p{p}"] = compile_for_h100(B._bwd_dt_kernel, dt_consts, sc, bf16, 4, 3)
        step_consts = dict(BP=4, BN=n, HAS_IDX=on, HAS_D=on, HAS_BIAS=on, HAS_Z=on, SOFTPLUS=on, HAS_LIMIT=not on,
                           INTERP=False, PDL=on)
        out[f"step p{p}"] = compile_for_h100(F._step_kernel, step_consts, sc, bf16, 4, 3)
    print(json.dumps(out))
""")


def test_every_kernel_compiles_for_h100():
    """Compile (to sm_90 machine code, with ptxas) each kernel at the 0.5B and 7B shapes with its first tuned config.
    Runs in a subprocess without TRITON_INTERPRET: the interpreter does not type-check kernels as the compiler does."""
    shared = json.loads(compile_script_last_line(_COMPILE_SCRIPT))
    assert len(shared) == 30 and all(0 <= v <= 227 * 1024 for v in shared.values()), shared


# ------------------------------------------------------------------------------------------------------------------
# Released shapes on a GPU (the lead runs these on an H100)
# ------------------------------------------------------------------------------------------------------------------

GPU_SHAPES = {   # name: (batch, length, heads, head dim, groups, state, chunk)
    "0.5B": (2, 2048, 24, 64, 1, 128, 128),
    "7B": (1, 2048, 24, 128, 1, 256, 256),
    "34B": (1, 1024, 32, 128, 2, 256, 256),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_bf16_released_shapes_within_twice_eager(shape):
    b, l, h, p, g, n, chunk = GPU_SHAPES[shape]
    vals = make_inputs(b=b, l=l, h=h, p=p, g=g, n=n, seed=11, realistic=True, device="cuda")
    vals = {k: (v * 0.3 if k in ("B", "C") else v) for k, v in vals.items()}   # keep C.B of order one at n = 256
    errors = compare(leaves(vals, torch.bfloat16), torch.bfloat16, chunk_size=chunk)
    print(shape, json.dumps({k: [f"{v:.2e}" for v in e] if isinstance(e, tuple) else f"{e:.2e}"
                             for k, e in errors.items()}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp32_and_packed_documents():
    vals = make_inputs(b=2, l=700, h=8, p=64, g=2, n=64, seed=12, realistic=True, device="cuda")
    # 3e-5: the A_log / dt_bias gradients are sums over 1400 tokens with cancellation
    compare(leaves(vals, torch.float32), torch.float32, tol=3e-5, chunk_size=128)
    seq_idx = (torch.arange(700, device="cuda") // 230).to(torch.int32)[None].expand(2, -1).contiguous()
    compare(leaves(vals, torch.float32), torch.float32, tol=3e-5, chunk_size=64, seq_idx=seq_idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dispatch_and_decode_step_at_7b_shape():
    from gyrfalcon.ops.ssd import ssd_scan, ssd_step

    vals = make_inputs(b=1, l=300, h=24, p=128, g=1, n=256, seed=13, realistic=True, device="cuda")
    inp = {k: v.detach() for k, v in leaves(vals, torch.bfloat16).items()}
    y = ssd_scan(**inp, chunk_size=256)
    assert torch.equal(y, ssd_triton.ssd_scan_triton(**inp, chunk_size=256))
    state = torch.randn(8, 24, 128, 256, device="cuda")
    x, dt = inp["x"][:, -1].expand(4, -1, -1).contiguous(), inp["dt"][:, -1].expand(4, -1).contiguous()
    B, C = inp["B"][:, -1].expand(4, -1, -1).contiguous(), inp["C"][:, -1].expand(4, -1, -1).contiguous()
    idx = torch.tensor([6, 1, 3, 0], device="cuda")
    before = state.clone()
    y = ssd_step(state, x, dt, inp["A_log"], B, C, inp["D"], inp["dt_bias"], state_indices=idx)
    y_ref, new = ssd_step_ref(before[idx].double(), x.double(), dt.double(), inp["A_log"].double(), B.double(),
                              C.double(), inp["D"].double(), inp["dt_bias"].double())
    assert rel_err(y, y_ref) <= 2 ** -8 and rel_err(state[idx], new) <= FP32_TOL
