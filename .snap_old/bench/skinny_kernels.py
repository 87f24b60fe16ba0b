"""Benchmark: the few-row product kernels of a decode step (gyrfalcon/ops/skinny.py) against cuBLAS doing the same
products one projection at a time (torch.nn.functional.linear, plus the elementwise glue the kernel fuses), at the
0.5B and 7B layer shapes, batch 1 (and 4). The norm_* ops fold the RMSNorm before the product into the kernel
(norm_weight=...); they are timed also against the unfolded pair the layer would otherwise run, the rms_norm kernel
(ops/norm.py) and then the same few-row kernel, and their cuBLAS sequence starts with that rms_norm kernel too.

    python bench/skinny_kernels.py [--shapes 0.5B 7B] [--rows 1 4] [--configs]

One JSON line per (shape, op, rows): time of the fused kernel and of the cuBLAS sequence (CUDA graphs of 20
repetitions, so launch gaps count as they do in the decode loop's graph), the weight bytes read, the achieved
bandwidth as a share of the H100's 3.35 TB/s, and the first call's seconds (autotuning); for the norm_* ops also
unfolded_us (rms_norm kernel + few-row kernel) and fold_speedup (unfolded_us / fused_us). --configs also times
every config of skinny_triton.CONFIGS on each op (to choose the list).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F

from gyrfalcon import FalconH1Config
from gyrfalcon.benchmark.timing import graph_replay_seconds
from gyrfalcon.ops import skinny, skinny_triton
from gyrfalcon.ops.norm import rms_norm

HBM = 3.35e12


def layer_ops(cfg: FalconH1Config, rows: int):
    """(name, fused call, cuBLAS sequence, weight bytes, unfolded call or None) for the four fused products of a
    decoder layer, then the three with an RMSNorm of their (first) input folded in."""
    dev, dt = "cuda", torch.bfloat16

    def w(n, k):
        return torch.randn(n, k, device=dev, dtype=dt) * k ** -0.5

    hid = cfg.hidden_size
    qd, kd = cfg.num_attention_heads * cfg.attn_head_dim, cfg.num_key_value_heads * cfg.attn_head_dim
    w_in, w_q, w_k, w_v = w(cfg.in_proj_size, hid), w(qd, hid), w(kd, hid), w(kd, hid)
    w_out, w_o = w(hid, cfg.d_ssm), w(hid, qd)
    w_g, w_u, w_d = w(cfg.intermediate_size, hid), w(cfg.intermediate_size, hid), w(hid, cfg.intermediate_size)
    x = torch.randn(rows, hid, device=dev, dtype=dt)
    y, o = torch.randn(rows, cfg.d_ssm, device=dev, dtype=dt), torch.randn(rows, qd, device=dev, dtype=dt)
    u = torch.randn(rows, cfg.intermediate_size, device=dev, dtype=dt)
    ins = [w_in, w_q, w_k, w_v]
    eps = cfg.rms_norm_eps
    nw, nw_y = (1.0 + 0.1 * torch.randn(n, device=dev, dtype=dt) for n in (hid, cfg.d_ssm))

    def nbytes(*ws):
        return sum(t.numel() * t.element_size() for t in ws)

    def normed(t, weight):
        return rms_norm(t, weight, eps)

    def cublas_norm_in():
        h = normed(x, nw)
        return [F.linear(h, t) for t in ins]

    def cublas_norm_swiglu():
        h = normed(x, nw)
        return F.linear(h, w_u) * F.silu(F.linear(h, w_g) * 0.8)

    return [
        ("in_q_k_v", lambda: skinny.multi_linear(x, ins), lambda: [F.linear(x, t) for t in ins], nbytes(*ins), None),
        ("out_o_residual", lambda: skinny.dual_linear_residual(x, y, w_out, 0.5, o, w_o, 0.7),
         lambda: x + (F.linear(y, w_out) * 0.5 + F.linear(o, w_o) * 0.7), nbytes(w_out, w_o), None),
        ("gate_up_swiglu", lambda: skinny.linear_swiglu(x, w_g, w_u, 0.8),
         lambda: F.linear(x, w_u) * F.silu(F.linear(x, w_g) * 0.8), nbytes(w_g, w_u), None),
        ("down_residual", lambda: skinny.linear_residual(x, u, w_d, 0.9), lambda: x + F.linear(u, w_d) * 0.9,
         nbytes(w_d), None),
        ("norm_in_q_k_v", lambda: skinny.multi_linear(x, ins, nw, eps),
         cublas_norm_in, nbytes(*ins),
         lambda: skinny.multi_linear(normed(x, nw), ins)),
        ("norm_out_o_residual", lambda: skinny.dual_linear_residual(x, y, w_out, 0.5, o, w_o, 0.7, nw_y, eps),
         lambda: x + (F.linear(normed(y, nw_y), w_out) * 0.5 + F.linear(o, w_o) * 0.7), nbytes(w_out, w_o),
         lambda: skinny.dual_linear_residual(x, normed(y, nw_y), w_out, 0.5, o, w_o, 0.7)),
        ("norm_gate_up_swiglu", lambda: skinny.linear_swiglu(x, w_g, w_u, 0.8, nw, eps),
         cublas_norm_swiglu, nbytes(w_g, w_u),
         lambda: skinny.linear_swiglu(normed(x, nw), w_g, w_u, 0.8)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["0.5B", "7B"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--configs", action="store_true", help="also time every config of skinny_triton.CONFIGS")
    parser.add_argument("--pdl", action="store_true",
                        help="also time the fused op with and without programmatic dependent launch "
                             "(pdl_us: {variant: us})")
    args = parser.parse_args(argv)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for shape in args.shapes:
        cfg = FalconH1Config.from_preset(shape)
        for rows in args.rows:
            for name, fused, cublas, nbytes, unfolded in layer_ops(cfg, rows):
                start = time.perf_counter()
                fused()
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                t_fused, t_cublas = graph_replay_seconds(fused), graph_replay_seconds(cublas)
                record = {"bench": "skinny_kernels", "shape": shape, "op": name, "rows": rows,
                          "weight_bytes": nbytes, "fused_us": t_fused * 1e6, "cublas_us": t_cublas * 1e6,
                          "speedup": t_cublas / t_fused, "fused_hbm_share": nbytes / t_fused / HBM,
                          "cublas_hbm_share": nbytes / t_cublas / HBM, "first_call_s": first, **env}
                if unfolded is not None:
                    t_unfolded = graph_replay_seconds(unfolded)
                    record.update(unfolded_us=t_unfolded * 1e6, fold_speedup=t_unfolded / t_fused)
                if args.configs:
                    record["configs"] = time_configs(fused)
                if args.pdl:
                    record["pdl_us"] = time_pdl_variants(fused)
                print(json.dumps(record), flush=True)
    return 0


PDL_VARIANTS = {"off": dict(pdl=False), "on": dict(pdl=True)}


def time_pdl_variants(fused) -> dict:
    """The op with each PDL variant forced on both launchers (graph of 20 calls: consecutive kernels overlap as
    consecutive layers' products do in the decode step)."""
    launchers = (skinny_triton.multi_linear_triton, skinny_triton.pair_linear_triton)
    out = {}
    try:
        for name, options in PDL_VARIANTS.items():
            skinny_triton.multi_linear_triton = functools.partial(launchers[0], **options)
            skinny_triton.pair_linear_triton = functools.partial(launchers[1], **options)
            out[name] = graph_replay_seconds(fused) * 1e6
    finally:
        skinny_triton.multi_linear_triton, skinny_triton.pair_linear_triton = launchers
    return out


def time_configs(fused) -> dict:
    """Time the op under each config alone (the autotuner's list restricted to one entry at a time)."""
    kernels = (skinny_triton._multi_kernel, skinny_triton._pair_kernel)
    saved = [(k.configs, dict(k.cache)) for k in kernels]
    out = {}
    try:
        for config in skinny_triton._configs():
            for k in kernels:
                k.configs, k.cache = [config], {}
            out[str(config)] = graph_replay_seconds(fused) * 1e6
    finally:
        for k, (configs, cache) in zip(kernels, saved):
            k.configs, k.cache = configs, cache
    return out


if __name__ == "__main__":
    raise SystemExit(main())
