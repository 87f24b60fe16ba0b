"""Benchmark: the causal conv1d and (gated) RMSNorm Triton kernels against their PyTorch references, one GPU.

    python bench/conv_norm_kernels.py            # 0.5B (batch 4 x 2048) and 7B (batch 1 x 8192) shapes, bf16
    python bench/conv_norm_kernels.py --sweep    # also a few conv launch shapes (to choose conv_triton defaults)
    python bench/conv_norm_kernels.py --sweep --conv-only    # the conv lines alone

Inputs are laid out as the model produces them: the conv's x and the gate z are channel slices of in_proj's output
(row stride = in_proj width), the scan output y and the hidden states are contiguous. Every op with a weight is
timed with it trainable ("weight_grad": true, full fine-tuning) and frozen (false: LoRA, the common case).
Timing: triton.testing.do_bench median after warm-up. One JSON line per measurement:
    {"op", "impl", "shape", "batch", "seqlen", "dtype", "pass", "ms", "gbps", "floor_ms", "share_of_floor", ...}
floor = bytes that must cross HBM / 3.35e12 B/s (H100 SXM): conv fwd reads x and writes y, fwd+bwd also reads dy and
writes dx; norms read each input and write each output once per pass (the backward re-reads the forward's inputs).
gbps is those floor bytes over the measured time. kernel_ms is the GPU time of the launched kernels alone
(torch.profiler), and kernel_share_of_floor the floor over it: small ops timed one call at a time are bound by
the host's launch overhead, which a model step hides behind other GPU work. Triton lines of the forward pass also
carry max_rel_err against the reference on the same inputs. Runs in well under 2 minutes.

--sweep adds, for the conv, row-walk launch shapes (impl "triton[...]", both passes) and the 2-D tiled kernels
("variant" names the family and pass, "launch" the shape): "triton-tiled" (conv_triton.tiled_launch for both passes,
timed like the other impls); tiled forward shapes, timed on the forward alone ("variant": "tiled-fwd"); tiled
backward shapes behind the default tiled forward ("variant": "tiled-bwd"; fwd+bwd lines, with "bwd_kernel_ms" =
kernel_ms minus that forward's kernel_ms, and max_rel_err of the gradients against the default launch's). A shape that
fails to compile or run prints an "error" line instead. The tiled sweep takes well under a minute of GPU time.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from gyrfalcon import FalconH1Config
from gyrfalcon.ops.conv import causal_conv1d_ref
from gyrfalcon.ops.conv_triton import ConvLaunch, causal_conv1d_triton, tiled_launch
from gyrfalcon.ops.norm import gated_rms_norm_ref, rms_norm_ref
from gyrfalcon.ops.norm_triton import gated_rms_norm_triton, rms_norm_triton

HBM_BYTES_PER_S = 3.35e12
SHAPES = [("0.5B", 4, 2048), ("7B", 1, 8192)]
DTYPE = torch.bfloat16
SWEEP = [ConvLaunch(256, 32, 8, 1), ConvLaunch(256, 64, 8, 1), ConvLaunch(256, 64, 8, 2), ConvLaunch(512, 64, 8, 2),
         ConvLaunch(128, 64, 8, 1), ConvLaunch(256, 128, 16, 2)]
# 2-D tiles, (block_l, block_d, num_warps, tiles): 16 to 32 elements a thread, all without register spills for sm_90
TILED_FWD = [(64, 128, 8, 1), (32, 128, 8, 1), (128, 128, 16, 1), (64, 64, 8, 1), (32, 128, 4, 1), (64, 256, 16, 1),
             (64, 128, 8, 4), (32, 128, 8, 4)]
# (g_shift, block_l, block_d, num_warps, tiles): 8 elements a thread (the backward keeps about ten tiles live)
TILED_BWD = [("recompute", 16, 128, 8, 1), ("recompute", 32, 64, 8, 1), ("recompute", 32, 128, 16, 1),
             ("recompute", 16, 128, 8, 4), ("gather", 32, 64, 8, 1), ("gather", 64, 64, 16, 1),
             ("gather", 32, 128, 16, 1), ("gather", 32, 64, 8, 4)]


def timed(fn, rep: int = 100) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


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


def bench_pair(op, shape, b, l, impls, inputs, cot, floor_fwd, floor_fwd_bwd, **extra):
    """Times every impl on the same inputs; the first impl is the reference the others' outputs are checked against."""
    ref_out = None
    for name, fn in impls:
        fwd, fwd_bwd = fwd_and_fwd_bwd(fn, inputs, cot)
        out = fwd()
        check = {} if ref_out is None else {"max_rel_err": round(max_rel_err(out, ref_out), 6)}
        ref_out = out if ref_out is None else ref_out
        for pas, f, floor in (("fwd", fwd, floor_fwd), ("fwd+bwd", fwd_bwd, floor_fwd_bwd)):
            gpu_ms = kernel_ms(f)
            emit(op, name, shape, b, l, pas, timed(f), floor, kernel_ms=round(gpu_ms, 5),
                 kernel_share_of_floor=round(floor / HBM_BYTES_PER_S * 1e3 / gpu_ms, 3),
                 **(check if pas == "fwd" else {}), **extra)


