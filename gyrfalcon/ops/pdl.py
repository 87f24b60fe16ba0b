"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step, and for the conv
backward's weight-gradient sum.

A decode step is a few hundred small kernels in a row, each a pass over some weights; between two of them the GPU
normally drains the first completely, then launches and ramps up the second. With PDL the second kernel is launched
while the first is still running: its programs become resident on the SMs as the first one's last programs finish,
and wait there (`griddepcontrol.wait`) until the first has completed and its writes are visible. What is saved is
the launch and ramp-up gap, a few microseconds per kernel.

The contract, kept by every kernel launched with `launch_options()`:
- it calls `pdl_wait(PDL)` before its first global memory access (so it never reads what the previous kernel is
  still writing, and never writes what the previous kernel is still reading), and on every path (a program that
  returned without waiting would let the kernel complete before its predecessor, and the one after it would then
  wait on the wrong kernel);
- `pdl_wait` also signals (`griddepcontrol.launch_dependents`) that the next kernel may be launched: it only takes
  effect once every program of this kernel has started, so the next kernel's programs never crowd out this one's.
Kernels launched without the option (cuBLAS, PyTorch's) are serialized as usual, before and after. A kernel launched
without it can still let the PDL kernel after it launch early: `pdl_release(PDL)` as its first statement.

    from .pdl import launch_options, pdl_wait
    my_kernel[grid](..., PDL=pdl, **launch_options(pdl))     # pdl = pdl_supported(tensor.device)
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.lru_cache(maxsize=None)
def _pdl_on(index: int) -> bool:
    """Decided once per device: every decode-step launch asks."""
    return os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0 or later, outside the CPU interpreter."""
    if device.type != "cuda":
        return False
    return _pdl_on(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(pdl: bool) -> dict:
    """Keyword arguments of a Triton launch: programmatic dependent launch on, or nothing."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """First statement of a kernel launched with `launch_options(True)`: wait until the previous kernel has completed
    (its writes visible), and let the next one launch. Nothing when PDL is off."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """First statement of a kernel that is not itself launched with PDL but is followed by one that is (the conv's
    backward, then its weight-gradient sum): lets that one launch as soon as every program of this one has started;
    its programs then wait in `pdl_wait` until this kernel has completed. Nothing when PDL is off."""
    if PDL:
        gdc_launch_dependents()
