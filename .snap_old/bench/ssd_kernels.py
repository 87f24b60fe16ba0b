"""Benchmark: gyrfalcon's Triton SSD scan (forward, forward + backward) and decode step against mamba_ssm's kernels and
the PyTorch reference, on one GPU, at the released Falcon-H1 Mamba shapes (bf16).

    PYTHONPATH=.baseline/stub:.baseline/mamba_ssm-2.3.2.post1:.baseline/pydeps python bench/ssd_kernels.py
    python bench/ssd_kernels.py --no-reference      # skip the (slow) PyTorch reference timings
    python bench/ssd_kernels.py --with-34b          # add the 34B shape (h=32, p=128, n=256, g=2)
    python bench/ssd_kernels.py --grid --only 7B    # the per-op grid at the 7B shape only

mamba_ssm (2.3.2.post1 sources, see bench/setup_baselines.sh) is imported if it can be; otherwise one JSON line
says why and the rest runs without it. Inputs are laid out as the model produces them: x, B, C are channel slices of
the conv output (row stride = conv width), dt a slice of in_proj's output; the scan is called as the model calls it
(softplus, dt_bias, D; mamba_ssm gets A = -exp(A_log), computed inside the timed region as the model would).
Timing: triton.testing.do_bench median after a warm-up call. One JSON line per measurement:
    {"op", "impl", "shape", "batch", "seqlen", "dtype", "pass": "fwd" | "fwd+bwd", "ms", "ratio_vs_mamba_ssm"}
ratio_vs_mamba_ssm = mamba_ssm's ms / this impl's ms (above 1: faster than mamba_ssm; the target is >= 1.3 at 0.5B
and >= 1 at 7B for "fwd+bwd"). Also printed: first-call times (compile + autotune) and the autotuner's choice per
kernel, the GPU time of each kernel in one forward + backward (torch.profiler), max relative errors of y and of every
gradient against mamba_ssm and against the float64 reference (computed on the first 1024 tokens), and the decode step
against mamba_ssm's selective_state_update (CUDA-graph replay) with the share of HBM bandwidth it reaches (reads +
writes of the state over 3.35 TB/s). Total runtime: about 2-3 minutes on an H100, 6-7 with --grid (mamba_ssm's own
first-call autotuning included).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import triton
import triton.testing

from gyrfalcon.benchmark.timing import graph_replay_seconds
from gyrfalcon.ops.ssd import ssd_scan_ref, ssd_step_ref
from gyrfalcon.ops.ssd_triton import ssd_scan_triton, ssd_step_triton, tuning_report

HBM_BYTES_PER_S = 3.35e12
DTYPE = torch.bfloat16
# name: (batch, seqlen, heads, head dim, groups, state, chunk)
SCAN_SHAPES = [("0.5B", 4, 2048, 24, 64, 1, 128, 128), ("7B", 1, 2048, 24, 128, 1, 256, 256),
               ("7B", 1, 8192, 24, 128, 1, 256, 256)]
GRID_SHAPES = [(name, b, l, h, p, 1, n, chunk) for name, h, p, n, chunk in (("0.5B", 24, 64, 128, 128),
                                                                            ("7B", 24, 128, 256, 256))
               for b in (1, 4) for l in (2048, 8192, 32768)]
SHAPE_34B = ("34B", 1, 2048, 32, 128, 2, 256, 256)     # --with-34b (one more autotuning key for both libraries)
STEP_SHAPES = [("0.5B", 1, 24, 64, 1, 128), ("0.5B", 16, 24, 64, 1, 128), ("7B", 1, 24, 128, 1, 256),
               ("7B", 16, 24, 128, 1, 256)]


def emit(**fields):
    print(json.dumps(fields), flush=True)


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def load_mamba():
    """mamba_ssm's two entry points, or (None, None) after printing why not."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:  # noqa: BLE001 - any import failure means: no baseline, say why
        emit(op="ssd_scan", impl="mamba_ssm", status="unavailable", reason=f"{type(exc).__name__}: {exc}")
        return None, None
    return mamba_chunk_scan_combined, selective_state_update


