"""Triton kernel of ops/loss.py's fused linear cross-entropy: the loss of a chunk of logits and, in the same pass,
their gradient written over them, so that a LoRA step (frozen lm_head) never recomputes the logits in its backward.

    _ce_rows_kernel: one program per row of a (rows, v) logits chunk in the model dtype (row stride `stride`):
        z = scale * logits[row] (fp32); lse = logsumexp(z) by an online max/sum over BLOCK_V columns at a time;
        loss[row] = lse - z[target] (0 where target == ignore_index);
        WRITE_GRAD: logits[row] <- (softmax(z) - onehot(target)) * scale / count, rounded to the logits' dtype
        (zeros for an ignored row): the gradient of mean CE = sum(loss) / count with respect to the raw logits.
`count` is read from the device (the number of kept targets), so nothing waits on the host (CUDA graphs).
Two passes over the row in the model dtype (three with the gradient's write) replace the fp32 copy, scaling,
log-softmax, softmax, scatter and cast passes (each over an fp32 copy) that the PyTorch expression makes twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ssd_triton import _INTERPRET, _bound

BLOCK_V = 4096 if not _INTERPRET else 64


@triton.jit
def _ce_rows_kernel(logits_ptr, stride, targets_ptr, loss_ptr, count_ptr, V, scale, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, INTERP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    keep = target != ignore_index
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, _bound(V, INTERP), BLOCK_V):   # per-lane running max and sum, merged once after the loop
        mask = v0 + cols < V
        z = tl.load(base + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        s = tl.where(m_new == float("-inf"), 0.0, s)          # lanes that have seen nothing yet
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    safe_target = tl.where(keep, target, 0)
    z_target = tl.load(base + safe_target).to(tl.float32) * scale
    tl.store(loss_ptr + row, tl.where(keep, lse - z_target, 0.0))
    if WRITE_GRAD:
        factor = tl.where(keep, scale / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0), 0.0)
        for v0 in range(0, _bound(V, INTERP), BLOCK_V):
            mask = v0 + cols < V
            z = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32) * scale
            p = tl.exp(z - lse) - tl.where(v0 + cols == target, 1.0, 0.0)
            tl.store(base + v0 + cols, (p * factor).to(logits_ptr.dtype.element_ty), mask=mask)


def ce_rows(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, scale: float, ignore_index: int,
            write_grad: bool) -> torch.Tensor:
    """Per-row losses (rows,) fp32 of scale * logits (rows, v) (unit column stride) against targets (rows,); with
    write_grad the chunk is overwritten by the gradient of sum(all rows' losses) / count with respect to the raw
    logits (count: a one-element device tensor)."""
    rows, v = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_rows_kernel[(rows,)](logits, logits.stride(0), targets, loss, count, v, float(scale), int(ignore_index),
                                 WRITE_GRAD=write_grad, BLOCK_V=BLOCK_V, INTERP=_INTERPRET, num_warps=8)
    return loss
