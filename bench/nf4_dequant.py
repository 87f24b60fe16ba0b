"""Benchmark: NF4 dequantization of a decoder layer's nine 4-bit weights, bitsandbytes' dequantize_4bit (three
kernels: the 8-bit absmaxes, their offset, then the weight) against gyrfalcon's one kernel (ops/nf4.py,
dequantize_nf4), at the layer shapes of a preset (7B by default), weights quantized as QLoRA stores them (NF4, double
quantization, blocksize 64). A QLoRA training step dequantizes every weight three times (forward, checkpoint
recomputation, backward); the `step` line sums that for the whole model.

    python bench/nf4_dequant.py [--shapes 7B] [--dtype bf16] [--configs] [--check [--dtypes fp32 bf16 fp16]]

One JSON line per (preset, weight): ms per call of each and the speedup, GB/s (bytes = packed codes + absmaxes read
(8-bit, with their fp32 scales) + the dense weight written) and its share of the H100's 3.35 TB/s. Timing: a CUDA
graph of calls cycling through enough copies of the weight (codes, state and output) to exceed four times the L2
cache, so each call reads its codes from and writes its output to HBM as a training step does; best of 5 replays.
Then one `step` line per preset: the nine weights' ms summed, times the layers, times 3 passes, for each.
--configs also times each program size of CONFIGS (span_bytes, num_warps) on the kernel (configs_ms).
--check instead asserts bit equality with bitsandbytes (torch.equal) at every shape and each of --dtypes, nested and
plain states, plus odd shapes and other blocksizes; one line per case, exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from gyrfalcon import FalconH1Config
from gyrfalcon.ops import nf4_triton
from gyrfalcon.ops.nf4 import dequantize_nf4, nf4_tensors

HBM = 3.35e12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = [(1024, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]
MAX_COPIES = 64


def layer_shapes(cfg: FalconH1Config) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of a decoder layer's quantized linears (info.QUANTIZABLE)."""
    hid = cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.attn_head_dim, cfg.num_key_value_heads * cfg.attn_head_dim
    return {"in_proj": (cfg.in_proj_size, hid), "q_proj": (q, hid), "k_proj": (kv, hid), "v_proj": (kv, hid),
            "o_proj": (hid, q), "out_proj": (hid, cfg.d_ssm), "gate_proj": (cfg.intermediate_size, hid),
            "up_proj": (cfg.intermediate_size, hid), "down_proj": (hid, cfg.intermediate_size)}


def quantize(shape, dtype, *, nested=True, blocksize=64, seed=0):
    """(packed codes, QuantState) of a normal(0, 0.02) weight quantized by bitsandbytes on the GPU."""
    import bitsandbytes.functional as bnb_f
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight = (torch.randn(shape, device="cuda", generator=gen) * 0.02).to(dtype)
    return bnb_f.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def traffic_bytes(packed: torch.Tensor, state) -> int:
    """Bytes one dequantization moves at least: the codes and absmaxes (with the nested scales) read, the weight
    written."""
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nbytes += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return nbytes + math.prod(state.shape) * state.dtype.itemsize


