"""Benchmark: the causal conv1d and (gated) RMSNorm Triton kernels against their PyTorch references, one GPU.

    python bench/conv_norm_kernels.py            # 0.5B (batch 4 x 2048) and 7B (batch 1 x 8192) shapes, bf16
    python bench/conv_norm_kernels.py --sweep    # also conv launch shapes, each pass alone (to choose
                                                 # conv_triton.default_launch), and plain copies of the same bytes
    python bench/conv_norm_kernels.py --grid     # the conv alone over the Mamba issue's grid: 0.5B and 7B, batch 1
                                                 # and 4, 2K/8K/32K tokens, also on a contiguous x (diagnostic)

Inputs are laid out as the model produces them: the conv's x and the gate z are channel slices of in_proj's output
(row stride = in_proj width), the scan output y and the hidden states are contiguous. Every op with a weight is
timed with it trainable ("weight_grad": true, full fine-tuning) and frozen (false: LoRA, the common case).
Timing: triton.testing.do_bench median after warm-up. One JSON line per measurement:
    {"op", "impl", "shape", "batch", "seqlen", "dtype", "pass", "ms", "gbps", "floor_ms", "share_of_floor", ...}
floor = bytes that must cross HBM / 3.35e12 B/s (H100 SXM): conv fwd reads x and writes y, fwd+bwd also reads dy and
writes dx; norms read each input and write each output once per pass (the backward re-reads the forward's inputs).
The conv's backward must also read x again (the SiLU's derivative needs the pre-activation, which the forward does not
store): its fwd+bwd lines also carry `min_passes_floor_ms` (5 passes: x twice, y, dy, dx), the least any pair of
separate forward and backward kernels can move.
gbps is those floor bytes over the measured time. kernel_ms is the GPU time of the launched kernels alone
(torch.profiler), and kernel_share_of_floor the floor over it: small ops timed one call at a time are bound by
the host's launch overhead, which a model step hides behind other GPU work. The conv's Triton lines also carry
span_ms: the call replayed from a CUDA graph, each pass timed from its first kernel's start to its last one's end
(the gaps between a pass's kernels count; two kernels' overlap under programmatic dependent launch counts once;
the gap between the forward and the backward does not: in a model other work runs there), and fwd+bwd lines
span_over_min_passes. Triton lines of the forward pass also carry max_rel_err against the reference on the same
inputs. Runs in well under 2 minutes.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from gyrfalcon import FalconH1Config
from gyrfalcon.ops.conv import causal_conv1d_ref
from gyrfalcon.ops.conv_triton import ConvLaunch, causal_conv1d_triton
from gyrfalcon.ops.norm import gated_rms_norm_ref, rms_norm_ref
from gyrfalcon.ops.norm_triton import gated_rms_norm_triton, rms_norm_triton

HBM_BYTES_PER_S = 3.35e12
SHAPES = [("0.5B", 4, 2048), ("7B", 1, 8192)]
GRID = [(shape, b, l) for shape in ("0.5B", "7B") for b in (1, 4) for l in (2048, 8192, 32768)]
DTYPE = torch.bfloat16
FORWARD_SWEEP = [ConvLaunch(128, 32, 1), ConvLaunch(128, 32, 2), ConvLaunch(128, 16, 1), ConvLaunch(64, 32, 1),
                 ConvLaunch(128, 64, 1), ConvLaunch(256, 32, 2)]
BACKWARD_SWEEP = [ConvLaunch(128, 32, 2), ConvLaunch(128, 64, 2), ConvLaunch(128, 128, 2), ConvLaunch(128, 256, 2),
                  ConvLaunch(128, 64, 4), ConvLaunch(128, 128, 4), ConvLaunch(256, 64, 4), ConvLaunch(64, 64, 1),
                  ConvLaunch(64, 128, 1), ConvLaunch(128, 16, 2), ConvLaunch(256, 128, 4)]


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_ms(fn, iters: int = 20) -> float:
    """GPU time of the kernels one call launches (torch.profiler), without the host's launch overhead: at these
    sizes a lone call is bound by Python and launch latency, which a model step hides behind other GPU work."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for evt in prof.key_averages():
        if str(getattr(evt, "device_type", "")).endswith("CUDA"):
            total_us += getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
    return total_us / iters / 1e3


