"""LoRA adapters as files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), where
<module> is the layer's name in the model (`model.layers.0.self_attn.q_proj`); the config holds r, lora_alpha,
lora_dropout, use_rslora, target_modules and base_model_name_or_path as PEFT (0.17+) writes them, so PEFT +
transformers load a gyrfalcon adapter onto the same base and compute the same function, and gyrfalcon loads
adapters written by PEFT (rank_pattern / alpha_pattern and adapters on a subset of layers included).

PEFT refuses adapters on the Mamba `out_proj` of Falcon-H1 models (it lists `out_proj` and `conv1d` as incompatible
with Mamba layers): gyrfalcon writes and reads such adapters, but PEFT cannot load them. `gyrfalcon merge` folds any
adapter into a plain Hugging Face checkpoint that every tool loads.

An adapter trained on a 4-bit base (QLoRA) is written and read the same way: the files hold only the adapter, which
attaches to a dense or a 4-bit base alike. Every adapter folder gyrfalcon writes (save_adapter, a run's checkpoints and
its result) also holds a record, gyrfalcon_training.json (PEFT ignores it), whose `method` says whether the model the
adapter was saved from had a 4-bit base (`qlora`) or a dense one (`lora`), so that `gyrfalcon merge` folds a QLoRA
adapter into the dequantized 4-bit weights it was trained on. Folders without it (older ones, PEFT's) still load.

    save_adapter(model, "out/adapter", base_model_name_or_path="tiiuae/Falcon-H1-0.5B-Instruct")
    load_adapter(base_model, "out/adapter")                    # attaches LoRA layers and loads their weights
    load_adapter(base_model, "out/adapter", trainable=True)    # to continue training it
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import CheckpointError, hub_snapshot
from .checkpoint import atomic_folder as _atomic_folder
from .lora import LoRALayer, add_lora, has_lora, is_linear, lora_layers
from .quant import is_quantized

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_INFO = "gyrfalcon_training.json"  # beside the adapter: how it was trained (merge reads `method`)
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# PEFT features that change the adapter's function in ways gyrfalcon's LoRA layers do not compute.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "lora_bias": "a bias on lora_B", "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QA-LoRA", "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token embeddings", "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
}


class AdapterError(CheckpointError):
    """An adapter folder that cannot be read, written or applied as asked; the message names the problem."""


def atomic_folder(directory, *, overwrite: bool = False):
    """checkpoint.atomic_folder, refusing with AdapterError."""
    return _atomic_folder(directory, overwrite=overwrite, error=AdapterError)


# ---------------------------------------------------------------------------------------------- saving
def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None = None,
                   revision: str | None = None) -> dict:
    """PEFT's adapter_config.json for the model's LoRA layers. The most common rank and alpha become `r` and
    `lora_alpha`; modules that differ are listed in rank_pattern / alpha_pattern (by full module name)."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA adapters to save (apply_lora / get_peft_model first)")
    rslora = {layer.rslora for layer in layers.values()}
    dropout = {layer.dropout_p for layer in layers.values()}
    if len(rslora) > 1 or len(dropout) > 1:
        raise AdapterError("PEFT's format holds one use_rslora and one lora_dropout per adapter; this model's "
                           "LoRA layers mix them")
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    attrs = sorted({name.rpartition(".")[2] for name in layers})
    every = [name for name, m in model.named_modules()
             if name.rpartition(".")[2] in attrs and is_linear(m)]
    # Attribute names when every such layer is adapted (the usual case); the full names when only some are.
    targets = attrs if sorted(every) == sorted(layers) else sorted(layers)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": revision, "inference_mode": True, "r": r, "lora_alpha": _plain_number(alpha),
        "lora_dropout": next(iter(dropout)), "use_rslora": next(iter(rslora)), "target_modules": targets,
        "exclude_modules": None, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {name: layer.r for name, layer in sorted(layers.items()) if layer.r != r},
        "alpha_pattern": {name: _plain_number(layer.alpha) for name, layer in sorted(layers.items())
                          if layer.alpha != alpha},
        "use_dora": False, "lora_bias": False,
    }


