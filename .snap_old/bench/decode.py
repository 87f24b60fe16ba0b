"""Benchmark: gyrfalcon decoding and long-prompt prefill on one GPU (H100), with transformers' generate in the same run.

    python bench/decode.py                        # every workload, about 3-4 minutes on an H100
    python bench/decode.py --only 0.5B-b1 7B-b1   # some of them
    python bench/decode.py --no-transformers      # skip transformers' generate (the slowest part)

Workloads (random-init weights at the presets' shapes, bf16, 512-token prompts of random ids, 256 new tokens, EOS
off so every call produces all its tokens):
    0.5B-b1, 0.5B-b64, 7B-b1       gyrfalcon.generate, CUDA graphs (the default)
    0.5B-b1-eager                  the same step without CUDA graphs (what the graphs buy)
    0.5B-b1-transformers           transformers' generate (64 new tokens: it runs at ~10 tokens/s)
    7B-prefill-32k                 a 32768-token prompt through the cache in 8192-token pieces (and 8192 tokens
                                   alone: same activation memory), then in one piece
Decode timing as the benchmark harness (gyrfalcon/benchmark/suites.py): seconds per step = (median T(new) - median
T(1)) / (new - 1), so the prefill and the first token cancel out; e2e_tokens_per_s includes them.

One JSON line per measurement:
    decode:  {"workload", "system", "batch", "prompt", "new_tokens", "tokens_per_s", "ms_per_token", "e2e_tokens_per_s",
              "bytes_per_step", "hbm_share", "first_call_s", "peak_gib", ...}
             hbm_share = bytes a step must move (bf16 weights + KV read + conv/SSM states read and written, from
             gyrfalcon.benchmark.flops.decode_bytes_per_step at the mean context) per second over 3.35 TB/s.
             tokens_per_s counts generated tokens of the whole batch.
    profile: {"workload", "kernels_per_step", "gpu_busy_ms_per_step", "gpu_busy_share", "top_kernels"}: the CUDA
             kernels of the decode steps (a 33-token call minus a 1-token call, per step), from torch.profiler;
             gpu_busy_share = kernel time / step time (low: the step is bound by kernel count, not bandwidth).
    prefill: {"workload", "prompt", "piece", "seconds", "tokens_per_s", "mfu", "peak_gib", "weights_gib",
              "kv_cache_gib", "activation_gib"}: mfu = model FLOPs (flops.forward_flops, last-position logits) / s /
             989 TFLOP/s; activation_gib = peak - weights - the whole (preallocated) cache: the same at 8K and 32K
             tokens in 8K pieces when the SSM side stays flat.
    ratio:   {"workload", "tokens_per_s_ratio"}: gyrfalcon over transformers at 0.5B batch 1.
Targets (issue 6): 0.5B b1 >= 600 tokens/s (aim 1000), 7B b1 >= 150 tokens/s and >= 70% of the roofline, 0.5B b64
>= 15000 tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback

import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.benchmark import flops
from gyrfalcon.cache import HybridCache
from gyrfalcon.generate import generate, release

GIB = 1024 ** 3
DTYPE = torch.bfloat16
PROMPT, NEW = 512, 256


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def random_ids(cfg, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, cfg.vocab_size, (batch, length), generator=generator).cuda()


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def build(preset: str):
    cfg = FalconH1Config.from_preset(preset)
    return cfg, FalconH1ForCausalLM.from_config(cfg, dtype=DTYPE, device="cuda", seed=0)


# ---------------------------------------------------------------------------------------------- decode
def step_seconds(run, new: int, repeats: int) -> tuple[float, float, list[float], list[float]]:
    """(s per step, median T(new), T(1) samples, T(new) samples)."""
    short = [timed(lambda: run(1))[1] for _ in range(3)]
    long = [timed(lambda: run(new))[1] for _ in range(repeats)]
    return (statistics.median(long) - statistics.median(short)) / (new - 1), statistics.median(long), short, long


def decode(workload: str, preset: str, batch: int, *, new: int = NEW, repeats: int = 3, cuda_graphs: bool = True,
           profile: bool = True) -> float:
    free()
    cfg, model = build(preset)
    ids = random_ids(cfg, batch, PROMPT)

    def run(n: int):
        out = generate(model, ids, max_new_tokens=n, eos_token_id=[], cuda_graphs=cuda_graphs)
        if out.sequences.shape != (batch, PROMPT + n):
            raise RuntimeError(f"expected {(batch, PROMPT + n)} ids, got {tuple(out.sequences.shape)}")
        return out

    _, first = timed(lambda: run(new))          # graph capture, kernel compilation, autotuning
    torch.cuda.reset_peak_memory_stats()
    step, long, short_s, long_s = step_seconds(run, new, repeats)
    moved = flops.decode_bytes_per_step(cfg, batch, flops.mean_decode_context(PROMPT, new))
    emit(workload=workload, system="gyrfalcon" + ("" if cuda_graphs else "-eager"), preset=preset, batch=batch,
         prompt=PROMPT, new_tokens=new, tokens_per_s=batch / step, ms_per_token=step * 1e3,
         e2e_tokens_per_s=batch * new / long, bytes_per_step=moved["total"], bytes_parts=moved,
         hbm_share=moved["total"] / step / flops.H100_HBM_BYTES_PER_S, first_call_s=first, generate_1_s=short_s,
         generate_new_s=long_s, peak_gib=torch.cuda.max_memory_allocated() / GIB, device=torch.cuda.get_device_name())
    if profile:
        profile_steps(workload, run, step)
    release(model)
    return batch / step  # the model goes with this frame; free() before the next workload returns its memory


def profile_steps(workload: str, run, step: float) -> None:
    """Kernel count and kernel time per decode step: a 33-token call minus a 1-token call, over 32 steps."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(n: int):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(n)
            torch.cuda.synchronize()
        found = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                count, us = found.get(e.name, (0, 0.0))
                found[e.name] = (count + 1, us + e.time_range.elapsed_us())
        return found

    try:
        one, many = kernels(1), kernels(33)
    except (RuntimeError, AttributeError) as err:   # the profiler's event API differs across versions
        emit(workload=workload, profile_error=f"{type(err).__name__}: {err}")
        return
    per_step = {name: ((c - one.get(name, (0, 0.0))[0]) / 32, (us - one.get(name, (0, 0.0))[1]) / 32)
                for name, (c, us) in many.items()}
    count = sum(c for c, _ in per_step.values())
    busy_ms = sum(us for _, us in per_step.values()) / 1e3
    top = sorted(per_step.items(), key=lambda kv: -kv[1][1])[:12]
    emit(workload=workload, kernels_per_step=count, gpu_busy_ms_per_step=busy_ms,
         gpu_busy_share=busy_ms / (step * 1e3),
         top_kernels=[{"kernel": name[:90], "per_step": round(c, 2), "us_per_step": round(us, 1)}
                      for name, (c, us) in top])