def graph_span_ms(fn, first_pass_kernels: int | None = None, replays: int = 20) -> float:
    """GPU time of one call captured in a CUDA graph, from its first kernel's start to its last one's end, with the
    gap between the forward's kernels and the backward's taken out (in a model other work runs there):
    first_pass_kernels = how many of the call's kernels are the forward's (None: the call is one pass). Unlike
    kernel_ms this counts the gaps between one pass's kernels (a kernel waiting for the one before it) and does not
    count twice the time two kernels overlap (programmatic dependent launch). Median over replays."""
    from torch.profiler import ProfilerActivity, profile

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(_gpu_intervals(prof))
    per_call = len(kernels) // replays
    if per_call == 0 or len(kernels) % replays:
        raise RuntimeError(f"graph_span_ms: {len(kernels)} kernels over {replays} replays")
    split = first_pass_kernels if first_pass_kernels is not None else per_call
    spans = []
    for i in range(replays):
        call = kernels[i * per_call:(i + 1) * per_call]
        spans.append(sum(max(e for _, e in p) - p[0][0] for p in (call[:split], call[split:]) if p))
    del graph
    return sorted(spans)[len(spans) // 2] / 1e3


def emit(op, impl, shape, b, l, pas, ms, floor_bytes, **extra):
    floor_ms = floor_bytes / HBM_BYTES_PER_S * 1e3
    print(json.dumps({"op": op, "impl": impl, "shape": shape, "batch": b, "seqlen": l, "dtype": "bf16", "pass": pas,
                      "ms": round(ms, 5), "gbps": round(floor_bytes / (ms * 1e-3) / 1e9, 1),
                      "floor_ms": round(floor_ms, 5), "share_of_floor": round(floor_ms / ms, 3), **extra}), flush=True)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def fwd_and_fwd_bwd(fn, inputs, cot):
    """Two closures: the forward alone, and forward + gradients of every input that requires one."""
    wrt = [t for t in inputs if t is not None and t.requires_grad]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        return torch.autograd.grad(fn(*inputs), wrt, cot)

    return fwd, fwd_bwd


def count_kernels(fn) -> int:
    """Kernels one call of fn launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return len(_gpu_intervals(prof))


def _gpu_intervals(prof) -> list[tuple[float, float]]:
    """(start, end) in us of every GPU activity (kernels, copies) a torch.profiler run recorded."""
    return [(e.time_range.start, e.time_range.end) for e in prof.events()
            if str(getattr(e, "device_type", "")).endswith("CUDA")]


def bench_pair(op, shape, b, l, impls, inputs, cot, floor_fwd, floor_fwd_bwd, min_bytes_fwd_bwd=None, spans=False,
               **extra):
    """Times every impl on the same inputs; the first impl is the reference the others' outputs are checked against.
    min_bytes_fwd_bwd: the least bytes separate forward and backward kernels can move, where above floor_fwd_bwd.
    spans: also time each kernel impl from a CUDA graph (span_ms, see graph_span_ms)."""
    ref_out = None
    for name, fn in impls:
        fwd, fwd_bwd = fwd_and_fwd_bwd(fn, inputs, cot)
        out = fwd()
        check = {} if ref_out is None else {"max_rel_err": round(max_rel_err(out, ref_out), 6)}
        ref_out = out if ref_out is None else ref_out
        fwd_kernels = None
        for pas, f, floor in (("fwd", fwd, floor_fwd), ("fwd+bwd", fwd_bwd, floor_fwd_bwd)):
            gpu_ms = kernel_ms(f)
            more = dict(check) if pas == "fwd" else {}
            if spans and name != "torch-ref":
                if pas == "fwd":
                    fwd_kernels = count_kernels(f)
                span = graph_span_ms(f, fwd_kernels if pas == "fwd+bwd" else None)
                more["span_ms"] = round(span, 5)
            if pas == "fwd+bwd" and min_bytes_fwd_bwd is not None:
                min_ms = min_bytes_fwd_bwd / HBM_BYTES_PER_S * 1e3
                more.update(min_passes_floor_ms=round(min_ms, 5), kernel_over_min_passes=round(gpu_ms / min_ms, 3))
                if "span_ms" in more:
                    more["span_over_min_passes"] = round(more["span_ms"] / min_ms, 3)
            emit(op, name, shape, b, l, pas, timed(f), floor, kernel_ms=round(gpu_ms, 5),
                 kernel_share_of_floor=round(floor / HBM_BYTES_PER_S * 1e3 / gpu_ms, 3), **more, **extra)


def conv_case(cfg, shape, b, l, sweep, contiguous_x=False, with_reference=True, weight_grads=(True, False)):
    """contiguous_x: x as a contiguous tensor instead of in_proj's channel slice (a diagnostic of the layout's cost)."""
    d = cfg.conv_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    zxbcdt = torch.randn(b, l, cfg.in_proj_size, device="cuda", dtype=DTYPE, generator=gen)
    x = zxbcdt[..., cfg.d_ssm:cfg.d_ssm + d].detach()                             # strided, as in the model
    x = (x.contiguous() if contiguous_x else x).requires_grad_()
    cot = torch.randn(b, l, d, device="cuda", dtype=DTYPE, generator=gen)
    n = b * l * d * DTYPE.itemsize
    impls = ([("torch-ref", causal_conv1d_ref)] if with_reference else []) + [("triton", causal_conv1d_triton)]
    if sweep:
        copy_calibration(shape, b, l, x, n, channels=d)
        launch_sweep(shape, b, l, x, cfg.mamba_d_conv, n, gen)
    for weight_grad in weight_grads:  # full fine-tuning; LoRA (conv weights frozen)
        w = (torch.randn(d, cfg.mamba_d_conv, device="cuda", generator=gen) * 0.3).to(DTYPE)
        bias = (torch.randn(d, device="cuda", generator=gen) * 0.1).to(DTYPE)
        w.requires_grad_(weight_grad)
        bias.requires_grad_(weight_grad)
        bench_pair("causal_conv1d", shape, b, l, impls, [x, w, bias], cot, 2 * n, 4 * n, 5 * n, spans=True,
                   channels=d, weight_grad=weight_grad, x_layout="contiguous" if contiguous_x else "in_proj slice")


def launch_sweep(shape, b, l, x, k, n, gen):
    """Kernel time of each pass alone under each launch shape of the sweep lists (bias, SiLU, no seq_idx), the
    backward with frozen weights and with the weight and bias gradients."""
    from gyrfalcon.ops.conv_triton import _backward, _forward

    d = x.shape[-1]
    x = x.detach()
    w = (torch.randn(d, k, device="cuda", generator=gen) * 0.3).to(DTYPE)
    bias = (torch.randn(d, device="cuda", generator=gen) * 0.1).to(DTYPE)
    dy = torch.randn(b, l, d, device="cuda", dtype=DTYPE, generator=gen)
    floor_ms = {"fwd": 2 * n / HBM_BYTES_PER_S * 1e3, "bwd": 3 * n / HBM_BYTES_PER_S * 1e3}
    runs = [("fwd", launch, False, lambda launch=launch: _forward(x, w, bias, None, None, True, False, launch))
            for launch in FORWARD_SWEEP]
    runs += [("bwd", launch, want_dw, lambda launch=launch, want_dw=want_dw: _backward(
                 x, w, bias, None, None, dy, None, True, want_dw, want_dw, False, launch))
             for launch in BACKWARD_SWEEP for want_dw in (False, True)]
    for pas, launch, want_dw, fn in runs:
        ms = kernel_ms(fn)
        print(json.dumps({"op": "causal_conv1d_launch", "shape": shape, "batch": b, "seqlen": l, "pass": pas,
                          "launch": [launch.block_d, launch.chunk_l, launch.num_warps], "weight_grad": want_dw,
                          "kernel_ms": round(ms, 5), "kernel_over_floor": round(ms / floor_ms[pas], 3)}), flush=True)


def copy_calibration(shape, b, l, x, n, **extra):
    """What plain copies of the conv's bytes achieve on this device (the practical floor of a streaming op): the
    strided slice x into a contiguous tensor, and a contiguous tensor of the same size into another."""
    src = x.detach().contiguous()
    dst = torch.empty_like(src)
    for name, fn in (("strided-to-contiguous", lambda: dst.copy_(x.detach())),
                     ("contiguous-to-contiguous", lambda: dst.copy_(src))):
        emit("copy", name, shape, b, l, "fwd", timed(fn), 2 * n, kernel_ms=round(kernel_ms(fn), 5), **extra)


def rms_case(cfg, shape, b, l):
    h = cfg.hidden_size
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(b, l, h, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    cot = torch.randn(b, l, h, device="cuda", dtype=DTYPE, generator=gen)
    n = b * l * h * DTYPE.itemsize
    eps = cfg.rms_norm_eps
    for weight_grad in (True, False):
        w = (1 + 0.1 * torch.randn(h, device="cuda", generator=gen)).to(DTYPE).requires_grad_(weight_grad)
        impls = [("torch-ref", lambda x, w: rms_norm_ref(x, w, eps)),
                 ("triton", lambda x, w: rms_norm_triton(x, w, eps))]
        bench_pair("rms_norm", shape, b, l, impls, [x, w], cot, 2 * n, 5 * n, channels=h, weight_grad=weight_grad)


def gated_case(cfg, shape, b, l):
    d = cfg.d_ssm
    gen = torch.Generator(device="cuda").manual_seed(2)
    zxbcdt = torch.randn(b, l, cfg.in_proj_size, device="cuda", dtype=DTYPE, generator=gen)
    z = zxbcdt[..., :d].detach().requires_grad_()                                 # strided, as in the model
    y = torch.randn(b, l, d, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    cot = torch.randn(b, l, d, device="cuda", dtype=DTYPE, generator=gen)
    n = b * l * d * DTYPE.itemsize
    kw = dict(eps=cfg.rms_norm_eps, n_groups=cfg.mamba_n_groups, norm_before_gate=cfg.mamba_norm_before_gate,
              out_dtype=DTYPE)
    for weight_grad in ((True, False) if cfg.mamba_rms_norm else (None,)):
        w = None
        if weight_grad is not None:
            w = (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).to(DTYPE).requires_grad_(weight_grad)
        impls = [("torch-ref", lambda y, z, w: gated_rms_norm_ref(y, z, w, **kw)),
                 ("triton", lambda y, z, w: gated_rms_norm_triton(y, z, w, **kw))]
        extra = {"channels": d, "groups": cfg.mamba_n_groups, "weight": w is not None}
        if weight_grad is not None:
            extra["weight_grad"] = weight_grad
        bench_pair("gated_rms_norm", shape, b, l, impls, [y, z, w], cot, 3 * n, 8 * n, **extra)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="also time conv launch shapes (each pass alone) and plain copies of the same bytes")
    parser.add_argument("--grid", action="store_true",
                        help="only the conv, over 0.5B/7B x batch 1/4 x 2K/8K/32K (reference at 2K only), on the "
                             "model's strided x and on a contiguous copy")
    args = parser.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}), flush=True)
    if args.grid:
        for shape, b, l in GRID:
            cfg = FalconH1Config.from_preset(shape)
            conv_case(cfg, shape, b, l, args.sweep, with_reference=l == 2048)
            conv_case(cfg, shape, b, l, False, contiguous_x=True, with_reference=False, weight_grads=(False,))
        return
    for shape, b, l in SHAPES:
        cfg = FalconH1Config.from_preset(shape)
        conv_case(cfg, shape, b, l, args.sweep)
        rms_case(cfg, shape, b, l)
        gated_case(cfg, shape, b, l)


if __name__ == "__main__":
    main()
