"""Causal depthwise conv1d + SiLU over the Mamba mixer's x|B|C channels, for whole sequences.

Shapes: x (b, l, d) channels last, as `in_proj` produces it; weight (d, k) (the checkpoint's (d, 1, k) squeezed);
bias (d,); initial_state (b, d, k-1): the k-1 inputs before x (a cache's conv state); seq_idx (b, l): packed
documents, a token never sees inputs of an earlier document. Returns y (b, l, d) in x's dtype
[, final_state (b, d, k-1): the last k-1 inputs, what a cache keeps for the next call].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Dispatching entry (the Triton kernel takes this call on CUDA once it exists)."""
    return causal_conv1d_ref(x, weight, bias, activation=activation, seq_idx=seq_idx, initial_state=initial_state,
                             return_final_state=return_final_state)
