"""Triton kernels of ops/skinny.py: products of a few rows (a decode step's batch, M <= skinny.MAX_ROWS) with weight
matrices, read at memory speed, with the decoder layer's glue (µP factors, SwiGLU, residual adds) in their epilogues.

A decode step at batch 1 reads every weight once and computes next to nothing, so each product is a pass over its
weight: cuBLAS runs one kernel per projection (nine per layer) at 60-70% of the bandwidth, and the small ones are
launch-bound. Here each program owns BLOCK_N weight rows and walks their full K in BLOCK_K tiles. Up to
CUDA_CORE_MAX_ROWS rows it multiplies in fp32 on the CUDA cores (no tensor-core tile to pad M to), many small
programs per SM keeping enough loads in flight. Above, at a server's batch of 5-128 rows, the same programs multiply
(BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) tiles on the tensor cores (TILE; M padded to at least 16 rows): the
product is still bound by reading each weight once (2 M flops per weight element, far below the H100's ridge), so the
win over cuBLAS is the same as at one row: one launch for in_proj/q/k/v and for gate/up, the glue in the epilogue.

    _multi_kernel: out (M, n0+n1+n2+n3) = x @ [w0; w1; w2; w3].T, four weights of equal K in one launch (a
        segment's rows never share a program with another's); unused segments have n = 0.
    _pair_kernel: out (M, N) = epilogue of a = x1 @ w1.T and, optionally, b = x2 @ w2.T:
        SUM:    res + s1 a + s2 b        (res, b optional)
        SWIGLU: b * silu(s1 a)           (x2 is x1: the gate and up rows of one program)
All accumulation in fp32, one rounding to out's dtype.

Programmatic dependent launch (ops/pdl.py, Hopper): the next product is launched while the previous kernel drains.
Prefetching the first weight tiles into L2 before the wait was tried and measured (bench/skinny_kernels.py --pdl,
H100, 2026-11-24): no gain with 256 columns per row, 2-4% slower at the 7B shape with 1024 and 4096, so it is not done.

RMSNorm fold (HAS_NORM; the CUDA-core kernels only): x -> rms_norm(x, nw, eps) = x * rsqrt(mean_k x_k^2 + eps) * nw
before the product (on x of _multi_kernel, on x1 of _pair_kernel: both SwiGLU products, never x2). Since every
program walks the full K of its rows it reads all of each x row anyway, so the norm costs no pass of its own: the K
loop multiplies x by nw (fp32) and also sums x^2 per row, and the (BLOCK_M, BLOCK_N) result is scaled by rsqrt(ssq /
K + eps) per row, which is exact because that factor is constant along k. This drops the separate norm kernel (and
its round trip of the normed rows through memory) before the decoder layer's in_proj/q/k/v and gate/up products.
Unlike the unfused path the normed x is never rounded to the model dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pdl import launch_options, pdl_supported, pdl_wait
from .skinny import CUDA_CORE_MAX_ROWS, MAX_ROWS, TILE_DTYPES
from .ssd_triton import _INTERPRET, _bound, _mm

MODE_SUM = 0
MODE_SWIGLU = 1

# (BLOCK_N, BLOCK_K, num_warps, num_stages), autotuned per shape on the first call of each shape: CONFIGS for the
# CUDA-core product, TILE_CONFIGS for the tensor-core one (each kernel below is tuned as two, one per family).
CONFIGS = [(4, 512, 4, 3), (8, 256, 4, 4), (2, 1024, 4, 3), (8, 512, 8, 3), (4, 1024, 4, 3)]
# (32, 256) takes two stages: with three its 128-row tiles would need more shared memory than an H100 SM has
TILE_CONFIGS = [(16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 2), (64, 64, 4, 4), (64, 128, 4, 3)]


def _configs(tile: bool = False):
    if _INTERPRET:  # the CPU interpreter: one small config (odd K and N still cross tile edges)
        return [triton.Config({"BLOCK_N": 16 if tile else 4, "BLOCK_K": 16})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in (TILE_CONFIGS if tile else CONFIGS)]


@triton.jit
def _rows_dot(x_ptr, sx_m, w_ptr, sw_n, M, N, K, rows, nw_ptr, eps, HAS_NORM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32: x[m, :K] . w[rows[n], :K], zero for m >= M or rows >= N; with HAS_NORM,
    rms_norm(x[m, :K], nw, eps) in place of x[m, :K]."""
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    m_mask = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    ssq = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)  # reduced once after the loop, not once per tile
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * sw_n
    for k0 in range(0, _bound(K, INTERP), BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        w = tl.load(w_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        if HAS_NORM:  # masked k are 0 in x, so they add nothing to ssq whatever nw holds there
            ssq += x * x
            x = x * tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
    out = tl.sum(acc, axis=2)
    if HAS_NORM:  # the per-row 1/rms is constant along k, so it scales the finished dot products
        out = out * tl.rsqrt(tl.sum(ssq, axis=1) / K + eps)[:, None]
    return out


@triton.jit
def _rows_dot_tile(x_ptr, sx_m, w_ptr, sw_n, M, N, K, rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32: x[m, :K] . w[rows[n], :K] on the tensor cores (BLOCK_M >= 16 rows, the padding
    rows loaded as 0), zero for m >= M or rows >= N."""
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    m_mask = m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * sw_n
    for k0 in range(0, _bound(K, INTERP), BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        w = tl.load(w_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * sx_m + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc += _mm(x, tl.trans(w), w.dtype, INTERP)  # (the interpreter multiplies in fp32: 16-bit values are exact)
    return acc


@triton.jit
def _product(x_ptr, sx_m, w_ptr, sw_n, M, N, K, rows, nw_ptr, eps, HAS_NORM: tl.constexpr, TILE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """_rows_dot_tile where TILE (its launches never fold a norm), else _rows_dot."""
    if TILE:
        return _rows_dot_tile(x_ptr, sx_m, w_ptr, sw_n, M, N, K, rows, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
    else:
        return _rows_dot(x_ptr, sx_m, w_ptr, sw_n, M, N, K, rows, nw_ptr, eps, HAS_NORM, BLOCK_M, BLOCK_N, BLOCK_K,
                         INTERP)


@triton.jit
def _multi(x_ptr, sx_m, out_ptr, so_m, M, K, w0, w1, w2, w3, n0, n1, n2, n3, nw_ptr, eps, HAS_NORM: tl.constexpr,
           TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           INTERP: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    b1 = tl.cdiv(n0, BLOCK_N)
    b2 = b1 + tl.cdiv(n1, BLOCK_N)
    b3 = b2 + tl.cdiv(n2, BLOCK_N)
    # the segment of this program: its weight, row count, first output column and row block within it
    if pid < b1:
        w, n, col, blk = w0, n0, n0 * 0, pid
    elif pid < b2:
        w, n, col, blk = w1, n1, n0, pid - b1
    elif pid < b3:
        w, n, col, blk = w2, n2, n0 + n1, pid - b2
    else:
        w, n, col, blk = w3, n3, n0 + n1 + n2, pid - b3
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    pdl_wait(PDL)
    acc = _product(x_ptr, sx_m, w, K, M, n, K, rows, nw_ptr, eps, HAS_NORM, TILE, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
    m = tl.arange(0, BLOCK_M)
    mask = (m < M)[:, None] & (rows < n)[None, :]
    tl.store(out_ptr + m[:, None] * so_m + col + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# HAS_NORM in the keys: the folded variant does a little more per K tile, so it is tuned on its own.
_multi_kernel = triton.autotune(configs=_configs(), key=["M", "n0", "n1", "K", "HAS_NORM"])(_multi)
# The tile kernels are tuned per BLOCK_M (16-128 rows), not per row count: a new batch size within a tile height
# reuses its tuning instead of stalling a server's first step at that size.
_multi_tile_kernel = triton.autotune(configs=_configs(tile=True), key=["BLOCK_M", "n0", "n1", "K"])(_multi)


@triton.jit
def _pair(x1_ptr, sx1, w1_ptr, K1, x2_ptr, sx2, w2_ptr, K2, res_ptr, sr_m, out_ptr, so_m, M, N, s1, s2, nw_ptr, eps,
          MODE: tl.constexpr, HAS_SECOND: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
          TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          INTERP: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pdl_wait(PDL)
    m = tl.arange(0, BLOCK_M)
    mask = (m < M)[:, None] & (rows < N)[None, :]
    # the norm (if any) is x1's: in SWIGLU mode both products read the normed x1, in SUM mode x2 is never normed
    a = _product(x1_ptr, sx1, w1_ptr, K1, M, N, K1, rows, nw_ptr, eps, HAS_NORM, TILE, BLOCK_M, BLOCK_N, BLOCK_K,
                 INTERP)
    if MODE == 1:  # SWIGLU: b * silu(s1 a), b from the same input rows
        b = _product(x1_ptr, sx1, w2_ptr, K1, M, N, K1, rows, nw_ptr, eps, HAS_NORM, TILE, BLOCK_M, BLOCK_N,
                     BLOCK_K, INTERP)
        g = a * s1
        out = b * g / (1.0 + tl.exp(-g))
    else:
        out = a * s1
        if HAS_SECOND:
            out += _product(x2_ptr, sx2, w2_ptr, K2, M, N, K2, rows, nw_ptr, eps, False, TILE, BLOCK_M, BLOCK_N,
                            BLOCK_K, INTERP) * s2
        if HAS_RES:
            out += tl.load(res_ptr + m[:, None] * sr_m + rows[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m[:, None] * so_m + rows[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


_PAIR_MODES = ["MODE", "HAS_SECOND", "HAS_RES"]  # an epilogue of its own is tuned on its own
_pair_kernel = triton.autotune(configs=_configs(), key=["M", "N", "K1", "K2", "HAS_NORM", *_PAIR_MODES])(_pair)
_pair_tile_kernel = triton.autotune(configs=_configs(tile=True), key=["BLOCK_M", "N", "K1", "K2", *_PAIR_MODES])(_pair)


def _row_tiling(m: int, has_norm: bool, dtype) -> tuple[bool, int]:
    """(TILE, BLOCK_M) for m rows: the CUDA-core product up to CUDA_CORE_MAX_ROWS, else tensor-core tiles of at
    least 16 rows (tl.dot's least M), which take 16-bit operands only (fp32 would be rounded to tf32) and no folded
    norm (skinny.py runs the norm kernel first there)."""
    if m <= CUDA_CORE_MAX_ROWS:
        return False, triton.next_power_of_2(m)
    if m > MAX_ROWS or has_norm or dtype not in TILE_DTYPES:
        raise ValueError(f"the tensor-core product takes {CUDA_CORE_MAX_ROWS + 1}-{MAX_ROWS} rows of bf16 or "
                         f"fp16 and no folded norm, got {m} rows of {dtype}{' with a norm' if has_norm else ''}")
    return True, max(16, triton.next_power_of_2(m))


def multi_linear_triton(x, weights, out, norm_weight=None, eps: float = 0.0, *, pdl: bool | None = None):
    """out (M, sum N_i) = x (M, K) @ cat(weights).T; up to four weights (N_i, K), each row-contiguous; x first
    RMS-normed with norm_weight (K,) contiguous, if given. pdl overrides the launch (benchmarks)."""
    ws = list(weights) + [weights[0]] * (4 - len(weights))
    ns = [w.shape[0] for w in weights] + [0] * (4 - len(weights))
    m, k = x.shape
    pdl = pdl_supported(x.device) if pdl is None else pdl

    def grid(meta):
        return (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in ns),)

    has_norm = norm_weight is not None
    tile, block_m = _row_tiling(m, has_norm, x.dtype)
    kernel = _multi_tile_kernel if tile else _multi_kernel
    kernel[grid](x, x.stride(0), out, out.stride(0), m, k, *ws, *ns, norm_weight if has_norm else x, float(eps),
                 HAS_NORM=has_norm, TILE=tile, BLOCK_M=block_m, INTERP=_INTERPRET, PDL=pdl, **launch_options(pdl))
    return out


def pair_linear_triton(x1, w1, x2, w2, res, out, s1: float, s2: float, mode: int, norm_weight=None,
                       eps: float = 0.0, *, pdl: bool | None = None):
    """out (M, N) = the mode's epilogue (module docstring) of x1 @ w1.T and x2 @ w2.T (x1 @ w2.T for SWIGLU), x1
    first RMS-normed with norm_weight (K1,) contiguous, if given; x2, w2 and res may be None. pdl overrides the
    launch (benchmarks)."""
    m, k1 = x1.shape
    n = w1.shape[0]
    second = x2 is not None
    k2 = x2.shape[1] if second else 0
    pdl = pdl_supported(x1.device) if pdl is None else pdl

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    tile, block_m = _row_tiling(m, norm_weight is not None, x1.dtype)
    kernel = _pair_tile_kernel if tile else _pair_kernel
    kernel[grid](x1, x1.stride(0), w1, k1, x2 if second else x1, x2.stride(0) if second else 0,
                 w2 if w2 is not None else w1, k2, res if res is not None else out,
                 res.stride(0) if res is not None else 0, out, out.stride(0), m, n, float(s1), float(s2),
                 norm_weight if norm_weight is not None else x1, float(eps), MODE=mode, HAS_SECOND=second,
                 HAS_RES=res is not None, HAS_NORM=norm_weight is not None, TILE=tile, BLOCK_M=block_m,
                 INTERP=_INTERPRET, PDL=pdl, **launch_options(pdl))
    return out
