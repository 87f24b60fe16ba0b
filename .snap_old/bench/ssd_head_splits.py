"""Benchmark: the SSD scan's forward + backward at the released Mamba shapes for several values of
ssd_triton_bwd.HEAD_SPLIT_WAVES (how many programs, in SM counts, the dB/dC kernels aim for by splitting heads).

    python bench/ssd_head_splits.py [--waves 1 2 4 8]

One JSON line per (shape, waves): median ms of one forward + backward (triton.testing.do_bench) and the head splits
that value gives.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from gyrfalcon.ops import ssd_triton_bwd
from gyrfalcon.ops.ssd_triton import _Problem, ssd_scan_triton
from ssd_kernels import DTYPE, SCAN_SHAPES, scan_inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waves", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args(argv)
    saved = ssd_triton_bwd.HEAD_SPLIT_WAVES
    try:
        for shape, b, l, h, p, g, n, chunk in SCAN_SHAPES:
            t = scan_inputs(b, l, h, p, g, n)
            dy = torch.randn(b, l, h, p, device="cuda", dtype=DTYPE)

            def step():
                y = ssd_scan_triton(t["x"], t["dt"], t["A_log"], t["B"], t["C"], t["D"], t["dt_bias"],
                                    chunk_size=chunk)
                torch.autograd.grad(y, list(t.values()), dy)

            for waves in args.waves:
                ssd_triton_bwd.HEAD_SPLIT_WAVES = waves
                step()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                problem = _Problem(t["x"], t["dt"], t["A_log"], t["B"], t["C"], t["D"], t["dt_bias"], None, chunk,
                                   True, (0.0, float("inf")))
                print(json.dumps({"bench": "ssd_head_splits", "shape": shape, "batch": b, "seqlen": l,
                                  "waves": waves, "head_splits": ssd_triton_bwd._head_splits(problem, t["x"].device),
                                  "fwd_bwd_ms": ms, "device": torch.cuda.get_device_name()}), flush=True)
    finally:
        ssd_triton_bwd.HEAD_SPLIT_WAVES = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
