"""LoRA adapters on the model's linear layers: attach, freeze the base, merge back.

A LoRA layer computes  y = base(x) + scale * dropout(x) A^T B^T  with A (r, in) ~ Kaiming-uniform, B (out, r) = 0
(so a fresh adapter changes nothing), scale = alpha / r (or alpha / sqrt(r) with rsLoRA), as PEFT defines it.
The base is an nn.Linear (LoRALinear: base(x) = x W^T + b) or a 4-bit NF4 linear (LoRALinear4bit on a
quant.Linear4bit: QLoRA). Either way the base keeps its checkpoint names (`...q_proj.weight`) and the adapter adds
`...q_proj.lora_A` / `lora_B`; the adapter is added to the layer's own output, before anything the model does with it
(the µP factors applied to in_proj's output scale the adapter's part too, as they do in 16 bits). Targets are
attribute names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj in_proj out_proj (the Mamba `out_proj`
included: its adapter trains like any other).

The adapter may be kept in another dtype than the base (float32 adapters on a bf16 base, so that the optimizer's
small updates are not rounded away): the forward casts A and B to the input's dtype.

    apply_lora(model, r=16, alpha=32, targets=("q_proj", "v_proj"))   # every layer's q_proj and v_proj
    add_lora(model, {"model.layers.0.mamba.out_proj": (8, 16.0)})      # named modules, rank and alpha each
    merge_and_unload(model)                                            # fold in place, plain nn.Linear again
    merged_state_dict(model)                                           # folded copy, the model left as it is

On a 4-bit base, merging folds the adapter into the dequantized weight (a 4-bit weight cannot take the update
exactly): the merged layer is a dense nn.Linear in the compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .lora_autograd import LoRAParts, lora_group
from .quant import Linear4bit

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj")


class LoRALayer(nn.Module):
    """The adapter part shared by LoRALinear and LoRALinear4bit: lora_A (r, in), lora_B (out, r), the scale, the
    dropout on the adapter's input, init, and the dense weight with the adapter folded in. A subclass also derives
    from its base layer class and says how to reach the base's dense weight (`base_weight`)."""

    def _add_adapter(self, *, r: int, alpha: float, dropout: float, rslora: bool, device, dtype) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.rslora, self.dropout_p = r, float(alpha), bool(rslora), float(dropout)
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.merged = False

    @classmethod
    def from_linear(cls, base: nn.Module, *, adapter_dtype: torch.dtype | None = None, **lora) -> "LoRALayer":
        """Wrap an existing base layer: its tensors are reused, not copied. The adapter is made in `adapter_dtype`
        (default: the base's compute dtype) on the base weight's device and freshly initialised."""
        with torch.device("meta"):
            layer = cls(base.in_features, base.out_features, base.bias is not None, **lora)
        layer._adopt_base(base)
        device, dtype = base.weight.device, adapter_dtype or layer.base_dtype
        layer.lora_A = nn.Parameter(torch.empty(layer.r, base.in_features, device=device, dtype=dtype))
        layer.lora_B = nn.Parameter(torch.zeros(base.out_features, layer.r, device=device, dtype=dtype))
        layer.reset_lora()
        return layer

    def _adopt_base(self, base: nn.Module) -> None:
        raise NotImplementedError

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype of the base's dense weight (the compute dtype of a 4-bit base)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base's dense weight (out, in), without the adapter (unless merged in place)."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        bound = 1 / math.sqrt(self.in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
        fresh = torch.empty(self.lora_A.shape, dtype=torch.float32, device=generator.device if generator else None)
        self.lora_A.copy_(fresh.uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()

    def add_adapter_output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + scale * dropout(x) A^T B^T: y (..., out) the base's output, x (..., in); in y's dtype.
        The second matmul takes the scale and the sum in its epilogue (addmm), so the adapter costs two GEMMs and
        no elementwise pass over y, forward or backward: with nine targets per layer those passes were a large
        share of a training step's kernel launches."""
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # no-ops when the dtypes agree
        h = F.linear(self.lora_dropout(x), a)                                        # (..., r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scale)
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in float32 (out, in): what merging adds to the base weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base's dense weight with the adapter folded in (added in fp32, stored in the base dtype)."""
        if self.merged:
            return self.base_weight()
        return (self.base_weight().float() + self.delta_weight()).to(self.base_dtype)

    def _adapter_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, rslora={self.rslora}, dropout={self.dropout_p:g}"


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear plus a low-rank update. Shapes: x (..., in) -> (..., out); lora_A (r, in), lora_B (out, r)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapter(r=r, alpha=alpha, dropout=dropout, rslora=rslora, device=device, dtype=dtype)

    def _adopt_base(self, base: nn.Linear) -> None:
        self.weight, self.bias = base.weight, base.bias

    @property
    def base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def base_weight(self) -> torch.Tensor:
        return self.weight.detach()

    def lora_parts(self) -> LoRAParts | None:
        """The tensors lora_autograd's functions take, or None where this layer keeps its plain expression (merged,
        or dropout on the adapter's input in training)."""
        if self.merged or (self.dropout_p > 0.0 and self.training):
            return None
        return LoRAParts(self.weight, self.bias, self.lora_A, self.lora_B, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.lora_parts()
        if parts is not None:
            # autograd functions whose backward accumulates the adapter's input gradient into the base's
            return lora_group(x, [parts])[0]
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return self.add_adapter_output(F.linear(x, self.weight, self.bias), x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scale * B A into the base weight (computed in fp32), and stop applying the adapter."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._adapter_repr()}"


class LoRALinear4bit(LoRALayer, Linear4bit):
    """A 4-bit NF4 base linear (quant.Linear4bit) plus a low-rank update in 16/32 bits: QLoRA's layer.
    Shapes as LoRALinear. The 4-bit weight never changes; merging produces a dense layer (merge_and_unload)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, r: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._add_adapter(r=r, alpha=alpha, dropout=dropout, rslora=rslora, device=device, dtype=dtype)

    def _adopt_base(self, base: Linear4bit) -> None:
        self.weight, self.bias, self.quant_state = base.weight, base.bias, base.quant_state

    @property
    def base_dtype(self) -> torch.dtype:
        return self.compute_dtype

    def base_weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def lora_parts(self) -> LoRAParts | None:
        """The tensors lora_autograd's functions take (the NF4 codes and their quant state: each product
        dequantizes the weight just before it runs), in training without dropout on the adapter's input; else None.
        Outside training the layer keeps bitsandbytes' matmul, whose few-row (decoding) kernel reads the 4-bit codes
        directly instead of dequantizing the whole weight for each step."""
        if not self.training or self.dropout_p > 0.0:
            return None
        return LoRAParts(self.weight, self.bias, self.lora_A, self.lora_B, self.scale, quant_state=self.quant_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.lora_parts()
        if parts is not None:
            return lora_group(x, [parts])[0]
        return self.add_adapter_output(Linear4bit.forward(self, x), x)

    def extra_repr(self) -> str:
        return f"{Linear4bit.extra_repr(self)}, {self._adapter_repr()}"


def is_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can sit on (dense or 4-bit, with or without an adapter already)."""
    return isinstance(module, (nn.Linear, Linear4bit))


def _adapter_class(module: nn.Module | None):
    """The LoRA class for a bare base layer, or None when `module` is not one."""
    return {nn.Linear: LoRALinear, Linear4bit: LoRALinear4bit}.get(type(module))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of the model by module name (e.g. 'model.layers.0.self_attn.q_proj')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALayer) for m in model.modules())