def transformers_decode(workload: str, preset: str, batch: int, new: int = 64) -> float:
    import transformers

    from gyrfalcon.benchmark.systems import transformers_mamba_backends

    free()
    cfg = FalconH1Config.from_preset(preset)
    torch.manual_seed(0)
    hf_config = transformers.FalconH1Config.from_dict(cfg.to_dict())
    hf_config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=DTYPE).eval()
    ids = random_ids(cfg, batch, PROMPT)

    def run(n: int):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0, use_cache=True)

    _, first = timed(lambda: run(4))
    step, long, short_s, long_s = step_seconds(run, new, 2)
    moved = flops.decode_bytes_per_step(cfg, batch, flops.mean_decode_context(PROMPT, new))
    emit(workload=workload, system="transformers", preset=preset, batch=batch, prompt=PROMPT, new_tokens=new,
         tokens_per_s=batch / step, ms_per_token=step * 1e3, e2e_tokens_per_s=batch * new / long,
         bytes_per_step=moved["total"], hbm_share=moved["total"] / step / flops.H100_HBM_BYTES_PER_S,
         first_call_s=first, generate_1_s=short_s, generate_new_s=long_s, transformers=transformers.__version__,
         mamba_backends=transformers_mamba_backends())
    return batch / step


# ---------------------------------------------------------------------------------------------- prefill
@torch.no_grad()
def prefill(workload: str, preset: str, length: int = 32768, piece: int = 8192) -> None:
    """The prompt in `piece`-token pieces at `piece` tokens and at `length` tokens (the activation memory should
    not grow with the length), then in one piece."""
    free()
    cfg, model = build(preset)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    ids = random_ids(cfg, 1, length)
    cache = HybridCache.for_model(model, 1, length)

    def run(upto: int, step: int):
        cache.reset()
        for start in range(0, upto, step):
            model(ids[:, start:min(start + step, upto)], cache=cache, logits_to_keep=1)

    for upto, step in ((piece, piece), (length, piece), (length, length)):
        try:
            run(min(2 * step, upto), step)              # warm-up: kernel autotuning for these shapes
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = [timed(lambda: run(upto, step))[1] for _ in range(2)]
        except torch.cuda.OutOfMemoryError as err:
            emit(workload=workload, prompt=upto, piece=step, status="out of memory", reason=str(err).splitlines()[0])
            free()
            continue
        seconds = min(times)
        peak = torch.cuda.max_memory_allocated() / GIB
        kv = cache.nbytes() / GIB * upto / length        # the part of the cache this prompt fills
        emit(workload=workload, system="gyrfalcon", preset=preset, prompt=upto, piece=step, seconds=seconds,
             tokens_per_s=upto / seconds,
             mfu=flops.forward_flops(cfg, 1, upto, logits="last") / seconds / flops.H100_BF16_FLOPS,
             peak_gib=peak, weights_gib=weights, kv_cache_gib=cache.nbytes() / GIB, kv_used_gib=kv,
             activation_gib=peak - weights - cache.nbytes() / GIB, samples_s=times)


