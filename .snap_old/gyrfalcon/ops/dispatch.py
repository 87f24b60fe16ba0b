"""The one place that decides, per call, whether an op runs a Triton kernel or its pure-PyTorch reference.

Kernels run only on CUDA tensors with Triton importable; everything else (CPU, MPS, float64 checks) uses the
`*_ref` beside each kernel. `use_reference()` forces the references everywhere (tests compare both paths):

    with gyrfalcon.ops.use_reference():
        out = model(ids)            # pure-PyTorch path, also on CUDA
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

_force_reference = False

# Storage dtypes the kernels take; float64 stays on the references (the exact checks).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_enabled(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these inputs: all on CUDA, Triton present, not forced off."""
    if _force_reference or not triton_available():
        return False
    return all(t.is_cuda for t in tensors if t is not None)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, cpu_default: int) -> int:
    """The streaming multiprocessors of a CUDA device (read once per device), which kernels size their grids by;
    cpu_default elsewhere (the CPU interpreter, where grids are sized for tests)."""
    if device.type != "cuda":
        return cpu_default
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def reference_forced() -> bool:
    return _force_reference


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Force (or, with enabled=False, stop forcing) the pure-PyTorch references inside the block."""
    global _force_reference
    previous, _force_reference = _force_reference, enabled
    try:
        yield
    finally:
        _force_reference = previous