def copies_for(bytes_per_copy: int) -> int:
    """Copies to cycle through so that one round touches four times the L2 cache (at least 2)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20)
    return max(2, min(MAX_COPIES, math.ceil(4 * l2 / bytes_per_copy)))


def graph_ms(calls, rounds: int = 5, min_calls: int = 20) -> float:
    """ms per call: each call once (warm-up, compilation), then a CUDA graph of them in turn, at least min_calls
    (their outputs kept alive, so each writes its own memory), replayed `rounds` times; the best replay. Where the
    capture fails, the same calls run eagerly between two CUDA events instead (launch gaps then count)."""
    for call in calls:
        call()
    calls = [calls[i % len(calls)] for i in range(max(min_calls, len(calls)))]
    torch.cuda.synchronize()
    try:
        graph, keep = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            for call in calls:
                keep.append(call())
        run = graph.replay
    except RuntimeError as err:
        print(json.dumps({"bench": "nf4_dequant", "warning": f"CUDA graph capture failed, eager timing: {err}"}),
              file=sys.stderr)
        torch.cuda.synchronize()

        def run():
            for call in calls:
                call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(rounds):
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / len(calls))
    return best


def time_weight(preset: str, name: str, shape, dtype, configs: bool) -> dict:
    import bitsandbytes.functional as bnb_f
    first = quantize(shape, dtype)
    nbytes = traffic_bytes(*first)
    weights = [first] + [quantize(shape, dtype, seed=i) for i in range(1, copies_for(nbytes))]
    bnb_ms = graph_ms([lambda p=p, s=s: bnb_f.dequantize_4bit(p, s) for p, s in weights])
    ours_ms = graph_ms([lambda p=p, s=s: dequantize_nf4(p, s) for p, s in weights])
    record = {"bench": "nf4_dequant", "preset": preset, "weight": name, "shape": list(shape),
              "dtype": str(dtype).removeprefix("torch."), "copies": len(weights), "bytes": nbytes,
              "bnb_ms": bnb_ms, "ours_ms": ours_ms, "speedup": bnb_ms / ours_ms,
              "bnb_gbps": nbytes / bnb_ms / 1e6, "ours_gbps": nbytes / ours_ms / 1e6,
              "bnb_hbm_share": nbytes / bnb_ms / 1e-3 / HBM, "ours_hbm_share": nbytes / ours_ms / 1e-3 / HBM}
    if configs:
        record["configs_ms"] = time_configs(weights)
    return record


def time_configs(weights) -> dict:
    """The kernel alone (checked tensors and outputs made beforehand) under each (span_bytes, num_warps)."""
    prepared = [(nf4_tensors(p, s), torch.empty(tuple(s.shape), dtype=s.dtype, device=p.device)) for p, s in weights]
    return {f"{span}x{warps}": graph_ms([lambda t=t, o=o, span=span, warps=warps:
                                         nf4_triton.launch(t, o, span_bytes=span, num_warps=warps)
                                         for t, o in prepared])
            for span, warps in CONFIGS}


def run_timing(presets, dtype, configs: bool) -> None:
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for preset in presets:
        cfg = FalconH1Config.from_preset(preset)
        totals = {"bnb_ms": 0.0, "ours_ms": 0.0}
        for name, shape in layer_shapes(cfg).items():
            start = time.perf_counter()
            record = time_weight(preset, name, shape, dtype, configs)
            record.update(seconds=round(time.perf_counter() - start, 1), **env)
            print(json.dumps(record), flush=True)
            for key in totals:
                totals[key] += record[key]
        passes = 3 * cfg.num_hidden_layers
        print(json.dumps({"bench": "nf4_dequant", "preset": preset, "weight": "step", "passes": passes,
                          "bnb_step_ms": totals["bnb_ms"] * passes, "ours_step_ms": totals["ours_ms"] * passes,
                          "speedup": totals["bnb_ms"] / totals["ours_ms"], **env}), flush=True)


def check_cases(presets, dtypes):
    """(label, shape, dtype, nested, blocksize) of the --check run."""
    for dtype in dtypes:
        for preset in presets:
            for name, shape in layer_shapes(FalconH1Config.from_preset(preset)).items():
                yield f"{preset}/{name}", shape, dtype, True, 64
            yield f"{preset}/gate_proj plain", layer_shapes(FalconH1Config.from_preset(preset))["gate_proj"], \
                dtype, False, 64
        for shape in ((1001, 37), (64, 136), (4097, 3)):
            for blocksize in (32, 64, 128, 4096):
                for nested in (True, False):
                    yield "odd", shape, dtype, nested, blocksize


def run_check(presets, dtypes) -> bool:
    import bitsandbytes.functional as bnb_f
    ok = True
    for label, shape, dtype, nested, blocksize in check_cases(presets, dtypes):
        try:
            packed, state = quantize(shape, dtype, nested=nested, blocksize=blocksize)
        except (RuntimeError, ValueError, NotImplementedError) as err:  # a blocksize this bitsandbytes lacks
            print(json.dumps({"bench": "nf4_dequant", "check": label, "blocksize": blocksize,
                              "skipped": f"bitsandbytes cannot quantize: {err}"}), flush=True)
            continue
        expected, got = bnb_f.dequantize_4bit(packed, state), dequantize_nf4(packed, state)
        equal = got.shape == expected.shape and torch.equal(got, expected)
        mismatches = 0 if equal else int((got != expected).sum()) if got.shape == expected.shape else -1
        ok &= equal
        print(json.dumps({"bench": "nf4_dequant", "check": label, "shape": list(shape),
                          "dtype": str(dtype).removeprefix("torch."), "nested": nested, "blocksize": blocksize,
                          "bit_equal": equal, "mismatches": mismatches}), flush=True)
    print(json.dumps({"bench": "nf4_dequant", "check": "all", "bit_equal": ok}), flush=True)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["7B"], help="presets whose layer shapes to run")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype of the timed weights")
    parser.add_argument("--configs", action="store_true", help="also time the kernel under each of CONFIGS")
    parser.add_argument("--check", action="store_true", help="assert bit equality with bitsandbytes instead")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="dtypes --check covers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("nf4_dequant: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.check:
        return 0 if run_check(args.shapes, [DTYPES[d] for d in args.dtypes]) else 1
    run_timing(args.shapes, DTYPES[args.dtype], args.configs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
