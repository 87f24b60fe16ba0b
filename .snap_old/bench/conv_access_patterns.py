"""Study: what the conv's memory access pattern costs, with plain copies that move the conv forward's bytes.

    python bench/conv_access_patterns.py      # needs a CUDA GPU

A Triton copy of the conv's input (in_proj's strided channel slice, or a contiguous copy of it) into a contiguous
output, launched like the conv (one program per 128 channels x 32 tokens of one row), moving ROWS tokens per load and
store: ROWS=1 is the row-by-row walk the conv kernels used before the eighth session (each load behind the previous
token's store), 8 is the tile the kernels now move, 32 the whole chunk at once. Against them: the conv forward
itself (`conv_triton._forward`, its default launch) and PyTorch's copies. One JSON line per measurement:
    {"shape", "batch", "seqlen", "layout", "impl", "ms", "x_floor"}
ms is the kernels' GPU time (torch.profiler); x_floor = ms over the 2 passes' bytes at 3.35 TB/s.
Results: bench/results/2026-11-24_h100_conv_access_session8_d5bf676.jsonl (run with an earlier form of this
script, which also timed a prototype of the tiled forward; `prod` there is the row-walking kernel of `d5bf676`; its
alignment hint was 1, as the conv kernels' was then, so every load there was 2 bytes wide: this form loads 16-byte
vectors wherever the strides allow, and has been run only in the CPU interpreter so far).
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

from gyrfalcon import FalconH1Config
from gyrfalcon.ops.conv_triton import _align, _forward, default_launch

from conv_norm_kernels import kernel_ms  # bench/ is on the path when run as a script

HBM_BYTES_PER_S = 3.35e12
SHAPES = [("0.5B", 4, 2048), ("7B", 1, 8192), ("7B", 4, 8192), ("7B", 4, 32768)]
COPIES = [(128, 32, 1, 1), (128, 32, 8, 1), (128, 32, 32, 1), (128, 32, 32, 4), (256, 32, 32, 4), (512, 16, 16, 4)]


@triton.jit
def _copy_kernel(x_ptr, y_ptr, L, D, stride_xb, stride_xl, stride_yb, stride_yl, X_ALIGN: tl.constexpr,
                 BLOCK_D: tl.constexpr, CHUNK_L: tl.constexpr, ROWS: tl.constexpr):
    pid_d, pid_l, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    b64 = pid_b.to(tl.int64)
    x_row = x_ptr + tl.multiple_of(b64 * stride_xb, X_ALIGN)
    y_row = y_ptr + b64 * stride_yb
    for i in range(0, CHUNK_L, ROWS):
        tt = pid_l * CHUNK_L + i + tl.arange(0, ROWS)
        off = tl.multiple_of(tt.to(tl.int64) * stride_xl, X_ALIGN)
        m = mask_d[None, :] & (tt[:, None] < L)
        v = tl.load(x_row + off[:, None] + offs_d[None, :], mask=m)
        tl.store(y_row + tt.to(tl.int64)[:, None] * stride_yl + offs_d[None, :], v, mask=m)


def copy_rows(x, y, block_d, chunk_l, rows, num_warps):
    b, l, d = x.shape
    grid = (triton.cdiv(d, block_d), triton.cdiv(l, chunk_l), b)
    _copy_kernel[grid](x, y, l, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1), X_ALIGN=_align(x),
                       BLOCK_D=block_d, CHUNK_L=chunk_l, ROWS=rows, num_warps=num_warps)
    return y


def main():
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__}), flush=True)
    for shape, b, l in SHAPES:
        cfg = FalconH1Config.from_preset(shape)
        d = cfg.conv_dim
        gen = torch.Generator(device="cuda").manual_seed(0)
        zxbcdt = torch.randn(b, l, cfg.in_proj_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = (torch.randn(d, cfg.mamba_d_conv, device="cuda", generator=gen) * 0.3).to(torch.bfloat16)
        bias = (torch.randn(d, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
        floor_ms = 2 * b * l * d * 2 / HBM_BYTES_PER_S * 1e3
        strided = zxbcdt[..., cfg.d_ssm:cfg.d_ssm + d]
        for layout, x in (("in_proj slice", strided), ("contiguous", strided.contiguous())):
            y = torch.empty(b, l, d, device="cuda", dtype=torch.bfloat16)
            src = x.contiguous()
            launch = default_launch(b, l, d, x.device)
            runs = [("conv forward", lambda: _forward(x, w, bias, None, None, True, False, launch))]
            runs += [(f"copy[{bd},{cl},rows={r},w{nw}]", lambda a=(bd, cl, r, nw): copy_rows(x, y, *a))
                     for bd, cl, r, nw in COPIES]
            runs += [("torch copy", lambda: y.copy_(x)), ("torch copy of a contiguous tensor", lambda: y.copy_(src))]
            for name, fn in runs:
                ms = kernel_ms(fn)
                print(json.dumps({"shape": shape, "batch": b, "seqlen": l, "layout": layout, "impl": name,
                                  "ms": round(ms, 5), "x_floor": round(ms / floor_ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