# ---------------------------------------------------------------------------------------------- main
WORKLOADS = ("0.5B-b1", "0.5B-b1-eager", "0.5B-b1-transformers", "0.5B-b64", "7B-b1", "7B-prefill-32k")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-step kernel profiles")
    parser.add_argument("--prefill-length", type=int, default=32768,
                        help="prompt length of the 7B prefill (default 32768; 131072 checks that 128K fits)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    wanted = [w for w in args.only if not (args.no_transformers and w.endswith("transformers"))]
    results = {}
    plan = {
        "0.5B-b1": lambda: decode("0.5B-b1", "0.5B", 1, profile=not args.no_profile),
        "0.5B-b1-eager": lambda: decode("0.5B-b1-eager", "0.5B", 1, new=64, repeats=2, cuda_graphs=False,
                                        profile=False),
        "0.5B-b1-transformers": lambda: transformers_decode("0.5B-b1-transformers", "0.5B", 1),
        "0.5B-b64": lambda: decode("0.5B-b64", "0.5B", 64, profile=not args.no_profile),
        "7B-b1": lambda: decode("7B-b1", "7B", 1, profile=not args.no_profile),
        "7B-prefill-32k": lambda: prefill("7B-prefill-32k", "7B", args.prefill_length),
    }
    failed = 0
    for name in wanted:
        try:
            results[name] = plan[name]()
        except Exception as err:  # one failing workload must not hide the others' figures
            failed += 1
            emit(workload=name, status="failed", error=f"{type(err).__name__}: {err}",
                 traceback=traceback.format_exc(limit=6))
            free()
    if results.get("0.5B-b1") and results.get("0.5B-b1-transformers"):
        emit(workload="0.5B-b1", tokens_per_s_ratio=results["0.5B-b1"] / results["0.5B-b1-transformers"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