def conv_case(cfg, shape, b, l, sweep):
    d = cfg.conv_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    zxbcdt = torch.randn(b, l, cfg.in_proj_size, device="cuda", dtype=DTYPE, generator=gen)
    x = zxbcdt[..., cfg.d_ssm:cfg.d_ssm + d].detach().requires_grad_()          # strided, as in the model
    cot = torch.randn(b, l, d, device="cuda", dtype=DTYPE, generator=gen)
    n = b * l * d * DTYPE.itemsize
    impls = [("torch-ref", causal_conv1d_ref), ("triton", causal_conv1d_triton)]
    if sweep:
        for launch in SWEEP:
            impls.append((f"triton[bd={launch.block_d},cl={launch.chunk_l},u={launch.unroll},w={launch.num_warps}]",
                          lambda *a, launch=launch: causal_conv1d_triton(*a, launch=launch)))
    if sweep:
        def tiled(*a):
            return causal_conv1d_triton(*a, launch=tiled_launch(b, l, d, x.device),
                                        launch_bwd=tiled_launch(b, l, d, x.device, backward=True))

        impls.append(("triton-tiled", tiled))
    params = {}
    for weight_grad in (True, False):  # full fine-tuning; LoRA (conv weights frozen)
        w = (torch.randn(d, cfg.mamba_d_conv, device="cuda", generator=gen) * 0.3).to(DTYPE)
        bias = (torch.randn(d, device="cuda", generator=gen) * 0.1).to(DTYPE)
        w.requires_grad_(weight_grad)
        bias.requires_grad_(weight_grad)
        params[weight_grad] = (w, bias)
        bench_pair("causal_conv1d", shape, b, l, impls, [x, w, bias], cot, 2 * n, 4 * n, channels=d,
                   weight_grad=weight_grad)
    if sweep:
        conv_tiled_sweep(shape, b, l, x, cot, params, n)


def launch_fields(launch: ConvLaunch) -> dict:
    return {"block_l": launch.block_l, "block_d": launch.block_d, "num_warps": launch.num_warps,
            "g_shift": launch.g_shift, "tiles": launch.tiles}


