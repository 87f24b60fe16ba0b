"""Triton kernel for NF4 dequantization (ops/nf4.py): a bitsandbytes 4-bit NF4 weight, its absmaxes optionally
double-quantized, to the dense weight in one pass, bit for bit what `bitsandbytes.functional.dequantize_4bit` gives.

Semantics are those of `nf4.dequantize_nf4_ref`, for n = prod(shape) elements:
    nested:  absmax[b] = fp32(fp32(code2[qabsmax[b]] * absmax2[b // nested_blocksize]) + offset)
    else:    absmax[b] = fp32(absmax_stored[b])
    out[i]   = dtype(fp32(code[nibble(i)] * absmax[i // blocksize]))
nibble(i): byte i // 2 of the packed codes, its high four bits for even i, its low four bits for odd i (the last byte
of an odd n holds one element). Rounding: each product and the offset sum rounded to fp32 (the kernel is compiled
without FMA contraction, so code2 * absmax2 + offset is two roundings, as bitsandbytes' two kernels do it), the
result rounded to nearest even in the output dtype.

Layout: a program takes a contiguous span of whole absmax blocks, BLOCKS of them (SPAN_BYTES = 2 KiB of packed
codes, 4096 weights, at blocksize 64; one block where a block is larger), as a (BLOCKS, blocksize) tile whose rows
are blocks: each block's absmax (the nested dequantization included) is computed once and scales its row. The codes
are read as little-endian 32-bit words, (BLOCKS, blocksize / 8) of them, 16-byte vector loads where the length and
alignment allow (else four byte loads per word, for odd lengths); each word's eight 4-bit codes are split out in
registers (byte j of a word holds weights 2j (high bits) and 2j + 1 (low bits)), looked up in the 16-entry table
(quant_state.code, held in shared memory: tl.gather), scaled, rounded, and stored as 16-byte vectors (8 consecutive
16-bit or 4 fp32 weights). The only layout conversion is the words' (2 KiB through shared memory). Compiled for sm_90
(bf16, nested) that is about 10 SASS instructions per weight (312 per thread of 32). No allocation besides the
output, no host synchronization (the offset is read on the device): capturable in a CUDA graph. Under the CPU
interpreter (TRITON_INTERPRET=1), whose fp32 -> bf16 cast truncates, bf16 is rounded by integer arithmetic instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4 import NF4Tensors, check_out, nf4_tensors

_INTERPRET = bool(triton.knobs.runtime.interpret)
SPAN_BYTES = 2048  # packed bytes per program: 4096 weights at blocksize 64, 32 per thread with 4 warps
NUM_WARPS = 4
# Compiled without fused multiply-add: code2 * absmax2 + offset must round twice, as bitsandbytes' two kernels do.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first, blk, n_blocks, NESTED: tl.constexpr,
                  NESTED_BLOCKSIZE: tl.constexpr):
    """The fp32 absmax of blocks first + blk (blk (BLOCKS,) int32); 0 past the last block."""
    ok = blk < n_blocks - first
    if NESTED:
        q = tl.load(absmax_ptr + first + blk, mask=ok, other=0)
        scale = tl.load(absmax2_ptr + (first + blk) // NESTED_BLOCKSIZE, mask=ok, other=0.0)
        # the 8-bit blockwise dequantization, rounded to fp32, then the offset added (a second rounding)
        absmax = tl.load(code2_ptr + q) * scale
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + first + blk, mask=ok, other=0.0).to(tl.float32)
    return absmax


@triton.jit
def _packed_words(packed_ptr, first_byte, word, n_bytes_left, WORD_LOADS: tl.constexpr):
    """The packed codes as little-endian 32-bit words: word (BLOCKS, WORDS) int32 indices from byte first_byte;
    bytes from n_bytes_left on read as 0. WORD_LOADS: whole-word loads (the codes 4-byte aligned, their length a
    multiple of 4), else four byte loads per word (a length that ends inside a word)."""
    if WORD_LOADS:
        words_ptr = (packed_ptr + first_byte).to(tl.pointer_type(tl.uint32))
        words = tl.load(words_ptr + word, mask=word < n_bytes_left // 4, other=0)
    else:
        bytes_ptr = packed_ptr + first_byte + word * 4
        words = tl.zeros(word.shape, tl.uint32)
        for j in tl.static_range(4):
            byte = tl.load(bytes_ptr + j, mask=word * 4 + j < n_bytes_left, other=0)
            words = words | (byte.to(tl.uint32) << (8 * j))
    return words


@triton.jit
def _bf16_round_bits(x):
    """fp32 -> bf16 rounded to nearest even by integer arithmetic (finite x): what the GPU's conversion does, for
    the CPU interpreter, whose own fp32 -> bf16 cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
                        n, n_bytes, n_blocks, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                        NESTED: tl.constexpr, BLOCKS: tl.constexpr, WORD_LOADS: tl.constexpr,
                        BF16_BY_BITS: tl.constexpr):
    WORDS: tl.constexpr = BLOCKSIZE // 8  # 32-bit words of codes per absmax block
    SPAN: tl.constexpr = BLOCKS * BLOCKSIZE  # elements of this program
    # int64 only for the program's first block, element and byte; offsets within the program are int32
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    blk = tl.arange(0, BLOCKS)
    absmax = _block_absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, first, blk, n_blocks, NESTED,
                           NESTED_BLOCKSIZE)
    n_bytes_left = tl.minimum(n_bytes - first * (BLOCKSIZE // 2), SPAN // 2).to(tl.int32)
    words = _packed_words(packed_ptr, first * (BLOCKSIZE // 2), blk[:, None] * WORDS + tl.arange(0, WORDS)[None, :],
                          n_bytes_left, WORD_LOADS)
    # element 8w + k of word w: byte k // 2 of it, its high four bits for even k (the first element of a byte)
    k = tl.arange(0, 8)
    shift = (k // 2) * 8 + (1 - (k & 1)) * 4
    codes = ((words[:, :, None] >> shift[None, None, :]) & 15).to(tl.int32)
    table = tl.load(code_ptr + tl.arange(0, 16))
    nf4 = tl.gather(table, tl.reshape(codes, (SPAN,)), 0)
    values = tl.reshape(nf4, (BLOCKS, BLOCKSIZE)) * absmax[:, None]
    if BF16_BY_BITS:
        rounded = _bf16_round_bits(values)
    else:
        rounded = values.to(out_ptr.dtype.element_ty)
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    n_left = tl.minimum(n - first * BLOCKSIZE, SPAN).to(tl.int32)
    tl.store(out_ptr + first * BLOCKSIZE + elem, rounded, mask=elem < n_left)


def blocks_per_program(blocksize: int, span_bytes: int = SPAN_BYTES) -> int:
    """Absmax blocks one program dequantizes: span_bytes of packed codes, at least one block."""
    return max(1, span_bytes // (blocksize // 2))


def launch(t: NF4Tensors, out: torch.Tensor, *, span_bytes: int = SPAN_BYTES,
           num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Run the kernel on the checked tensors of one weight into `out` (contiguous, t.shape, t.dtype); span_bytes
    (a power of two) and num_warps size the programs (the defaults; bench/nf4_dequant.py --configs times others)."""
    n = t.numel
    if n == 0:
        return out
    n_blocks = -(-n // t.blocksize)
    n_bytes = (n + 1) // 2
    blocks = blocks_per_program(t.blocksize, span_bytes)
    word_loads = n_bytes % 4 == 0 and t.packed.data_ptr() % 4 == 0
    nested = t.nested_absmax is not None
    # absmax2, code2 and offset are not read without nesting: any pointer stands in for them
    absmax2 = t.nested_absmax if nested else t.absmax
    code2 = t.nested_code if nested else t.code
    offset = t.offset if nested else t.code
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, blocks),)](
        t.packed, t.absmax, absmax2, code2, offset, t.code, out, n, n_bytes, n_blocks,
        BLOCKSIZE=t.blocksize, NESTED_BLOCKSIZE=t.nested_blocksize, NESTED=nested, BLOCKS=blocks,
        WORD_LOADS=word_loads, BF16_BY_BITS=_INTERPRET and t.dtype == torch.bfloat16, num_warps=num_warps,
        **COMPILE_OPTIONS)
    return out


def dequantize_nf4_triton(packed: torch.Tensor, quant_state, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """nf4.dequantize_nf4_ref's semantics (see there) in one kernel launch; `out` (contiguous, the state's shape and
    dtype, on the packed codes' device) receives the result if given, else a new tensor."""
    t = nf4_tensors(packed, quant_state)
    if out is None:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.packed.device)
    else:
        check_out(out, t)
    return launch(t, out)

