"""LoRA adapters on the model's linear layers: attach, freeze the base, merge back.

A LoRA layer computes  y = x W^T + b + scale * dropout(x) A^T B^T  with A (r, in) ~ Kaiming-uniform, B (out, r) = 0
(so a fresh adapter changes nothing), scale = alpha / r (or alpha / sqrt(r) with rsLoRA), as PEFT defines it.
The base layer keeps its checkpoint names (`...q_proj.weight`), the adapter adds `...q_proj.lora_A` / `lora_B`, so
the base still saves and loads as a plain Hugging Face checkpoint. Targets are attribute names of nn.Linear
modules: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj in_proj out_proj (the Mamba `out_proj` included:
its adapter trains like any other).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update. Shapes: x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora) -> "LoRALinear":
        """Wrap an existing layer: its weight and bias tensors are reused, not copied."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **lora)
        layer.weight, layer.bias = linear.weight, linear.bias
        device, dtype = linear.weight.device, linear.weight.dtype
        layer.lora_A = nn.Parameter(torch.empty(layer.r, linear.in_features, device=device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.zeros(linear.out_features, layer.r, device=device, dtype=dtype))
        layer.reset_lora()
        return layer

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        bound = 1 / math.sqrt(self.in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
        self.lora_A.copy_(torch.empty_like(self.lora_A, dtype=torch.float32).uniform_(-bound, bound,
                                                                                      generator=generator))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale * B A into the base weight (computed in fp32), and stop applying the adapter."""
        if not self.merged:
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            self.merged = True


def apply_lora(model: nn.Module, *, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets=ALL_TARGETS, rslora: bool = False) -> nn.Module:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear, freeze everything else.
    Returns the model (changed in place)."""
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear.from_linear(child, r=r, alpha=alpha, dropout=dropout,
                                                             rslora=rslora))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
