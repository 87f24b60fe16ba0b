"""Activation checkpointing whose saved layer inputs wait in (pinned) CPU memory instead of on the GPU.

With per-layer checkpointing, what a training step keeps between its forward and its backward is one hidden-state
tensor per layer, (b, l, hidden): for the 7B shape at 128K tokens, 44 x 0.75 GiB = 33 GiB.
`offloaded_checkpoint` runs a layer without building its graph, copies its input to host memory, and in the
backward copies it back, recomputes the layer with gradients and back-propagates through it (as reentrant
checkpointing does), so the GPU holds only the layer being recomputed. The cost is two host transfers of the input
per layer and step (not yet measured on a GPU).

    hidden = offloaded_checkpoint(layer, hidden, cos, sin, padding_mask, seq_idx, preserve_rng_state=True)

hidden (b, l, hidden) is the only input that carries a gradient; the other arguments (RoPE tables, masks, document
indices) are passed through as they are and get none. Random ops (dropout) replay the same masks when
preserve_rng_state is true. Not usable inside a CUDA graph (host memory and transfers).
"""

from __future__ import annotations

import torch
from torch import nn


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, layer: nn.Module, preserve_rng: bool, *args):
        ctx.layer, ctx.args, ctx.preserve_rng = layer, args, preserve_rng
        ctx.device = hidden.device
        if preserve_rng:
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        saved.copy_(hidden, non_blocking=hidden.is_cuda)
        ctx.saved_input = saved
        with torch.no_grad():
            return layer(hidden, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden = ctx.saved_input.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.saved_input = None
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.layer(hidden, *ctx.args)
        torch.autograd.backward(out, grad_out)
        return (hidden.grad, None, None) + (None,) * len(ctx.args)


def offloaded_checkpoint(layer: nn.Module, hidden: torch.Tensor, *args, preserve_rng_state: bool = True):
    """layer(hidden, *args), keeping only a host copy of `hidden` for the backward (see the module docstring)."""
    return _OffloadedLayer.apply(hidden, layer, preserve_rng_state, *args)
