"""Causal language-modelling loss: token t's logits predict label t+1; -100 labels are ignored; mean over the rest.

logits (b, l, v) (any float dtype; the loss is taken in fp32), labels (b, l). The fused linear + cross-entropy
kernel (never materialising the logits) takes this job in training once it exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    ldt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(ldt).reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=ignore_index)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return causal_lm_loss_ref(logits, labels, ignore_index)
