"""Benchmark: QLoRA memory and speed at a released shape (default 7B), one GPU, random weights (no download).

    python bench/qlora_memory.py                       # 7B, batch 1 x 2048, QLoRA then the bf16 LoRA baseline
    python bench/qlora_memory.py --no-baseline         # QLoRA only
    python bench/qlora_memory.py --eager               # each step run eagerly (no CUDA graph), for comparison
    python bench/qlora_memory.py --shape tiny --device cpu --steps 1    # a smoke run of the script itself

Each system builds the model (QLoRA: gyrfalcon.quant.from_config_4bit, the decoder linears in NF4 straight away, so
the 16-bit model never exists on the GPU; baseline: the same shape in bf16), attaches rank-16 LoRA adapters (fp32)
on every linear target, turns activation checkpointing on, and runs training steps as gyrfalcon's training loop
does: forward with the chunked linear + cross-entropy (no logits kept) and backward through the loop's
GraphedTrainStep (a CUDA graph captured in the first step, replayed after; eager with --eager or where the model
cannot be graphed: "train_step" says which), gradient clipping, fused AdamW. The first step (graph capture, the
optimizer's state) is a warm-up; the next --steps are timed. Target of the issue: 7B QLoRA at 2K tokens peaks at
12 GiB or less.

One JSON line per system:
    {"bench": "qlora_memory", "system": "qlora-nf4" | "lora-bf16", "shape", "batch", "seqlen", "status",
     "weights_gib" (allocated after building), "build_peak_gib", "peak_gib" (allocator peak over the warm-up and timed
     steps, weights included), "reserved_gib", "train_step" ("cuda graph", or "eager (why)"), "step_s" (median),
     "tokens_per_s", "model_tflops", "flops_share"
     (model FLOPs/s over 989 TFLOP/s, gyrfalcon.benchmark.flops.train_flops), "target_peak_gib", env...}
A system that runs out of memory keeps its line with status "oom".
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.benchmark.flops import H100_BF16_FLOPS, train_flops
from gyrfalcon.lora import ALL_TARGETS, apply_lora
from gyrfalcon.quant import from_config_4bit
from gyrfalcon.step_graph import GraphedTrainStep

GIB = 2**30
TARGET_PEAK_GIB = 12.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7B", help="preset name (default 7B)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=list(ALL_TARGETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bf16 LoRA baseline")
    parser.add_argument("--eager", action="store_true", help="run every step eagerly (no CUDA graph)")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_gib(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / GIB


def build(system: str, config: FalconH1Config, device: torch.device, dtype: torch.dtype) -> FalconH1ForCausalLM:
    if system == "qlora-nf4":
        return from_config_4bit(config, device=device, compute_dtype=dtype, seed=0)
    return FalconH1ForCausalLM.from_config(config, dtype=dtype, device=device, seed=0)


def train_steps(model, config, args, device: torch.device) -> tuple[list[float], str]:
    """One warm-up step, then args.steps timed ones; returns their durations (s) and how the steps ran."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    graph_step = GraphedTrainStep(model, batch_size=args.batch, seq_len=args.seqlen, enabled=not args.eager)
    generator = torch.Generator(device="cpu").manual_seed(0)
    times = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seqlen), generator=generator).to(device)
        synchronize(device)
        start = time.perf_counter()
        graph_step.zero_grad()  # in place: a graph writes to fixed addresses
        loss = graph_step(ids, ids)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        synchronize(device)
        if step > 0:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
    return times, "cuda graph" if graph_step.graphed else f"eager ({graph_step.disabled})"


def run_system(system: str, config: FalconH1Config, args, device: torch.device, dtype: torch.dtype) -> dict:
    record = {"bench": "qlora_memory", "system": system, "shape": args.shape, "batch": args.batch,
              "seqlen": args.seqlen, "lora_r": args.rank, "lora_targets": args.targets, "dtype": "bfloat16"
              if dtype == torch.bfloat16 else str(dtype).removeprefix("torch."), "gradient_checkpointing": True,
              "target_peak_gib": TARGET_PEAK_GIB, "status": "ok"}
    model = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        model = build(system, config, device, dtype)
        synchronize(device)
        record["build_s"] = round(time.perf_counter() - started, 2)
        record["weights_gib"] = allocated_gib(device)
        record["build_peak_gib"] = allocated_gib(device, peak=True)
        apply_lora(model, r=args.rank, alpha=2 * args.rank, targets=tuple(args.targets),
                   adapter_dtype=torch.float32)
        model.enable_gradient_checkpointing(True)
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, record["train_step"] = train_steps(model, config, args, device)
        record["peak_gib"] = allocated_gib(device, peak=True)
        record["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
        step_s = statistics.median(times)
        flops = train_flops(config, args.batch, args.seqlen)
        record.update(step_s=round(step_s, 4), step_samples_s=[round(t, 4) for t in times],
                      tokens_per_s=round(args.batch * args.seqlen / step_s, 1),
                      model_tflops=round(flops / step_s / 1e12, 2),
                      flops_share=round(flops / step_s / H100_BF16_FLOPS, 4))
        if record["peak_gib"] is not None and system == "qlora-nf4":
            record["within_target"] = record["peak_gib"] <= TARGET_PEAK_GIB
    except torch.cuda.OutOfMemoryError as err:
        record.update(status="oom", reason=str(err).splitlines()[0])
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for key, value in record.items():
        if isinstance(value, float):
            record[key] = round(value, 4)
    return record


def environment(device: torch.device) -> dict:
    import bitsandbytes

    env = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "time": time.strftime("%FT%T")}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = FalconH1Config.from_preset(args.shape)
    env = environment(device)
    systems = ["qlora-nf4"] + ([] if args.no_baseline else ["lora-bf16"])
    for system in systems:
        print(json.dumps({**run_system(system, config, args, device, dtype), **env}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
