"""Benchmark: the longest sequence one LoRA training step fits at batch 1, with and without activation offload.

    python bench/long_context.py                          # 7B, lengths 32K, 64K, 128K, 192K, 256K, both modes
    python bench/long_context.py --shape 0.5B --lengths 65536 131072 --modes offload

Random-init bf16 weights at a released shape, rank-16 LoRA on every target, activation checkpointing (mode
`checkpoint`), or checkpointing whose saved layer inputs wait in pinned host memory (mode `offload`,
gyrfalcon.activation_offload). One eager step per length (forward with the chunked loss, backward, AdamW), lengths
in increasing order until one runs out of memory or exceeds --step-limit seconds; the longest that trained is the
result. The issue's target: 128K tokens for the 7B shape on one 80 GB H100 (the transformers baseline's figure
comes from `python bench/run.py --plan maxlen`).

One JSON line per probe: {"bench": "long_context", "shape", "mode", "seqlen", "status": "ok" | "oom" | "too_slow",
"step_s", "tokens_per_s", "peak_gib", "device", "torch"}, then one per mode: {"mode", "longest_ok"}.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from gyrfalcon import FalconH1Config, FalconH1ForCausalLM
from gyrfalcon.lora import ALL_TARGETS, apply_lora

GIB = 2**30


def probe(model, config, seqlen: int, step_limit: float) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (1, seqlen), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    record = {"seqlen": seqlen}
    loss = None
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        step = time.perf_counter() - start
        status = "ok" if step <= step_limit and torch.isfinite(loss) else ("too_slow" if step > step_limit
                                                                            else "non_finite")
        record.update(status=status, step_s=round(step, 2), tokens_per_s=round(seqlen / step, 1),
                      peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2))
    except torch.cuda.OutOfMemoryError:
        record.update(status="oom", peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2))
    finally:
        optimizer.zero_grad(set_to_none=True)
        loss = None  # an out-of-memory backward leaves the graph (and its activations) behind the loss
        del optimizer, ids
        gc.collect()
        torch.cuda.empty_cache()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7B")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072, 196608, 262144])
    parser.add_argument("--modes", nargs="+", choices=("checkpoint", "offload"), default=["checkpoint", "offload"])
    parser.add_argument("--step-limit", type=float, default=120.0, help="seconds a probe step may take")
    args = parser.parse_args(argv)
    config = FalconH1Config.from_preset(args.shape)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    model = FalconH1ForCausalLM.from_config(config, dtype=torch.bfloat16, device="cuda", seed=0)
    apply_lora(model, r=16, alpha=32, targets=ALL_TARGETS)
    model.train()
    for mode in args.modes:
        model.enable_gradient_checkpointing(True, offload=mode == "offload")
        longest = None
        for seqlen in sorted(args.lengths):
            record = probe(model, config, seqlen, args.step_limit)
            print(json.dumps({"bench": "long_context", "shape": args.shape, "mode": mode, **record, **env}),
                  flush=True)
            if record["status"] != "ok":
                break
            longest = seqlen
        print(json.dumps({"bench": "long_context", "shape": args.shape, "mode": mode, "longest_ok": longest, **env}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
