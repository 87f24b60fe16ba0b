"""NF4 dequantization of QLoRA's frozen base weights: bitsandbytes' 4-bit NormalFloat codes back to the dense weight,
bit for bit what `bitsandbytes.functional.dequantize_4bit` computes, in one kernel on CUDA.

    dequantize_nf4(packed, quant_state, *, out=None) -> (out_features, in_features) in quant_state.dtype

packed: the codes as quantize_4bit stores them, ceil(n / 2) bytes for n = prod(quant_state.shape) weights (uint8
(ceil(n / 2), 1), or any storage dtype viewed as bytes); quant_state: the bitsandbytes QuantState that came with
them. Only its attributes are read (absmax, blocksize, shape, dtype, code, quant_type; when nested, also offset and
state2.absmax / state2.code / state2.blocksize): bitsandbytes itself is never imported here. The definition, for
weight i (row-major over shape) and its absmax block b = i // blocksize:
    absmax[b] = fp32(fp32(state2.code[absmax_q[b]] * state2.absmax[b // state2.blocksize]) + offset)  (nested,
                                          double quantization: the absmaxes stored in 8 bits, as gyrfalcon makes them)
    absmax[b] = fp32(quant_state.absmax[b])                                                           (not nested)
    out[i]    = dtype(fp32(NF4[code of i] * absmax[b]))
the code of i being the high four bits of byte i // 2 for even i and its low four bits for odd i (an odd n leaves
the last byte's low bits unused). Each product is rounded to fp32 and then to the output dtype (nearest even), as
bitsandbytes' kernels round it; NF4 is its table of 16 quantiles of N(0, 1), scaled to [-1, 1] (NF4_CODE).

On CUDA (dispatch.kernels_enabled) a single Triton kernel (nf4_triton.py) does it all, with no host synchronization
and no allocation besides the output (none with `out=`): it can be captured in a CUDA graph. It reads the table from
quant_state.code, where quantize_4bit stores exactly NF4_CODE (bitsandbytes' own CUDA kernel uses its built-in copy
of the same table). Elsewhere `dequantize_nf4_ref`, in PyTorch from the definition above. Only nf4 is taken (fp4's
bitsandbytes kernel computes its values by another formula): bitsandbytes.functional.dequantize_4bit for fp4.
The result is always quant_state.shape (bitsandbytes transposes it for a packed tensor of one row, (1, m), a
layout gyrfalcon never stores).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .dispatch import KERNEL_DTYPES, kernels_enabled

# NF4's 16 values, index order: the normal quantiles of QLoRA (Dettmers et al. 2023) as bitsandbytes stores them
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes quantizes with


@dataclass(frozen=True)
class NF4Tensors:
    """One weight's quantization state, checked and flattened (all on packed's device): packed (ceil(n / 2),)
    uint8; absmax (n_blocks,) uint8 when nested, else float; code (16,) fp32; the nested scales absmax2
    (ceil(n_blocks / nested_blocksize),) fp32, their code (256,) fp32 and offset () fp32, or None."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    nested_blocksize: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _flat(name: str, tensor, device: torch.device, min_numel: int, dtypes=None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"quant_state.{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"quant_state.{name} is on {tensor.device}, the packed codes on {device}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"quant_state.{name} is {tensor.dtype}; expected {' or '.join(map(str, dtypes))}")
    if tensor.numel() < min_numel:
        raise ValueError(f"quant_state.{name} holds {tensor.numel()} values; the weight needs {min_numel}")
    return tensor.reshape(-1)


def _offset_tensor(offset, device: torch.device) -> torch.Tensor:
    """The nested absmaxes' offset as a () fp32 tensor on the device (bitsandbytes keeps a tensor there; a Python
    number, from an older state, is copied to the device: not in a CUDA graph capture)."""
    if isinstance(offset, torch.Tensor):
        if offset.numel() != 1 or offset.dtype != torch.float32:
            raise ValueError(f"quant_state.offset must be one fp32 value, got {offset.dtype} {list(offset.shape)}")
        return _flat("offset", offset, device, 1)
    return torch.tensor(float(offset), dtype=torch.float32, device=device)


def nf4_tensors(packed: torch.Tensor, quant_state) -> NF4Tensors:
    """The checked, flattened tensors of (packed, quant_state); ValueError names what does not fit. Reads no value
    back from the device."""
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 takes nf4 weights, not {quant_type!r}: use "
                         "bitsandbytes.functional.dequantize_4bit for fp4")
    dtype, blocksize, shape = quant_state.dtype, quant_state.blocksize, torch.Size(quant_state.shape)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"NF4 weights dequantize to {', '.join(map(str, KERNEL_DTYPES))}, not {dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    n = math.prod(shape)
    device = packed.device
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)  # another quant_storage dtype: the same bytes
    packed = _flat("packed codes", packed, device, (n + 1) // 2)
    n_blocks = -(-n // blocksize)
    code = _flat("code", quant_state.code, device, 16, (torch.float32,))
    state2 = quant_state.state2 if getattr(quant_state, "nested", False) else None
    if state2 is None:
        absmax = _flat("absmax", quant_state.absmax, device, n_blocks, KERNEL_DTYPES)
        return NF4Tensors(packed, absmax, code, None, None, None, blocksize, 1, shape, dtype)
    absmax = _flat("absmax", quant_state.absmax, device, n_blocks, (torch.uint8,))
    nested_blocksize = state2.blocksize
    if nested_blocksize <= 0 or nested_blocksize & (nested_blocksize - 1):
        raise ValueError(f"state2.blocksize must be a power of two, got {nested_blocksize}")
    if state2.dtype != torch.float32:
        raise ValueError(f"nested absmaxes dequantize to fp32 (state2.dtype), not {state2.dtype}")
    absmax2 = _flat("state2.absmax", state2.absmax, device, -(-n_blocks // nested_blocksize), (torch.float32,))
    code2 = _flat("state2.code", state2.code, device, 256, (torch.float32,))
    offset = _offset_tensor(quant_state.offset, device)
    return NF4Tensors(packed, absmax, code, absmax2, code2, offset, blocksize, nested_blocksize, shape, dtype)


def check_out(out: torch.Tensor, t: NF4Tensors) -> None:
    """`out=` must be the result's exact tensor: contiguous, the state's shape and dtype, on the codes' device."""
    if tuple(out.shape) != tuple(t.shape) or out.dtype != t.dtype or out.device != t.packed.device:
        raise ValueError(f"out is {out.dtype} {list(out.shape)} on {out.device}; the weight dequantizes to "
                         f"{t.dtype} {list(t.shape)} on {t.packed.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def block_absmax_ref(t: NF4Tensors) -> torch.Tensor:
    """(n_blocks,) fp32: each block's absmax, the nested 8-bit dequantization and offset applied."""
    if t.nested_absmax is None:
        return t.absmax.float()
    n_blocks = t.absmax.numel()
    scale = t.nested_absmax.repeat_interleave(t.nested_blocksize)[:n_blocks]
    return t.nested_code[t.absmax.long()] * scale + t.offset  # two fp32 roundings, as written


def codes_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64: the 4-bit code of each weight, the high half of each byte first."""
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)
    return codes[:n].long()


@functools.lru_cache(maxsize=None)
def _nf4_table(device: torch.device) -> torch.Tensor:
    """NF4_CODE as an fp32 tensor on `device`, made once per device: a copy from the host on every call could not
    run inside a CUDA graph's capture (the reference path under ops.use_reference())."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dequantize_nf4_ref(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The definition (module docstring) in PyTorch, with the NF4 table written here rather than read from the
    state: quant_state.shape in quant_state.dtype."""
    t = nf4_tensors(packed, quant_state)
    n = t.numel
    table = _nf4_table(t.packed.device)
    absmax = block_absmax_ref(t)[:-(-n // t.blocksize)].repeat_interleave(t.blocksize)[:n]
    return (table[codes_ref(t.packed, n)] * absmax).to(t.dtype).reshape(t.shape)


def dequantize_nf4(packed: torch.Tensor, quant_state, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight of NF4 codes and their bitsandbytes QuantState: quant_state.shape in quant_state.dtype, bit
    for bit as bitsandbytes.functional.dequantize_4bit gives it; written into `out` (contiguous, that shape and
    dtype) when given. One Triton kernel on CUDA (CUDA-graph capturable), the reference elsewhere."""
    if kernels_enabled(packed, quant_state.absmax):
        from .nf4_triton import dequantize_nf4_triton
        return dequantize_nf4_triton(packed, quant_state, out=out)
    result = dequantize_nf4_ref(packed, quant_state)
    if out is None:
        return result
    check_out(out, nf4_tensors(packed, quant_state))
    return out.copy_(result)
