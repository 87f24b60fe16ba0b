"""LoRA adapters on the model's linear layers: attach, freeze the base, merge back.

A LoRA layer computes  y = x W^T + b + scale * dropout(x) A^T B^T  with A (r, in) ~ Kaiming-uniform, B (out, r) = 0
(so a fresh adapter changes nothing), scale = alpha / r (or alpha / sqrt(r) with rsLoRA), as PEFT defines it.
The base layer keeps its checkpoint names (`...q_proj.weight`), the adapter adds `...q_proj.lora_A` / `lora_B`, so
the base still saves and loads as a plain Hugging Face checkpoint. Targets are attribute names of nn.Linear
modules: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj in_proj out_proj (the Mamba `out_proj` included:
its adapter trains like any other).

The adapter may be kept in another dtype than the base (float32 adapters on a bf16 base, so that the optimizer's
small updates are not rounded away): the forward casts A and B to the input's dtype.

    apply_lora(model, r=16, alpha=32, targets=("q_proj", "v_proj"))   # every layer's q_proj and v_proj
    add_lora(model, {"model.layers.0.mamba.out_proj": (8, 16.0)})      # named modules, rank and alpha each
    merge_and_unload(model)                                            # fold in place, plain nn.Linear again
    merged_state_dict(model)                                           # folded copy, the model left as it is
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update. Shapes: x (..., in) -> (..., out); lora_A (r, in), lora_B (out, r)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.rslora, self.dropout_p = r, float(alpha), bool(rslora), float(dropout)
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, adapter_dtype: torch.dtype | None = None, **lora) -> "LoRALinear":
        """Wrap an existing layer: its weight and bias tensors are reused, not copied. The adapter is made in
        `adapter_dtype` (default: the base weight's dtype) on the base weight's device."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **lora)
        layer.weight, layer.bias = linear.weight, linear.bias
        device, dtype = linear.weight.device, adapter_dtype or linear.weight.dtype
        layer.lora_A = nn.Parameter(torch.empty(layer.r, linear.in_features, device=device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.zeros(linear.out_features, layer.r, device=device, dtype=dtype))
        layer.reset_lora()
        return layer

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        bound = 1 / math.sqrt(self.in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
        fresh = torch.empty(self.lora_A.shape, dtype=torch.float32, device=generator.device if generator else None)
        self.lora_A.copy_(fresh.uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # no-ops when the dtypes agree
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in float32 (out, in): what merging adds to the base weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale * B A into the base weight (computed in fp32), and stop applying the adapter."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, rslora={self.rslora}, "
                f"dropout={self.dropout_p:g}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of the model by module name (e.g. 'model.layers.0.self_attn.q_proj')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def add_lora(model: nn.Module, modules: dict[str, tuple[int, float]], *, dropout: float = 0.0,
             rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the named nn.Linear modules ({module name: (r, alpha)}) in LoRA layers and freeze everything but the
    adapters. A name that is not a plain nn.Linear of the model is an error naming it."""
    found = dict(model.named_modules())
    for name in modules:
        module = found.get(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; merge it first or start from a fresh base model")
        if type(module) is not nn.Linear:
            kind = "no such module" if module is None else f"a {type(module).__name__}, not nn.Linear"
            raise ValueError(f"cannot put a LoRA adapter on {name!r}: {kind}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (r, alpha) in modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear.from_linear(getattr(parent, attr), r=r, alpha=alpha, dropout=dropout,
                                                     rslora=rslora, adapter_dtype=adapter_dtype))
    return model


def apply_lora(model: nn.Module, *, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets=ALL_TARGETS, rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear, freeze everything else.
    Returns the model (changed in place)."""
    if isinstance(targets, str):
        targets = (targets,)
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them (merge_and_unload) or start from a "
                         "fresh base model")
    names = [name for name, m in model.named_modules()
             if name.rpartition(".")[2] in targets and type(m) is nn.Linear]
    if not names:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    return add_lora(model, {name: (r, alpha) for name in names}, dropout=dropout, rslora=rslora,
                    adapter_dtype=adapter_dtype)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def lora_targets(model: nn.Module) -> list[str]:
    """The attribute names that carry adapters (e.g. ['in_proj', 'q_proj']), sorted."""
    return sorted({name.rpartition(".")[2] for name in lora_layers(model)})


@torch.no_grad()
def merged_state_dict(model: nn.Module, device="cpu") -> dict[str, torch.Tensor]:
    """The state dict of the model with every adapter folded into its base weight (in fp32, stored in the base
    dtype) and no LoRA tensors: a plain checkpoint's tensors, on `device`. The model is left unchanged."""
    layers = lora_layers(model)
    merged = {f"{name}.weight": (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype)
              for name, layer in layers.items() if not layer.merged}
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        out[key] = merged.pop(key, tensor).detach().to(device)
    return out


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back, in place. Returns the model,
    whose state dict is then a plain checkpoint's (no LoRA tensors)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    return model
