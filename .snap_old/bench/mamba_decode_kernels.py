"""Benchmark: the fused Mamba decode step (gyrfalcon/ops/mamba_decode.py: conv update + SSD step + gate in one launch)
against the two-kernel path (causal_conv1d_update, then ssd_step with the gate), at the 0.5B and 7B layer shapes,
batch 1 to 64 (to place mamba_decode.FUSED_MAX_ROWS). With the Mamba norm (7B) both are followed by the RMSNorm kernel.

    python bench/mamba_decode_kernels.py [--shapes 0.5B 7B] [--batches 1 4 8 16 64] [--sweep]

One JSON line per (shape, batch, impl): microseconds per call (CUDA graph of 20 calls, best of 5 replays, so launch
gaps count as in the decode loop's graph), the state bytes moved (SSM state read + write, conv state, in_proj row)
and their share of the H100's 3.35 TB/s. --sweep also times each (BP, num_warps) launch of the fused kernel (to check
mamba_decode_triton.block_rows). A first line checks the fused kernel against the sequence on the same inputs.
"""

from __future__ import annotations

import argparse
import json

import torch

from gyrfalcon import FalconH1Config
from gyrfalcon.benchmark.timing import graph_replay_seconds
from gyrfalcon.ops import rms_norm
from gyrfalcon.ops.mamba_decode import _two_kernels
from gyrfalcon.ops.mamba_decode_triton import block_rows, mamba_step_triton
from gyrfalcon.ops.ssd import INF_LIMIT

HBM = 3.35e12


def emit(**fields):
    print(json.dumps(fields), flush=True)


def layer(cfg: FalconH1Config, batch: int):
    dev, dt = "cuda", torch.bfloat16
    h, p, n = cfg.mamba_n_heads, cfg.mamba_head_dim, cfg.mamba_d_state
    conv_dim, k = cfg.conv_dim, cfg.mamba_d_conv
    return dict(
        zxbcdt=torch.randn(batch, cfg.in_proj_size, device=dev, dtype=dt),
        conv_state=torch.randn(batch, conv_dim, k - 1, device=dev, dtype=dt),
        ssm_state=torch.randn(batch, h, p, n, device=dev),
        conv_weight=torch.randn(conv_dim, k, device=dev) * 0.5,
        conv_bias=torch.randn(conv_dim, device=dev) * 0.1 if cfg.mamba_conv_bias else None,
        A_log=torch.rand(h, device=dev), D=torch.randn(h, device=dev), dt_bias=torch.randn(h, device=dev) - 3,
    )


def sequence(cfg: FalconH1Config, t: dict, norm_weight, step_launch=None):
    """The two-kernel path (conv update, then the SSD step with the gate), then the norm kernel if any."""
    b = t["zxbcdt"].shape[0]
    y = _two_kernels(**t, n_groups=cfg.mamba_n_groups, d_state=cfg.mamba_d_state, dt_limit=INF_LIMIT, dt_scale=0.9,
                     z_scale=0.8, gate=True, state_indices=None, step_launch=step_launch).reshape(b, cfg.d_ssm)
    return rms_norm(y, norm_weight, 1e-5) if norm_weight is not None else y


def fused(cfg: FalconH1Config, t: dict, norm_weight, sync, launch=None):
    b = t["zxbcdt"].shape[0]
    y = mamba_step_triton(**t, n_groups=cfg.mamba_n_groups, d_state=cfg.mamba_d_state, dt_scale=0.9, z_scale=0.8,
                          gate=True, sync=sync, launch=launch).reshape(b, cfg.d_ssm)
    return rms_norm(y, norm_weight, 1e-5) if norm_weight is not None else y


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["0.5B", "7B"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16, 64])
    parser.add_argument("--sweep", action="store_true", help="time every (BP, num_warps) of the fused kernel")
    args = parser.parse_args()
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for shape in args.shapes:
        cfg = FalconH1Config.from_preset(shape)
        norm_weight = torch.randn(cfg.d_ssm, device="cuda", dtype=torch.bfloat16) if cfg.mamba_rms_norm else None
        for batch in args.batches:
            t = layer(cfg, batch)
            sync = torch.zeros(batch * cfg.mamba_n_groups, dtype=torch.int32, device="cuda")
            a, b_ = {k: (v.clone() if v is not None else None) for k, v in t.items()}, \
                {k: (v.clone() if v is not None else None) for k, v in t.items()}
            y_seq, y_fused = sequence(cfg, a, norm_weight), fused(cfg, b_, norm_weight, sync)
            err = ((y_fused.float() - y_seq.float()).abs().max() / y_seq.float().abs().max()).item()
            state_err = ((a["ssm_state"] - b_["ssm_state"]).abs().max() / a["ssm_state"].abs().max()).item()
            emit(shape=shape, batch=batch, check="fused_vs_sequence_max_rel_err", y=f"{err:.2e}",
                 ssm_state=f"{state_err:.2e}", conv_state_equal=bool(torch.equal(a["conv_state"], b_["conv_state"])))
            moved = (2 * t["ssm_state"].numel() * 4 + 2 * t["conv_state"].numel() * 2
                     + t["zxbcdt"].numel() * 2 + batch * cfg.d_ssm * 2)
            bp, _, warps = block_rows(cfg.mamba_head_dim, cfg.mamba_d_state)
            runs = {"sequence": lambda: sequence(cfg, t, norm_weight),
                    f"fused BP{bp} w{warps}": lambda: fused(cfg, t, norm_weight, sync)}
            if args.sweep and batch > 8:  # the two-kernel range: the SSD step's (BP, num_warps)
                for bp_s, w in ((4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 8)):
                    runs[f"step BP{bp_s} w{w}"] = lambda bp_s=bp_s, w=w: sequence(cfg, t, norm_weight, (bp_s, w))
            if args.sweep and batch <= 8:  # the fused kernel's range (mamba_decode.FUSED_MAX_ROWS)
                for bp_s in (2, 4, 8, 16, 32):
                    for w in (4, 8):
                        runs[f"fused BP{bp_s} w{w}"] = lambda bp_s=bp_s, w=w: fused(cfg, t, norm_weight, sync,
                                                                                   (bp_s, w))
            times = {name: graph_replay_seconds(fn) * 1e6 for name, fn in runs.items()}
            for name, us in times.items():
                emit(shape=shape, batch=batch, impl=name, us=round(us, 2), bytes=moved,
                     hbm_share=round(moved / HBM / (us * 1e-6), 3),
                     speedup_vs_sequence=round(times["sequence"] / us, 3),
                     norm_after="rms_norm kernel" if norm_weight is not None else None)


if __name__ == "__main__":
    main()