def _plain_number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT tensor name: tensor (on the CPU, in the adapter's dtype)} for every LoRA layer."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().to("cpu").contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().to("cpu").contiguous()
    return out


def write_adapter_files(model: nn.Module, folder, *, base_model_name_or_path: str | None = None,
                        revision: str | None = None) -> None:
    """Write the two adapter files into an existing folder (no atomicity: see save_adapter)."""
    folder = Path(folder)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path, revision=revision)
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    record = training_record(model, base_model_name_or_path=base_model_name_or_path)
    (folder / TRAINING_INFO).write_text(json.dumps(record, indent=2) + "\n")


def training_record(model: nn.Module, *, base_model_name_or_path: str | None = None) -> dict:
    """gyrfalcon_training.json for an adapter saved from `model`: `method` qlora where its base is 4-bit NF4 (merge
    then folds the adapter into the dequantized 4-bit weights), lora where it is dense; `base_model` as
    adapter_config.json names it. A run's result folder gets the run's own record, with these keys and more."""
    return {"method": "qlora" if is_quantized(model) else "lora", "base_model": base_model_name_or_path}


def save_adapter(model: nn.Module, directory, *, base_model_name_or_path: str | None = None,
                 revision: str | None = None, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the model's adapters as a PEFT adapter folder (plus the tokenizer's files, if given), atomically;
    an existing folder is replaced only with overwrite=True. Returns the folder."""
    directory = Path(directory).expanduser()
    with atomic_folder(directory, overwrite=overwrite) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path=base_model_name_or_path, revision=revision)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return directory


def targets_out_proj(model: nn.Module) -> bool:
    """True when an adapter sits on a Mamba out_proj (PEFT cannot load those on Falcon-H1)."""
    return any(name.endswith("mamba.out_proj") for name in lora_layers(model))


# ---------------------------------------------------------------------------------------------- reading
def resolve_adapter(path_or_id, *, token: str | None = None, revision: str | None = None) -> Path:
    """A local adapter folder, or the local snapshot of a hub adapter repo."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterError(f"{path} is a file; pass the folder that holds {ADAPTER_CONFIG}")
        if not (path / ADAPTER_CONFIG).exists():
            hint = (" It holds a full model checkpoint (config.json): use it as the model, not as an adapter."
                    if (path / "config.json").exists() else "")
            raise AdapterError(f"{path}: no {ADAPTER_CONFIG}; not a LoRA adapter folder.{hint}")
        return path
    return hub_snapshot(str(path_or_id), patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_INFO], token=token,
                        revision=revision, error=AdapterError, what="adapter ")


def local_adapter(name) -> Path | None:
    """The folder, where `name` is a local LoRA adapter folder (it holds adapter_config.json); else None."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return path if (path / ADAPTER_CONFIG).is_file() else None


def adapter_base(folder) -> str | None:
    """The base model an adapter folder's config names (None where it names none)."""
    return read_adapter_config(folder).get("base_model_name_or_path") or None


def tokenizer_source(folder, base):
    """Where the tokenizer for an adapter on `base` is: the adapter folder where it holds one (training saves it
    there), else the base."""
    return folder if folder is not None and (Path(folder) / "tokenizer_config.json").exists() else base


def base_was_4bit(folder) -> bool | None:
    """What an adapter folder's gyrfalcon_training.json says of the base it was trained on: True for a 4-bit one
    (method qlora), False for a dense one (lora); None where the folder has no such record (PEFT's adapters,
    gyrfalcon's from before the record)."""
    path = Path(folder) / TRAINING_INFO
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    method = record.get("method") if isinstance(record, dict) else None
    return {"qlora": True, "lora": False}.get(method)


