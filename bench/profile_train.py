"""Profile: where a gyrfalcon LoRA training step spends its GPU time, by kernel and by kind of kernel.

    python bench/profile_train.py                      # 7B batch 1 x 2048, then 0.5B batch 4 x 2048
    python bench/profile_train.py --shape 7B --batch 1 --seqlen 2048 --top 30
    python bench/profile_train.py --shape 7B --qlora   # the base in 4-bit NF4 (bitsandbytes), QLoRA's step

The step is the benchmark harness's (gyrfalcon/benchmark/systems.py): random-init bf16 weights, rank-16 LoRA on every
target, activation checkpointing, loss from the chunked linear + cross-entropy, backward (no optimizer). A few eager
warm-up steps (Triton autotuning), the median eager step, then the same step as a CUDA graph
(step_graph.GraphedTrainStep): its median, and torch.profiler over two replays.

One JSON line per shape:
    {"bench": "profile_train", "shape", "base" ("bf16" | "nf4"), "batch", "seqlen", "train_step", "eager_step_ms",
     "eager_tokens_per_s",
     "step_ms" (graphed, median, no profiler), "tokens_per_s",
     "gpu_busy_ms" (sum of kernel times per step), "gpu_busy_share" (busy / step: low means the GPU waits on the
     host), "kernels_per_step", "by_kind": {kind: ms per step}, "top": [[kernel name, ms per step, calls per step]]}
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import time
from collections import defaultdict

import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.lora import ALL_TARGETS, apply_lora
from gyrfalcon.step_graph import GraphedTrainStep

KINDS = (  # first match wins; names as CUDA reports them
    ("dequant_4bit", ("dequantize", "_nf4_")),   # QLoRA's base: ops/nf4_triton.py, bitsandbytes' kDequantizeBlockwise
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "splitk")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("conv_triton", ("_conv_",)),
    ("ssd_triton", ("_ssd", "ssd_", "chunk_", "_fwd_out_", "_fwd_state_", "_bwd_d", "_bwd_state_", "_prep_")),
    ("norm_triton", ("norm", "rms", "_gated_")),
    ("swiglu_rope_triton", ("_swiglu", "_rope")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "_ce_")),
    ("copy_cast", ("copy", "cast", "to_", "convert", "contiguous")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_poi")),
)
THIN_TILE = 64  # cuBLAS tiles no wider than this in both dims: the rank-r products of the adapters


def thin_matmul(name: str) -> bool:
    """A cuBLAS kernel of the kind the LoRA adapters' rank-16 products get (nvjet_sm90_tst_MxN_..., M and N <= 64,
    and the split-K reductions, nearly all of which follow those): thin products the big projections do not use."""
    low = name.lower()
    if "splitkreduce" in low:
        return True
    match = re.search(r"nvjet_sm90_tst_(\d+)x(\d+)_", low)
    return bool(match) and max(int(match.group(1)), int(match.group(2))) <= THIN_TILE


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return "matmul_thin" if kind == "matmul" and thin_matmul(name) else kind
    return "other"


def build(shape: str, device: torch.device, qlora: bool = False) -> tuple[FalconH1ForCausalLM, FalconH1Config]:
    config = FalconH1Config.from_preset(shape)
    if qlora:
        from gyrfalcon.quant import from_config_4bit
        model = from_config_4bit(config, device=device, compute_dtype=torch.bfloat16, seed=0)
    else:
        model = FalconH1ForCausalLM.from_config(config, dtype=torch.bfloat16, device=device, seed=0)
    apply_lora(model, r=16, alpha=32, dropout=0.0, targets=ALL_TARGETS)
    model.enable_gradient_checkpointing()
    model.train()
    return model, config


def eager_step(model, ids) -> None:
    loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()


def median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def profile_shape(shape: str, batch: int, seqlen: int, top: int, device: torch.device, qlora: bool = False) -> dict:
    model, config = build(shape, device, qlora)
    ids = torch.randint(0, config.vocab_size, (batch, seqlen), device=device)
    for _ in range(3):
        eager_step(model, ids)
    eager_ms = median_ms(lambda: eager_step(model, ids))
    graphed = GraphedTrainStep(model, batch_size=batch, seq_len=seqlen)

    def step(*_):
        graphed.zero_grad()
        graphed(ids, ids)

    step()
    step_ms = median_ms(step)
    steps = 2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(model, ids)
        torch.cuda.synchronize()
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.device_time_total / 1e3 / steps
            entry[1] += 1 / steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kind_of(name)] += ms
    busy = sum(ms for ms, _ in per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    record = {"bench": "profile_train", "shape": shape, "base": "nf4" if qlora else "bf16", "batch": batch,
              "seqlen": seqlen,
              "train_step": "cuda_graph" if graphed.graphed else f"eager ({graphed.disabled})",
              "eager_step_ms": round(eager_ms, 2), "eager_tokens_per_s": round(batch * seqlen / eager_ms * 1e3, 1),
              "step_ms": round(step_ms, 2), "tokens_per_s": round(batch * seqlen / step_ms * 1e3, 1),
              "gpu_busy_ms": round(busy, 2), "gpu_busy_share": round(busy / step_ms, 3),
              "kernels_per_step": round(sum(c for _, c in per_kernel.values())),
              "by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
              "top": [[name[:120], round(ms, 3), round(calls)] for name, (ms, calls) in ranked],
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help="one preset (default: 7B b1 then 0.5B b4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--top", type=int, default=30, help="kernels listed per shape")
    parser.add_argument("--qlora", action="store_true", help="the base in 4-bit NF4 (needs bitsandbytes)")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    runs = [(args.shape, args.batch, args.seqlen)] if args.shape else [("7B", 1, 2048), ("0.5B", 4, 2048)]
    for shape, batch, seqlen in runs:
        print(json.dumps(profile_shape(shape, batch, seqlen, args.top, device, args.qlora)), flush=True)
        gc.collect()  # the shape's model and graph went with profile_shape's frame
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