def conv_tiled_sweep(shape, b, l, x, cot, params, n):
    """The tiled kernels' launch shapes on the conv_case inputs (x strided as in the model; params: weight_grad ->
    (weight, bias)). Forward shapes: the forward alone (weights frozen: the forward does not care). Backward shapes:
    forward + backward behind the default tiled forward, trainable and frozen weights, gradients checked against
    the default launch's on the same inputs."""
    d = x.shape[-1]
    floor_fwd, floor_fwd_bwd = 2 * n, 4 * n
    common = dict(channels=d)
    w, bias = params[False]
    ref_y = causal_conv1d_ref(x, w, bias)
    for bl, bd, warps, tiles in TILED_FWD:
        name = f"triton-tiled[fwd bl={bl},bd={bd},w={warps},t={tiles}]"
        try:
            launch = ConvLaunch(block_d=bd, num_warps=warps, tiled=True, block_l=bl, tiles=tiles)

            def fwd(launch=launch):
                with torch.no_grad():
                    return causal_conv1d_triton(x, w, bias, launch=launch)

            err = round(max_rel_err(fwd(), ref_y), 6)
            gpu_ms = kernel_ms(fwd)
            emit("causal_conv1d", name, shape, b, l, "fwd", timed(fwd, rep=40), floor_fwd, kernel_ms=round(gpu_ms, 5),
                 kernel_share_of_floor=round(floor_fwd / HBM_BYTES_PER_S * 1e3 / gpu_ms, 3), max_rel_err=err,
                 variant="tiled-fwd", launch=launch_fields(launch), **common)
        except Exception as e:  # a shape that does not compile (registers, shared memory) must not end the sweep
            print(json.dumps({"op": "causal_conv1d", "impl": name, "shape": shape, "error": repr(e)[:400]}), flush=True)

    fwd_launch = tiled_launch(b, l, d, x.device)
    with torch.no_grad():
        fwd_ms = kernel_ms(lambda: causal_conv1d_triton(x, w, bias, launch=fwd_launch))
    for weight_grad in (True, False):
        w, bias = params[weight_grad]
        wrt = [t for t in (x, w, bias) if t.requires_grad]
        ref_grads = torch.autograd.grad(causal_conv1d_triton(x, w, bias), wrt, cot)
        for g_shift, bl, bd, warps, tiles in TILED_BWD:
            name = f"triton-tiled[bwd {g_shift} bl={bl},bd={bd},w={warps},t={tiles}]"
            try:
                launch = ConvLaunch(block_d=bd, num_warps=warps, tiled=True, block_l=bl, g_shift=g_shift,
                                    tiles=tiles)

                def fwd_bwd(launch=launch, w=w, bias=bias, wrt=wrt):
                    y = causal_conv1d_triton(x, w, bias, launch=fwd_launch, launch_bwd=launch)
                    return torch.autograd.grad(y, wrt, cot)

                err = max(max_rel_err(g, r) for g, r in zip(fwd_bwd(), ref_grads))
                gpu_ms = kernel_ms(fwd_bwd)
                emit("causal_conv1d", name, shape, b, l, "fwd+bwd", timed(fwd_bwd, rep=40), floor_fwd_bwd,
                     kernel_ms=round(gpu_ms, 5),
                     kernel_share_of_floor=round(floor_fwd_bwd / HBM_BYTES_PER_S * 1e3 / gpu_ms, 3),
                     bwd_kernel_ms=round(gpu_ms - fwd_ms, 5), fwd_kernel_ms=round(fwd_ms, 5),
                     max_rel_err=round(err, 6), variant="tiled-bwd", launch=launch_fields(launch),
                     weight_grad=weight_grad, **common)
            except Exception as e:
                print(json.dumps({"op": "causal_conv1d", "impl": name, "shape": shape, "weight_grad": weight_grad,
                                  "error": repr(e)[:400]}), flush=True)


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
    parser.add_argument("--sweep", action="store_true", help="also time a few conv launch shapes")
    parser.add_argument("--conv-only", action="store_true", help="skip the norms")
    args = parser.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}), flush=True)
    for shape, b, l in SHAPES:
        cfg = FalconH1Config.from_preset(shape)
        conv_case(cfg, shape, b, l, args.sweep)
        if not args.conv_only:
            rms_case(cfg, shape, b, l)
            gated_case(cfg, shape, b, l)


if __name__ == "__main__":
    main()