def scan_inputs(b, l, h, p, g, n, seed=0):
    """Model-like inputs: x | B | C slices of one conv output, dt a slice of a wider in_proj output; Mamba-2 init for
    dt_bias (dt in [1e-3, 0.1]) and A_log (A in [-16, -1])."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    conv = torch.randn(b, l, h * p + 2 * g * n, device="cuda", generator=gen).mul_(0.5).to(DTYPE)
    x, B, C = conv.split([h * p, g * n, g * n], dim=-1)
    x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
    dt = torch.randn(b, l, 2 * h, device="cuda", generator=gen).to(DTYPE)[..., :h]
    dt0 = torch.exp(torch.rand(h, device="cuda", generator=gen) * math.log(100.0) + math.log(1e-3))
    params = dict(A_log=torch.log(1 + 15 * torch.rand(h, device="cuda", generator=gen)),
                  D=torch.randn(h, device="cuda", generator=gen), dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    leaves = {"x": x, "dt": dt, "B": B, "C": C, **params}
    for t in leaves.values():
        t.requires_grad_(True)
    return leaves


def impls(mamba_scan, chunk):
    out = {"gyrfalcon": lambda t: ssd_scan_triton(t["x"], t["dt"], t["A_log"], t["B"], t["C"], t["D"], t["dt_bias"],
                                                  chunk_size=chunk),
           "torch_reference": lambda t: ssd_scan_ref(t["x"], t["dt"], t["A_log"], t["B"], t["C"], t["D"],
                                                     t["dt_bias"], chunk_size=chunk)}
    if mamba_scan is not None:
        out["mamba_ssm"] = lambda t: mamba_scan(t["x"], t["dt"], -torch.exp(t["A_log"]), t["B"], t["C"], chunk,
                                                D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    return out


def outputs_and_grads(fn, t, dy):
    names = list(t)
    y = fn(t)
    grads = torch.autograd.grad(y, [t[k] for k in names], dy)
    return {"y": y.detach(), **{"d" + k: g for k, g in zip(names, grads)}}


def bench_scan(mamba_scan, with_reference: bool, shapes):
    first_call_done = set()
    for shape, b, l, h, p, g, n, chunk in shapes:
        t = scan_inputs(b, l, h, p, g, n)
        dy = torch.randn(b, l, h, p, device="cuda", dtype=DTYPE)
        fns = impls(mamba_scan, chunk)
        if not with_reference:
            fns.pop("torch_reference")
        base = dict(op="ssd_scan", shape=shape, batch=b, seqlen=l, dtype="bf16")

        key = (p, n, chunk)       # autotune key: later shapes with the same key reuse the tuning
        for name in ("gyrfalcon", "mamba_ssm"):
            if name in fns and (name, key) not in first_call_done:
                torch.cuda.synchronize()
                start = time.perf_counter()
                outputs_and_grads(fns[name], t, dy)
                torch.cuda.synchronize()
                emit(**base, impl=name, first_call_s=round(time.perf_counter() - start, 2),
                     note="first forward + backward: compile and autotune")
                first_call_done.add((name, key))
        if ("report", key) not in first_call_done:
            emit(**base, impl="gyrfalcon", tuning=tuning_report())
            first_call_done.add(("report", key))

        times = {}
        for name, fn in fns.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(t)

            def fwd_bwd(fn=fn):
                return torch.autograd.grad(fn(t), list(t.values()), dy)

            times[name] = {"fwd": timed(fwd), "fwd+bwd": timed(fwd_bwd)}
        for name, passes in times.items():
            for pas, ms in passes.items():
                ratio = times["mamba_ssm"][pas] / ms if "mamba_ssm" in times else None
                emit(**base, impl=name, **{"pass": pas}, ms=round(ms, 4),
                     ratio_vs_mamba_ssm=round(ratio, 3) if ratio is not None else None)

        emit(**base, impl="gyrfalcon", **{"pass": "fwd+bwd"}, kernel_us=kernel_breakdown(fns["gyrfalcon"], t, dy))
        ours = outputs_and_grads(fns["gyrfalcon"], t, dy)
        if "mamba_ssm" in fns:
            theirs = outputs_and_grads(fns["mamba_ssm"], t, dy)
            emit(**base, check="max_rel_err_gyrfalcon_vs_mamba_ssm",
                 **{k: f"{rel(ours[k], theirs[k]):.2e}" for k in ours})
        del ours
        torch.cuda.empty_cache()
        check_against_float64(base, t, dy, fns, chunk, min(l, 1024))


def kernel_breakdown(fn, t, dy, iters: int = 5) -> dict:
    """Mean GPU microseconds per call of each kernel launched by one forward + backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(fn(t), list(t.values()), dy)
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        if not str(getattr(evt, "device_type", "")).endswith("CUDA"):
            continue      # CPU-side ops would count their kernels' time a second time
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us:
            out[evt.key[:60]] = round(us / iters, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def check_against_float64(base, t, dy, fns, chunk, length):
    """Errors of each impl (and of eager PyTorch in bf16) against the float64 reference on the first `length` tokens."""
    def reference(u):
        return ssd_scan_ref(u["x"], u["dt"], u["A_log"], u["B"], u["C"], u["D"], u["dt_bias"], chunk_size=chunk)

    cut = {k: (v.detach()[:, :length] if v.dim() > 1 else v.detach()).requires_grad_() for k, v in t.items()}
    dy_cut = dy[:, :length]
    ref = outputs_and_grads(reference, {k: v.detach().double().requires_grad_() for k, v in cut.items()},
                            dy_cut.double())
    contenders = [("eager_bf16", reference)] + [(k, v) for k, v in fns.items() if k != "torch_reference"]
    for name, fn in contenders:
        got = outputs_and_grads(fn, cut, dy_cut)
        emit(**base, check=f"max_rel_err_vs_float64_first_{length}_tokens", impl=name,
             **{k: f"{rel(got[k], ref[k]):.2e}" for k in ref})
    torch.cuda.empty_cache()


STEP_LAUNCHES = [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2), (16, 2), (8, 4), (16, 4), (32, 4), (16, 8), (32, 8)]