def read_adapter_config(folder) -> dict:
    """The adapter's config, checked: a LoRA adapter whose features gyrfalcon computes."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file; not a LoRA adapter folder") from None
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config['peft_type']!r}; gyrfalcon loads LoRA adapters only")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: the adapter uses {what} ({key}: {config[key]!r}), which gyrfalcon does "
                               "not support; merge it with PEFT instead")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias {config['bias']!r}: gyrfalcon adapters train no biases (bias 'none')")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterError(f"{path}: lora_dropout must be in [0, 1), got {dropout!r}")
    return config


def read_adapter_weights(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (lora_A (r, in), lora_B (out, r))} from adapter_model.safetensors (CPU tensors)."""
    folder = Path(folder)
    file = folder / ADAPTER_WEIGHTS
    if not file.exists():
        pickles = sorted(p.name for p in folder.glob("adapter_model.*") if p.suffix != ".safetensors")
        if pickles:
            raise AdapterError(f"{folder}: only pickle adapter weights ({', '.join(pickles)}); gyrfalcon reads "
                               "safetensors only, since unpickling can run arbitrary code. Re-save the adapter "
                               "with PEFT (save_pretrained(safe_serialization=True)).")
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{file}: unreadable safetensors file, truncated or corrupt ({err})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A/B weight of a linear layer (embedding "
                               "adapters, DoRA magnitudes and biases are not supported)")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{file}: {module} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{file}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                               "(r, in) and (out, r)")
        out[module] = (a, b)
    if not out:
        raise AdapterError(f"{file}: holds no LoRA tensors")
    return out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_against_model(folder: Path, model: nn.Module, weights: dict) -> None:
    modules = dict(model.named_modules())
    for name, (a, b) in weights.items():
        module = modules.get(name)
        if not is_linear(module):
            raise AdapterError(f"{folder}: the adapter has weights for {name!r}, which is not a linear layer of "
                               "this model; was it trained on another architecture?")
        if (a.shape[1], b.shape[0]) != (module.in_features, module.out_features):
            raise AdapterError(f"{folder}: {name}: the adapter maps {a.shape[1]} -> {b.shape[0]} features, the "
                               f"model's layer {module.in_features} -> {module.out_features}; the adapter was "
                               "trained on a different base model")


def load_adapter(model: nn.Module, path_or_id, *, trainable: bool = False, adapter_dtype: torch.dtype | None = None,
                 token: str | None = None, revision: str | None = None) -> nn.Module:
    """Attach the adapter in `path_or_id` (a folder or a hub id) to the model's linear layers and load its weights.
    trainable=True leaves the adapter's parameters trainable (to continue training), else everything is frozen.
    adapter_dtype: the adapter's dtype in memory (default: as stored). Returns the model (changed in place)."""
    if has_lora(model):
        raise AdapterError("the model already has LoRA adapters; load the adapter onto a fresh base model (or "
                           "merge the present ones first)")
    folder = resolve_adapter(path_or_id, token=token, revision=revision)
    config = read_adapter_config(folder)
    weights = read_adapter_weights(folder)
    _check_against_model(folder, model, weights)
    modules = {name: (a.shape[0], float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])))
               for name, (a, _) in weights.items()}
    first = next(iter(weights.values()))[0]
    add_lora(model, modules, dropout=float(config.get("lora_dropout", 0.0)),
             rslora=bool(config.get("use_rslora", False)), adapter_dtype=adapter_dtype or first.dtype)
    copy_adapter_weights(model, weights, source=folder)
    for p in (p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)):
        p.requires_grad_(trainable)
    return model


@torch.no_grad()
def copy_adapter_weights(model: nn.Module, weights: dict, *, source="adapter") -> None:
    """Copy {module: (A, B)} into the model's existing LoRA layers; the set of modules and every shape must agree."""
    layers = lora_layers(model)
    missing, unexpected = sorted(set(layers) - set(weights)), sorted(set(weights) - set(layers))
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:4])}" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"unexpected {', '.join(unexpected[:4])}" if unexpected else "")
        raise AdapterError(f"{source}: the adapter's layers do not match the model's LoRA layers ({detail})")
    for name, (a, b) in weights.items():
        layer: LoRALayer = layers[name]
        if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
            raise AdapterError(f"{source}: {name}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, the model's "
                               f"layer holds {list(layer.lora_A.shape)} / {list(layer.lora_B.shape)}")
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
