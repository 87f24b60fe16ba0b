"""Causal language-modelling loss: token t's logits predict label t+1; -100 labels are ignored; mean over the rest.

causal_lm_loss: logits (b, l, v) (any float dtype; the loss is taken in fp32), labels (b, l).
linear_cross_entropy: the same loss from the final hidden states, without ever holding all the logits: hidden
(n, d), weight (v, d) the lm_head, targets (n,) already shifted; the logits `scale * hidden @ weight.T` are made
chunk by chunk in fp32 in the forward and again in the backward. At a 130K-261K vocabulary the full logits of a
long sequence would be the largest tensor of a training step (a 32K-token row of the 7B: 17 GB in fp32). On CUDA with
a frozen lm_head (LoRA), a Triton kernel takes each chunk's loss and gradient in one pass and the logits are made
only once (_FusedLinearCrossEntropy, loss_triton.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES, kernels_enabled

IGNORE_INDEX = -100
# Logits of about this many (token, vocabulary) entries at a time. A chunk's forward and backward hold ~16 bytes per
# entry at their peak (the logits in the model dtype, their fp32 copy, softmax, the gradient in fp32 and in the model
# dtype): 2^25 entries is ~0.5 GiB, i.e. 256 tokens at the 7B's 130K vocabulary, 1024 at the 0.5B's 32K, while the
# GEMMs stay large (256 x 3072 x 130K). By the same count a fixed 4096 tokens held ~8 GiB at 7B (not measured).
CHUNK_ENTRIES = 2 ** 25
MIN_CHUNK_TOKENS = 128


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for this vocabulary: CHUNK_ENTRIES / vocab, a multiple of 64, at least MIN_CHUNK_TOKENS."""
    return max(MIN_CHUNK_TOKENS, CHUNK_ENTRIES // vocab_size // 64 * 64)


def causal_lm_loss_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    ldt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(ldt).reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=ignore_index)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return causal_lm_loss_ref(logits, labels, ignore_index)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(b, l) labels -> (b, l) targets: position t is scored against label t+1 (the last against nothing)."""
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:]


ALIGN = 16  # elements: row strides that are multiples of this keep cuBLAS on its aligned (fast) kernels


def _padded(rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (rows, cols) view whose row stride is cols rounded up to ALIGN. Falcon-H1's vocabularies
    are odd (130,049 at 7B): a contiguous (n, vocab) matrix has an odd row stride, and cuBLAS then falls back to a
    slow unaligned kernel for the logits and for their gradient's product (46 of a 330 ms 7B LoRA step)."""
    stride = -(-cols // ALIGN) * ALIGN
    return torch.empty(rows, stride, dtype=dtype, device=like.device)[:, :cols]


def _vocab_pieces(v: int) -> list[slice]:
    """The vocabulary rows the GEMMs take piece by piece: the first v rounded down to ALIGN, then the rest (one
    piece where v is a multiple of ALIGN, or smaller). An odd vocabulary as the GEMM's contiguous dimension also drops
    cuBLAS to its unaligned kernels (measured: 45 of a 310 ms 7B step with the row-aligned buffers alone), so the
    last v mod ALIGN rows go through a second, tiny product."""
    va = v // ALIGN * ALIGN
    return [slice(0, v)] if va in (0, v) else [slice(0, va), slice(va, v)]


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h (rows, d) @ weight (v, d).T in h's dtype, written into a row-aligned buffer."""
    out = _padded(h.shape[0], weight.shape[0], h, h.dtype)
    for piece in _vocab_pieces(weight.shape[0]):
        torch.mm(h, weight[piece].T, out=out[:, piece])
    return out


def _grad_hidden(g: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out (rows, d) = g (rows, v) @ weight (v, d), the vocabulary (the reduction) in _vocab_pieces."""
    first, *rest = _vocab_pieces(weight.shape[0])
    torch.mm(g[:, first], weight[first], out=out)
    for piece in rest:
        out.addmm_(g[:, piece], weight[piece])


def _add_grad_weight(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (v, d) += g (rows, v).T @ h (rows, d), the vocabulary in _vocab_pieces."""
    for piece in _vocab_pieces(grad_w.shape[0]):
        grad_w[piece] += (g[:, piece].T @ h).to(grad_w.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of scale * hidden @ weight.T against targets, in chunks of tokens; the backward recomputes
    each chunk's logits and turns them into gradients at once, so no (n, v) tensor is ever stored."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, chunk):
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=cdt, device=hidden.device)
        count = (targets != ignore_index).sum()
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start:start + chunk], weight).to(cdt) * scale
            total = total + F.cross_entropy(logits, targets[start:start + chunk], ignore_index=ignore_index,
                                            reduction="sum")
        ctx.save_for_backward(hidden, weight, targets, count)
        ctx.scale, ctx.ignore_index, ctx.chunk = scale, ignore_index, chunk
        return total / count  # NaN when every target is ignored, as the eager loss

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, count = ctx.saved_tensors
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=cdt) if need_w else None
        factor = grad_out.to(cdt) * ctx.scale / count
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            t = targets[start:start + ctx.chunk]
            logits = _chunk_logits(h, weight).to(cdt) * ctx.scale
            # d(sum CE)/d logits = softmax - onehot, zero on ignored rows; the chain rule adds scale / count.
            # Written with scatter and a multiply, not boolean indexing: no host sync, so a CUDA graph can hold it.
            g = torch.softmax(logits, dim=-1)
            keep = t != ctx.ignore_index
            g.scatter_add_(1, torch.where(keep, t, 0)[:, None], torch.full((g.shape[0], 1), -1.0, dtype=cdt,
                                                                             device=g.device))
            g = torch.mul(g, (keep.to(cdt) * factor)[:, None], out=_padded(*g.shape, g, hidden.dtype))
            if need_h:
                _grad_hidden(g, weight, grad_h[start:start + ctx.chunk])
            if need_w:
                _add_grad_weight(grad_w, g, h)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The same loss with a frozen weight (LoRA, QLoRA: the lm_head takes no gradient): each chunk's logits are made
    once, the Triton kernel (loss_triton.py) turns them into per-row losses and, when the hidden states need a
    gradient, overwrites them with the gradient of the mean loss, which is multiplied into grad_hidden at once.
    The backward only scales the stored grad_hidden (n, d) by grad_out: no recomputed logits, no fp32 copies. (That
    product rounds once more in the model dtype, unless grad_out is a power of two such as 1 or 1 / accumulation.)"""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, chunk, want_grad):
        from .loss_triton import ce_rows

        count = (targets != ignore_index).sum()
        grad_h = torch.empty_like(hidden) if want_grad else None
        losses = []
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], weight)
            losses.append(ce_rows(logits, targets[rows], count, scale, ignore_index, write_grad=want_grad))
            if want_grad:
                _grad_hidden(logits, weight, grad_h[rows])
        ctx.save_for_backward(grad_h)
        return torch.cat(losses).sum() / count  # NaN when every target is ignored, as the eager loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """Mean CE of (scale * hidden @ weight.T) against targets (see the module docstring). hidden (n, d),
    weight (v, d), targets (n,). On CUDA with a frozen weight, the fused Triton path (_FusedLinearCrossEntropy);
    otherwise the chunked PyTorch expression."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    grad_enabled = torch.is_grad_enabled()
    if (kernels_enabled(hidden, weight, targets) and hidden.shape[0] > 0 and hidden.dtype in KERNEL_DTYPES
            and hidden.dtype == weight.dtype and not (grad_enabled and weight.requires_grad)):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, scale, ignore_index, chunk,
                                              grad_enabled and hidden.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, scale, ignore_index, chunk)
