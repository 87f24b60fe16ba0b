"""Causal depthwise conv1d + SiLU over the Mamba mixer's x|B|C channels: whole sequences and the one-token update.

Shapes: x (b, l, d) channels last, as `in_proj` produces it; weight (d, k) (the checkpoint's (d, 1, k) squeezed);
bias (d,); initial_state (b, d, k-1): the k-1 inputs before x (a cache's conv state); seq_idx (b, l): packed
documents, a token never sees inputs of an earlier document. Returns y (b, l, d) in x's dtype
[, final_state (b, d, k-1): the last k-1 inputs, what a cache keeps for the next call].
Decode: `causal_conv1d_update(x (b, d), conv_state (slots, d, k-1), ...)` appends one token to each row's slot of
the cache in place and returns that token's output (b, d).
The Triton kernels (conv_triton.py) take CUDA tensors with 2 <= k <= 4; anything else runs the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES, kernels_enabled

_KERNEL_MAX_WIDTH = 4  # the Triton kernels keep a 4-slot register window


def causal_conv1d_ref(x, weight, bias=None, *, activation: str | None = "silu", seq_idx=None, initial_state=None,
                      return_final_state: bool = False):
    b, l, d = x.shape
    k = weight.shape[-1]
    cdt = torch.float64 if x.dtype == torch.float64 else weight.dtype
    xt = x.transpose(1, 2).to(cdt)                                             # (b, d, l)
    history = (torch.zeros(b, d, k - 1, dtype=cdt, device=x.device) if initial_state is None
               else initial_state.to(cdt))
    xp = torch.cat([history, xt], dim=-1)                                       # (b, d, k-1+l)
    w = weight.to(cdt)
    bias_c = bias.to(cdt) if bias is not None else None
    if seq_idx is None:
        y = F.conv1d(xp, w[:, None, :], bias_c, groups=d)
    else:
        # window position m of output t reads input t-(k-1)+m; keep it only if it is in t's document
        # (history counts as the first document's)
        ids = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)     # (b, k-1+l)
        same = ids.unfold(1, k, 1) == seq_idx[..., None]                        # (b, l, k)
        windows = xp.unfold(-1, k, 1)                                           # (b, d, l, k)
        y = (windows * same[:, None].to(cdt) * w[:, None, :]).sum(-1)
        if bias_c is not None:
            y = y + bias_c[:, None]
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}")
    y = y.transpose(1, 2).to(x.dtype)
    if return_final_state:
        return y, xp[..., xp.shape[-1] - (k - 1):].to(x.dtype)
    return y


def causal_conv1d(x, weight, bias=None, *, activation: str | None = "silu", seq_idx=None, initial_state=None,
                  return_final_state: bool = False):
    """Dispatching entry: the Triton kernel on CUDA, the reference elsewhere."""
    if (kernels_enabled(x, weight, bias, seq_idx, initial_state) and 2 <= weight.shape[-1] <= _KERNEL_MAX_WIDTH
            and x.dtype in KERNEL_DTYPES and weight.dtype in KERNEL_DTYPES):
        from .conv_triton import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, activation=activation, seq_idx=seq_idx,
                                    initial_state=initial_state, return_final_state=return_final_state)
    return causal_conv1d_ref(x, weight, bias, activation=activation, seq_idx=seq_idx, initial_state=initial_state,
                             return_final_state=return_final_state)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation: str | None = "silu", state_indices=None):
    """One decode step. x (b, d) the new token's inputs; conv_state (slots, d, k-1) the previous k-1 inputs of each
    slot, oldest first, updated in place (shifted left, x appended); state_indices (b,) int: the slot of each row
    (None: row i uses slot i; rows must name distinct slots). Returns y (b, d) in x's dtype, computed in fp32
    (float64 for float64 inputs)."""
    b, d = x.shape
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    slots = (torch.arange(b, device=x.device) if state_indices is None
             else state_indices.to(device=x.device, dtype=torch.long))
    window = torch.cat([conv_state[slots].to(cdt), x[..., None].to(cdt)], dim=-1)      # (b, d, k)
    y = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"causal_conv1d_update: unsupported activation {activation!r}")
    conv_state[slots] = window[..., 1:].to(conv_state.dtype)
    return y.to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation: str | None = "silu", state_indices=None):
    """Dispatching entry of the decode step (same contract as `causal_conv1d_update_ref`)."""
    if kernels_enabled(x, conv_state, weight, bias, state_indices) and x.dtype in KERNEL_DTYPES \
            and conv_state.dtype in KERNEL_DTYPES:
        from .conv_triton import causal_conv1d_update_triton
        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation, state_indices)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, state_indices)