def bench_step(mamba_step, sweep: bool = False):
    for shape, b, h, p, g, n in STEP_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(1)
        state = torch.randn(b, h, p, n, device="cuda", generator=gen)
        x = torch.randn(b, h, p, device="cuda", generator=gen).to(DTYPE)
        dt = torch.randn(b, h, device="cuda", generator=gen).to(DTYPE)
        B, C = (torch.randn(b, g, n, device="cuda", generator=gen).to(DTYPE) for _ in range(2))
        A_log, D = torch.rand(h, device="cuda", generator=gen) * 2, torch.randn(h, device="cuda", generator=gen)
        dt_bias = torch.randn(h, device="cuda", generator=gen) - 4
        z = torch.randn(b, h, p, device="cuda", generator=gen).to(DTYPE)
        base = dict(op="ssd_step", shape=shape, batch=b, seqlen=1, dtype="bf16", **{"pass": "fwd"})
        state_bytes = 2 * state.numel() * 4
        fns = {"gyrfalcon": lambda s: ssd_step_triton(s, x, dt, A_log, B, C, D, dt_bias, z=z),
               "torch_reference": lambda s: ssd_step_ref(s, x, dt, A_log, B, C, D, dt_bias)}
        if sweep:   # (state rows per program, warps): to choose ssd_step_triton's launch shape
            for bp, warps in STEP_LAUNCHES:
                fns[f"gyrfalcon[BP={bp},warps={warps}]"] = (
                    lambda s, launch=(bp, warps): ssd_step_triton(s, x, dt, A_log, B, C, D, dt_bias, z=z,
                                                                  launch=launch))
        if mamba_step is not None:
            # the layout transformers hands it: per-head values broadcast over the head dim with stride 0
            A = (-torch.exp(A_log))[:, None, None].expand(h, p, n)
            fns["mamba_ssm"] = lambda s: mamba_step(s, x, dt[..., None].expand(b, h, p), A, B, C,
                                                    D=D[:, None].expand(h, p), z=z,
                                                    dt_bias=dt_bias[:, None].expand(h, p), dt_softplus=True)
        times = {}
        for name, fn in fns.items():
            work = state.clone()
            # replayed from a CUDA graph, as the decode step runs: a few-microsecond kernel timed one launch at a
            # time (do_bench) measures launch gaps and clock ramps, not the kernel
            times[name] = graph_replay_seconds(lambda fn=fn, work=work: fn(work)) * 1e3
        for name, ms in times.items():
            ratio = times["mamba_ssm"] / ms if "mamba_ssm" in times else None
            emit(**base, impl=name, ms=round(ms, 5), ratio_vs_mamba_ssm=round(ratio, 3) if ratio else None,
                 hbm_share=round(state_bytes / HBM_BYTES_PER_S * 1e3 / ms, 3))
        if "mamba_ssm" in fns:
            s1, s2 = state.clone(), state.clone()
            y1, y2 = fns["gyrfalcon"](s1), fns["mamba_ssm"](s2)
            emit(**base, check="max_rel_err_gyrfalcon_vs_mamba_ssm", y=f"{rel(y1, y2):.2e}",
                 state=f"{rel(s1, s2):.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference")
    parser.add_argument("--with-34b", action="store_true", help="also the 34B shape (h=32, p=128, n=256, g=2)")
    parser.add_argument("--grid", action="store_true",
                        help="the per-op grid instead of the default shapes: 0.5B and 7B x batch 1, 4 x 2K, 8K, 32K")
    parser.add_argument("--only", nargs="+", metavar="SHAPE",
                        help="scan shapes of these models only, e.g. --only 7B (the decode step runs as usual)")
    parser.add_argument("--step-sweep", action="store_true", help="also time the decode step at several launch shapes")
    parser.add_argument("--step-only", action="store_true", help="time the decode step only (no scan)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/ssd_kernels.py needs a CUDA GPU")
    start = time.perf_counter()
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    mamba_scan, mamba_step = load_mamba()
    shapes = GRID_SHAPES if args.grid else SCAN_SHAPES
    if args.only:
        shapes = [s for s in shapes if s[0] in args.only]
    if not args.step_only:
        bench_scan(mamba_scan, with_reference=not args.no_reference,
                   shapes=shapes + ([SHAPE_34B] if args.with_34b else []))
    bench_step(mamba_step, sweep=args.step_sweep)
    emit(total_s=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