def add_lora(model: nn.Module, modules: dict[str, tuple[int, float]], *, dropout: float = 0.0,
             rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the named linear modules ({module name: (r, alpha)}: nn.Linear, or 4-bit quant.Linear4bit) in LoRA
    layers and freeze everything but the adapters. A name that is not such a layer of the model is an error naming
    it."""
    found = dict(model.named_modules())
    for name in modules:
        module = found.get(name)
        if isinstance(module, LoRALayer):
            raise ValueError(f"{name} already has a LoRA adapter; merge it first or start from a fresh base model")
        if _adapter_class(module) is None:
            kind = "no such module" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise ValueError(f"cannot put a LoRA adapter on {name!r}: {kind}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (r, alpha) in modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        setattr(parent, attr, _adapter_class(base).from_linear(base, r=r, alpha=alpha, dropout=dropout,
                                                                rslora=rslora, adapter_dtype=adapter_dtype))
    return model


def apply_lora(model: nn.Module, *, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets=ALL_TARGETS, rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Put a LoRA layer on every linear (dense or 4-bit) whose attribute name is in `targets`, freeze everything
    else. Returns the model (changed in place)."""
    if isinstance(targets, str):
        targets = (targets,)
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them (merge_and_unload) or start from a "
                         "fresh base model")
    names = [name for name, m in model.named_modules()
             if name.rpartition(".")[2] in targets and _adapter_class(m) is not None]
    if not names:
        raise ValueError(f"no linear layer named {', '.join(targets)} in the model")
    return add_lora(model, {name: (r, alpha) for name in names}, dropout=dropout, rslora=rslora,
                    adapter_dtype=adapter_dtype)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def lora_targets(model: nn.Module) -> list[str]:
    """The attribute names that carry adapters (e.g. ['in_proj', 'q_proj']), sorted."""
    return sorted({name.rpartition(".")[2] for name in lora_layers(model)})


def _dense_state_dict(model: nn.Module, device, *, fold: bool) -> dict[str, torch.Tensor]:
    """The model's state dict as a plain checkpoint holds it: no LoRA tensors, 4-bit weights dequantized, adapters
    folded in when `fold`. Each dense weight is made and moved to `device` one at a time (a 4-bit model on the GPU
    never has all of its weights there in 16 bits)."""
    layers = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (LoRALayer, Linear4bit))}
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        layer = layers.get(key)
        if isinstance(layer, LoRALayer):
            tensor = layer.merged_weight() if fold else layer.base_weight()
        elif layer is not None:
            tensor = layer.dequantized_weight()
        out[key] = tensor.detach().to(device)
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module, device="cpu") -> dict[str, torch.Tensor]:
    """The state dict of the model with every adapter folded into its base weight (in fp32, stored in the base
    dtype; a 4-bit base is dequantized first) and no LoRA tensors: a plain checkpoint's tensors, on `device`. The
    model is left unchanged."""
    return _dense_state_dict(model, device, fold=True)


@torch.no_grad()
def base_state_dict(model: nn.Module, device="cpu") -> dict[str, torch.Tensor]:
    """The base model's tensors as a plain checkpoint holds them: adapters left out (not folded in), 4-bit weights
    dequantized, on `device`. The model is left unchanged."""
    return _dense_state_dict(model, device, fold=False)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put a plain nn.Linear back, in place (on a 4-bit base: the
    dequantized weight plus the adapter, a dense layer in the compute dtype). Returns the model. 4-bit layers
    without an adapter stay 4-bit (quant.dequantize turns them dense)."""
    for name, layer in lora_layers(model).items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if isinstance(layer, LoRALinear):
            layer.merge()
            plain.weight = layer.weight
        else:
            plain.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        plain.bias = layer.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    return model
