"""The notebook API: load, add LoRA, train, save, merge, in the shape Unsloth users know.

    from gyrfalcon.api import from_pretrained, get_peft_model, Trainer

    model, tokenizer = from_pretrained("tiiuae/Falcon-H1-0.5B-Instruct", max_seq_length=2048)
    model = get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none")   # all 9 targets
    trainer = Trainer(model, tokenizer, train_dataset="chat.jsonl", max_steps=200, learning_rate=2e-4)
    result = trainer.train()                  # result.losses, result.eval_loss, result.output_dir
    model.save_pretrained("my-adapter")       # PEFT adapter folder
    model.save_pretrained_merged("my-model", tokenizer)    # Hugging Face checkpoint, adapters folded in

QLoRA: `from_pretrained(name, load_in_4bit=True)` loads the base with its decoder layers' linears in 4-bit NF4
(gyrfalcon.quant); get_peft_model, Trainer and save_pretrained then work as above (the adapter folder records its
4-bit base, so that `merge` folds it into the dequantized 4-bit weights), and save_pretrained_merged folds the adapters
into the dequantized 4-bit weights.

`from_pretrained()` with no name gives the built-in tiny model (random init) and its tokenizer; a folder holding an
adapter loads its base model and the adapter. `Trainer(...)` takes the dataset as a file, a hub name, a list of
dicts or a `datasets.Dataset`, and any setting of gyrfalcon.recipes.FinetuneConfig as a keyword. Full fine-tuning:
skip get_peft_model (every weight then trains). `finetune(config)` is the whole pipeline the CLI runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from .checkpoint import (HUB_ID, CheckpointError, default_device, default_dtype, load_config, load_model,
                         resolve_checkpoint, save_model)
from .config import FalconH1Config
from .data import DataError, Fields, PreparedData, check_source, prepare_data
from .lora import (ALL_TARGETS, apply_lora, base_state_dict, has_lora, lora_layers, lora_targets, merge_and_unload,
                   merged_state_dict)
from .model import FalconH1ForCausalLM
from .peft_io import (TRAINING_INFO, adapter_base, atomic_folder, base_was_4bit, load_adapter, local_adapter,
                      read_adapter_config, resolve_adapter, save_adapter, targets_out_proj, tokenizer_source)
from .quant import QLoRAUnavailable, bitsandbytes_module, count_parameters, dequantize, is_quantized, load_4bit
from .recipes import FinetuneConfig, RecipeError, load_recipe
from .train import TrainingLoop, TrainResult, check_output, require_8bit_optimizer

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Hugging Face TrainingArguments names a notebook user may reach for, and gyrfalcon's name for each.
_HF_NAMES = {"per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
             "num_train_epochs": "epochs", "lr_scheduler_type": "lr_schedule", "optim": "optimizer",
             "logging_steps": "log_every", "save_steps": "save_every", "eval_steps": "eval_every",
             "output_dir": "output", "warmup_steps": "warmup_steps", "dataset_text_field": "text_field",
             "max_grad_norm": "max_grad_norm", "save_total_limit": "keep_checkpoints"}


# ---------------------------------------------------------------------------------------------- loading
def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return default_device()
    try:
        device = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"device {device!r} is not a device: use cpu, cuda or cuda:N (or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device {device} asked for, but no CUDA GPU is visible; use device cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_dtype(device)
    if dtype not in _DTYPES:
        raise RecipeError(f"dtype must be auto, {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_tokenizer(name_or_path, *, revision: str | None = None, token: str | None = None):
    """The tokenizer of a checkpoint folder or hub id; the built-in tiny model's for None / 'tiny'."""
    if name_or_path in (None, "", "tiny"):
        from .assets import load_tiny_tokenizer
        return load_tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, token=token)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not load a tokenizer from {name_or_path!r} ({type(err).__name__}: {err}); "
                              "pass tokenizer=<folder or hub id> (CLI: --tokenizer)") from None


def _name_for_adapter(name) -> str | None:
    """What adapter_config.json records as the base: the hub id, or a local folder's absolute path."""
    if name in (None, "", "tiny"):
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def load_base_model(name, *, dtype=None, device=None, load_in_4bit: bool = False, seed: int = 0,
                    revision: str | None = None, token: str | None = None) -> FalconH1ForCausalLM:
    """A checkpoint (folder or hub id), or the built-in tiny model with random weights (None / 'tiny').
    load_in_4bit: the decoder layers' linears in 4-bit NF4 (QLoRA; quant.load_4bit), the rest in `dtype`."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if load_in_4bit:
        model = load_4bit(name, device=device, compute_dtype=dtype, seed=seed, revision=revision, token=token)
    elif name in (None, "", "tiny"):
        model = FalconH1ForCausalLM.from_config(FalconH1Config.from_preset("tiny"), dtype=dtype, device=device,
                                                seed=seed)
    else:
        model = load_model(FalconH1ForCausalLM, name, dtype=dtype, device=device, revision=revision, token=token)
    model.name_or_path = _name_for_adapter(name)  # read back when an adapter records its base
    return model


def from_pretrained(model_name: str | None = None, *, max_seq_length: int = 2048, load_in_4bit: bool = False,
                    dtype=None, device=None, token: str | None = None, revision: str | None = None,
                    seed: int = 0):
    """(model, tokenizer). model_name: a checkpoint folder or hub id; None: the built-in tiny model (random init);
    an adapter folder: its base model (from adapter_config.json) with the adapter attached (a LoraModel); an adapter
    trained with QLoRA runs on the 4-bit base it was trained on only with load_in_4bit=True (a note says so).
    max_seq_length becomes the tokenizer's model_max_length, which Trainer uses as its default.
    load_in_4bit: QLoRA's base, the decoder layers' linears in 4-bit NF4 (needs bitsandbytes; a CUDA GPU for real
    models, the CPU works for the tiny one); dtype is then the compute dtype of everything else."""
    adapter = local_adapter(model_name)
    if adapter is not None:
        model_name = adapter_base(adapter)
        if not model_name:
            raise CheckpointError(f"{adapter}: adapter_config.json names no base model; load the base with "
                                  "from_pretrained(base) and then load_adapter(model, folder)")
    model = load_base_model(model_name, dtype=dtype, device=device, load_in_4bit=load_in_4bit, seed=seed,
                            revision=revision, token=token)
    tokenizer = load_tokenizer(tokenizer_source(adapter, model_name), revision=revision, token=token)
    tokenizer.model_max_length = max_seq_length
    if adapter is not None:
        if base_was_4bit(adapter) and not load_in_4bit:
            print(f"note: {adapter} was trained on a 4-bit (QLoRA) base; it is attached to the dense base here, "
                  "which computes slightly different outputs: pass load_in_4bit=True for the model it was trained as")
        load_adapter(model, adapter, trainable=True, adapter_dtype=_adapter_dtype(model))
        return LoraModel(model, base_model_name_or_path=model.name_or_path), tokenizer
    return model, tokenizer


def _adapter_dtype(model) -> torch.dtype:
    """Adapters in float32 on a half-precision base: AdamW's small updates would round away in bf16."""
    return torch.float32 if model.dtype in (torch.bfloat16, torch.float16) else model.dtype


# ---------------------------------------------------------------------------------------------- LoRA
class LoraModel(nn.Module):
    """A FalconH1ForCausalLM with LoRA adapters. It calls like the model; save_pretrained writes the adapter (PEFT
    format), save_pretrained_merged a Hugging Face checkpoint with the adapters folded in."""

    def __init__(self, model: FalconH1ForCausalLM, *, base_model_name_or_path: str | None = None):
        super().__init__()
        if not has_lora(model):
            raise ValueError("LoraModel wraps a model with LoRA layers; use get_peft_model(model, ...)")
        self.base_model = model
        self.base_model_name_or_path = base_model_name_or_path

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    @property
    def config(self) -> FalconH1Config:
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.dtype

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)
        return trainable, count_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, directory, tokenizer=None, *, overwrite: bool = False) -> Path:
        """Write the adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors), atomically, with
        gyrfalcon_training.json recording whether the base is 4-bit (merge reads it)."""
        path = save_adapter(self.base_model, directory, base_model_name_or_path=self.base_model_name_or_path,
                            tokenizer=tokenizer, overwrite=overwrite)
        if self.base_model_name_or_path is None:
            print(f"note: {path} names no base model (a random-init one): keep the base too "
                  "(model.base_model.save_pretrained) to load the adapter later")
        if targets_out_proj(self.base_model):
            print(f"note: {path} has adapters on the Mamba out_proj: gyrfalcon loads it, PEFT refuses those "
                  "layers on Falcon-H1 (save_pretrained_merged gives a checkpoint every tool loads)")
        return path

    def save_pretrained_merged(self, directory, tokenizer=None, save_method: str = "merged_16bit", *,
                               overwrite: bool = False, max_shard_size: int | str = "5GB") -> Path:
        """Write a Hugging Face checkpoint with every adapter folded into its base weight; the model in memory is
        left as it is (the merged copy is built on the CPU). On a 4-bit base (QLoRA), the adapters are folded into
        the dequantized 4-bit weights they were trained on. save_method: Unsloth's name for what is written; only
        "merged_16bit" (a dense checkpoint in the model's dtype) is gyrfalcon's, other values are refused with
        what to call instead."""
        _check_save_method(save_method)
        if is_quantized(self.base_model):
            print(f"note: {directory}: adapters merged onto the dequantized 4-bit (NF4) base weights they were trained "
                  "on; the checkpoint carries the 4-bit rounding of the base")
        return save_merged(self.base_model, directory, tokenizer=tokenizer, overwrite=overwrite,
                           max_shard_size=max_shard_size)

    def merge_and_unload(self) -> FalconH1ForCausalLM:
        """Fold the adapters into the base weights in place and return the plain model."""
        return merge_and_unload(self.base_model)


# Unsloth's save_method values that gyrfalcon does not write, and what to do instead.
_OTHER_SAVE_METHODS = {
    "lora": "it writes the adapter alone, which is model.save_pretrained(directory, tokenizer)",
    "merged_4bit": "gyrfalcon writes merged checkpoints dense (save_method='merged_16bit'); to run one in 4 bits, "
                   "load it with from_pretrained(folder, load_in_4bit=True)",
}
_OTHER_SAVE_METHODS["merged_4bit_forced"] = _OTHER_SAVE_METHODS["merged_4bit"]


def _check_save_method(save_method: str) -> None:
    if save_method == "merged_16bit":
        return
    if save_method in _OTHER_SAVE_METHODS:
        raise ValueError(f"save_method={save_method!r} is not supported by save_pretrained_merged: "
                         f"{_OTHER_SAVE_METHODS[save_method]}")
    raise ValueError(f"save_method must be 'merged_16bit' (a dense Hugging Face checkpoint), got {save_method!r}; "
                     "for the adapter alone use model.save_pretrained(directory)")


def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: float = 16, lora_dropout: float = 0.0,
                   bias: str = "none", use_rslora: bool = False, random_state: int | None = None,
                   use_gradient_checkpointing: bool = False, adapter_dtype: torch.dtype | None = None,
                   loftq_config=None) -> LoraModel:
    """Attach LoRA adapters (default targets: all 9 linear kinds, the Mamba out_proj included) and freeze the
    base. random_state seeds the adapters' init. Adapters are float32 on a bf16/fp16 base unless adapter_dtype.
    use_gradient_checkpointing: any true value (Unsloth's "unsloth" included) recomputes layers in the backward."""
    if bias != "none":
        raise ValueError(f"bias={bias!r}: gyrfalcon's adapters train no biases; use bias='none'")
    if loftq_config:
        raise ValueError("LoftQ initialisation is not supported; leave loftq_config None")
    if isinstance(model, LoraModel):
        raise ValueError("the model already has LoRA adapters")
    targets = ALL_TARGETS if target_modules in (None, "all", "all-linear") else tuple(target_modules)
    if random_state is not None:
        torch.manual_seed(random_state)
    apply_lora(model, r=r, alpha=lora_alpha, dropout=lora_dropout, targets=targets, rslora=use_rslora,
               adapter_dtype=adapter_dtype or _adapter_dtype(model))
    model.enable_gradient_checkpointing(bool(use_gradient_checkpointing))
    return LoraModel(model, base_model_name_or_path=getattr(model, "name_or_path", None))


def _plain_model(config: FalconH1Config, state: dict) -> FalconH1ForCausalLM:
    with torch.device("meta"):
        model = FalconH1ForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model


def save_merged(model, directory, *, tokenizer=None, overwrite: bool = False,
                max_shard_size: int | str = "5GB") -> Path:
    """A Hugging Face checkpoint of `model` with its adapters folded in (a copy; `model` is unchanged). 4-bit
    weights are written dequantized (the adapters folded into them)."""
    base = model.base_model if isinstance(model, LoraModel) else model
    dense = has_lora(base) or is_quantized(base)
    plain = _plain_model(base.config, merged_state_dict(base, device="cpu")) if dense else base
    directory = Path(directory).expanduser()
    with atomic_folder(directory, overwrite=overwrite) as tmp:
        save_model(plain, tmp, overwrite=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return directory


# ---------------------------------------------------------------------------------------------- training
def _check_settings(settings: dict) -> None:
    for key in settings:
        if key in _HF_NAMES and _HF_NAMES[key] != key:
            raise TypeError(f"{key}: gyrfalcon calls this setting {_HF_NAMES[key]!r}")


class Trainer:
    """Train a model (a LoraModel, or a plain model: full fine-tuning) on a dataset; settings are those of
    FinetuneConfig, given as keywords (max_steps=..., learning_rate=..., batch_size=..., ...)."""

    def __init__(self, model, tokenizer, train_dataset, eval_dataset=None, *, callbacks=(),
                 console: Console | None = None, **settings):
        _check_settings(settings)
        self.lora = isinstance(model, LoraModel) or has_lora(model)
        self.wrapper = model if isinstance(model, LoraModel) else None
        self.model = model.base_model if isinstance(model, LoraModel) else model
        quantized = is_quantized(self.model)
        if quantized and not self.lora:
            raise RecipeError("a 4-bit (QLoRA) base trains LoRA adapters only: call get_peft_model(model, ...) "
                              "first, or load the model without load_in_4bit for full fine-tuning")
        if not self.lora:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.tokenizer, self.callbacks = tokenizer, callbacks
        self.console = console or Console(soft_wrap=True)
        settings.setdefault("max_seq_length", _tokenizer_length(tokenizer))
        if not self.lora and settings.get("method", "full") != "full":
            raise RecipeError("the model has no LoRA adapters: call get_peft_model first, or use method='full'")
        settings["method"] = ("qlora" if quantized else "lora") if self.lora else "full"
        self.base_name = (model.base_model_name_or_path if isinstance(model, LoraModel)
                          else getattr(self.model, "name_or_path", None))
        settings.setdefault("model", self.base_name)
        settings.setdefault("output", _default_output(self.base_name, settings["method"]))
        # Checkpointing settings given here are applied when training starts; those not given keep the model's
        # state (get_peft_model(use_gradient_checkpointing=True) sets it), so the config and run.json say what ran.
        self.checkpointing_given = {key for key in _CHECKPOINTING if key in settings}
        enabled, offload = _checkpointing_state(self.model)
        settings.setdefault("gradient_checkpointing", enabled)
        # offloading works on checkpointed layers: checkpointing turned off here turns it off too
        settings.setdefault("offload_activations", offload and bool(settings["gradient_checkpointing"]))
        self.config = FinetuneConfig(**settings)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.data: PreparedData | None = None

    def train(self) -> TrainResult:
        cfg = self._apply_checkpointing()
        checkpoint = check_output(cfg.output, resume=cfg.resume, overwrite=cfg.overwrite)
        self.data = prepare_run_data(cfg, self.tokenizer, self.train_dataset, self.eval_dataset, self.console)
        result = run_training(self.model, self.tokenizer, self.data, cfg, checkpoint=checkpoint,
                              base_name=self.base_name, callbacks=self.callbacks, console=self.console)
        if self.wrapper is not None and self.wrapper.base_model_name_or_path is None:
            self.wrapper.base_model_name_or_path = result.base_model  # a random-init base, saved by the run
        return result

    def _apply_checkpointing(self) -> FinetuneConfig:
        """Turn gradient checkpointing / activation offload on or off as given to the Trainer; where neither was
        given, the config takes the model's state as it is now (it may have changed since __init__)."""
        cfg = self.config
        if self.checkpointing_given:
            self.model.enable_gradient_checkpointing(cfg.gradient_checkpointing, offload=cfg.offload_activations)
        else:
            enabled, offload = _checkpointing_state(self.model)
            if (enabled, offload) != (cfg.gradient_checkpointing, cfg.offload_activations):
                cfg = cfg.replace(gradient_checkpointing=enabled, offload_activations=offload)
        self.config = cfg
        return cfg


_CHECKPOINTING = ("gradient_checkpointing", "offload_activations")


def _checkpointing_state(model: FalconH1ForCausalLM) -> tuple[bool, bool]:
    """(gradient checkpointing on, saved layer inputs offloaded) as the model is set now."""
    return bool(model.model.gradient_checkpointing), bool(model.model.offload_checkpoints)


def train(model, tokenizer, train_dataset, eval_dataset=None, **settings) -> TrainResult:
    """Trainer(model, tokenizer, train_dataset, eval_dataset, **settings).train()"""
    return Trainer(model, tokenizer, train_dataset, eval_dataset, **settings).train()


def _tokenizer_length(tokenizer) -> int:
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if isinstance(length, int) and 2 <= length <= 1_000_000 else 2048


def _default_output(model_name, method: str) -> str:
    name = Path(str(model_name)).name if model_name else "tiny"
    return str(Path("runs") / f"{name}-{method}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_data(cfg: FinetuneConfig, tokenizer, train_source, eval_source, console: Console) -> PreparedData:
    fields = Fields(cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field)
    data = prepare_data(train_source, tokenizer, eval_source=eval_source, eval_split=cfg.eval_split,
                        data_format=cfg.data_format, fields=fields, max_seq_length=cfg.max_seq_length,
                        packing=cfg.packing, train_on_prompt=cfg.train_on_prompt, bad_rows=cfg.bad_rows,
                        split=cfg.data_split, eval_data_split=cfg.eval_data_split, seed=cfg.seed)
    console.print(f"train data: {data.train_stats.summary()}", markup=False)
    if data.eval_stats:
        console.print(f"eval data: {data.eval_stats.summary()}", markup=False)
    return data


def run_training(model: FalconH1ForCausalLM, tokenizer, data: PreparedData, cfg: FinetuneConfig, *, checkpoint,
                 base_name, callbacks=(), console: Console) -> TrainResult:
    """Set up the loop (saving a random-init base beside the adapter, which needs it) and run it."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.config.pad_token_id or 0)
    info = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
            "versions": _versions()}
    if is_quantized(model):
        info["base_weights"] = "decoder linears in 4-bit NF4 (double quantization, blocks of 64)"
    lora = has_lora(model)
    loop = TrainingLoop(model, data, cfg, output_dir=cfg.output, tokenizer=tokenizer, base_model_name=base_name,
                        pad_id=pad_id, resume_from=checkpoint, callbacks=callbacks, console=console, run_info=info)
    loop.prepare_output()
    if lora and base_name is None:
        # A random-init base exists nowhere else: keep it, and point the adapter at it. A 4-bit one is kept
        # dequantized: quantizing those weights again gives the same NF4 codes (the block scales may differ in
        # their last bits, through the 8-bit double quantization).
        base_dir = Path(cfg.output) / "base"
        if not base_dir.exists():
            _save_unmerged_base(model, base_dir)
            tokenizer.save_pretrained(str(base_dir))  # a complete checkpoint: generate/chat --model base work
        loop.base_model_name = str(base_dir.resolve())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = (f"LoRA on {', '.join(lora_targets(model))}" if lora else "full fine-tuning")
    console.print(f"{what}: {trainable:,} trainable parameters; {loop.total} steps of {cfg.grad_accum} x "
                  f"{cfg.batch_size} rows; output {cfg.output}", markup=False)
    result = loop.run()
    _report(result, cfg, lora, console)
    return result


def _save_unmerged_base(model: FalconH1ForCausalLM, directory: Path) -> None:
    save_model(_plain_model(model.config, base_state_dict(model, device="cpu")), directory)


def _versions() -> dict:
    import transformers

    from . import __version__
    return {"gyrfalcon": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _report(result: TrainResult, cfg: FinetuneConfig, lora: bool, console: Console) -> None:
    if result.losses:
        console.print(f"done: {result.steps} steps, train loss {result.losses[0]:.4f} -> "
                      f"{result.losses[-1]:.4f}" + (f", eval loss {result.eval_loss:.4f}"
                                                    if result.eval_loss is not None else ""), markup=False)
    console.print(f"result: {result.result_dir}   metrics: {result.output_dir / 'metrics.jsonl'}", markup=False)
    if lora:
        console.print(f"merge it into a Hugging Face checkpoint: gyrfalcon merge --adapter {result.result_dir} "
                      f"--output {Path(cfg.output) / 'merged'}", markup=False)


# ---------------------------------------------------------------------------------------------- the pipeline
def finetune(config: FinetuneConfig | str | dict | None = None, *, callbacks=(), console: Console | None = None,
             **overrides) -> TrainResult:
    """Run a whole fine-tuning from a FinetuneConfig, a recipe path or a dict of settings (+ keyword overrides):
    check the output folder, load the tokenizer, read the data, load the model, attach LoRA, train, save."""
    console = console or Console(soft_wrap=True)
    if isinstance(config, FinetuneConfig):
        cfg = config.replace(**overrides) if overrides else config
    elif isinstance(config, dict):
        cfg = load_recipe(None, {**config, **overrides})
    else:
        cfg = load_recipe(config, overrides)
    if cfg.output is None:
        if cfg.resume:
            raise RecipeError("resume needs the run folder to continue: pass --output DIR (the one it printed)")
        cfg = cfg.replace(output=_default_output(cfg.model, cfg.method))
    builtin = cfg.uses_builtin_model
    if not builtin and cfg.data is None:
        raise RecipeError("no training data: pass --data FILE_OR_NAME (or set data: in the recipe)")
    for source in (cfg.data, cfg.eval_data):
        if isinstance(source, (str, Path)):
            check_source(source)  # a missing file is named before minutes of loading, not after
    checkpoint = check_output(cfg.output, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.method == "qlora":
        bitsandbytes_module(resolve_device(cfg.device))  # before minutes of loading, not after
    if cfg.optimizer == "adamw_8bit":
        require_8bit_optimizer(resolve_device(cfg.device))  # before minutes of loading, not after
    # The tokenizer and the data first: a malformed row or a hub dataset that cannot load is reported in seconds,
    # not after minutes of loading the weights.
    if not builtin:
        _check_model_source(cfg.model, revision=cfg.revision)
    tokenizer = load_tokenizer(cfg.tokenizer or (None if builtin else cfg.model), revision=cfg.revision)
    data_source = cfg.data
    if data_source is None:
        from .assets import TINY_CHAT_DATA
        data_source = TINY_CHAT_DATA
    data = prepare_run_data(cfg, tokenizer, data_source, cfg.eval_data, console)
    model = load_base_model(None if builtin else cfg.model, dtype=cfg.dtype, device=cfg.device,
                            load_in_4bit=cfg.method == "qlora", seed=cfg.seed, revision=cfg.revision)
    four_bit = ", decoder linears in 4-bit NF4 (QLoRA)" if is_quantized(model) else ""
    console.print(f"model: {cfg.model or 'built-in tiny Falcon-H1 (random init)'}, {count_parameters(model):,} "
                  f"parameters, {str(model.dtype).removeprefix('torch.')} on {model.device}{four_bit}", markup=False)
    _attach_trainable(model, cfg, console)
    result = run_training(model, tokenizer, data, cfg, checkpoint=checkpoint, base_name=model.name_or_path,
                          callbacks=callbacks, console=console)
    if builtin and cfg.data is None:  # the bundled data's questions: meaningless after training on other data
        show_tiny_answers(model, tokenizer, console)
    return result


def _check_model_source(name: str, *, revision: str | None = None) -> None:
    """Read the model's config alone (a hub id's config.json is downloaded without the weights), so that a mistyped
    model is named as such, not as a tokenizer that cannot load."""
    if Path(name).expanduser().exists() or not HUB_ID.fullmatch(str(name)):
        FalconH1Config.from_pretrained(resolve_checkpoint(name, revision=revision))
    else:
        load_config(str(name), revision=revision)


def _attach_trainable(model: FalconH1ForCausalLM, cfg: FinetuneConfig, console: Console) -> None:
    if cfg.method == "full":
        if cfg.adapter:
            raise RecipeError("adapter is for LoRA runs; with method full, pass the merged model as --model")
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        torch.manual_seed(cfg.seed)  # the adapters' init
        if cfg.adapter:
            load_adapter(model, cfg.adapter, trainable=True, adapter_dtype=_adapter_dtype(model))
            console.print(f"adapter {cfg.adapter} loaded to continue training (its rank, alpha and targets are "
                          "used; the lora_* settings are ignored)", markup=False)
        else:
            apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=tuple(cfg.lora_targets), rslora=cfg.use_rslora, adapter_dtype=_adapter_dtype(model))
    model.enable_gradient_checkpointing(cfg.gradient_checkpointing, offload=cfg.offload_activations)


# ---------------------------------------------------------------------------------------------- merge
def merge(adapter, output, *, model: str | None = None, dtype=None, device="cpu", overwrite: bool = False,
          max_shard_size: int | str = "5GB", base_4bit: bool | None = None, token: str | None = None,
          console: Console | None = None) -> Path:
    """Fold an adapter into its base model and write a Hugging Face checkpoint (with the tokenizer's files).
    model: the base (default: adapter_config.json's base_model_name_or_path); dtype: default the base
    checkpoint's own. A QLoRA adapter is merged onto the dequantized 4-bit weights it was trained on.
    base_4bit: whether the adapter was trained on a 4-bit base (QLoRA); None: as the adapter's
    gyrfalcon_training.json records it, a dense base where it records nothing. The console says which it used."""
    console = console or Console(soft_wrap=True)
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output} already exists; choose a new folder, or pass --overwrite to replace it")
    folder = resolve_adapter(adapter, token=token)
    config = read_adapter_config(folder)
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{folder}: adapter_config.json names no base model; pass --model BASE")
    recorded = base_was_4bit(folder)
    four_bit = recorded if base_4bit is None else bool(base_4bit)
    device = resolve_device(device)
    if four_bit:
        # Quantized as training quantized it (same weights, same dtype), then made dense again.
        base_model = load_4bit(base, device=device, compute_dtype=_checkpoint_dtype(base, dtype, device), token=token)
        base_model = dequantize(base_model)
    else:
        base_model = load_model(FalconH1ForCausalLM, base, dtype=_checkpoint_dtype(base, dtype, device),
                                device=device, token=token)
    console.print(_merge_base_note(bool(four_bit), recorded, base_4bit), markup=False)
    load_adapter(base_model, folder)
    n_layers = len(lora_layers(base_model))
    merge_and_unload(base_model)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(tokenizer_source(folder, base), token=token)
    except CheckpointError as err:
        console.print(f"note: no tokenizer copied ({err})", markup=False)
    with atomic_folder(output, overwrite=overwrite) as tmp:
        save_model(base_model, tmp, overwrite=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    console.print(f"merged {n_layers} LoRA layers of {folder} into {base}: wrote {output} "
                  f"({str(base_model.dtype).removeprefix('torch.')}); transformers loads it as is", markup=False)
    return output


def _merge_base_note(four_bit: bool, recorded: bool | None, forced: bool | None) -> str:
    """merge's line saying which base it folds the adapter onto, and why."""
    def kind(is_4bit: bool) -> str:
        return "a 4-bit (QLoRA)" if is_4bit else "a dense (LoRA)"

    if forced is not None:
        why = f"as asked: --{'' if forced else 'no-'}base-4bit"
        if recorded is not None and recorded != forced:
            why += f", although its {TRAINING_INFO} records {kind(recorded)} base"
    elif recorded is None:
        why = (f"the adapter has no {TRAINING_INFO} saying how its base was stored; if it was trained with QLoRA, "
               "merge again with --base-4bit (merge(..., base_4bit=True))")
    else:
        why = f"its {TRAINING_INFO} records {kind(recorded)} base"
    if four_bit:
        return (f"merged onto the dequantized 4-bit (NF4) base weights ({why}); the merged checkpoint therefore "
                "carries the 4-bit rounding of the base")
    return f"merged onto the dense (unquantized) base weights ({why})"


def _checkpoint_dtype(base, dtype, device: torch.device) -> torch.dtype:
    """The dtype asked for, else the one the base checkpoint was saved in (so a bf16 model stays bf16)."""
    if dtype not in (None, "auto"):
        return resolve_dtype(dtype, device)
    saved = FalconH1Config.from_pretrained(resolve_checkpoint(base)).extra
    name = saved.get("torch_dtype") or saved.get("dtype")
    return _DTYPES.get(name, torch.float32)


# ---------------------------------------------------------------------------------------------- the tiny demo
@torch.no_grad()
def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 20) -> str:
    """The model's greedy answer to a chat, recomputing the whole sequence per token: fine for the tiny model,
    too slow for real ones (use gyrfalcon's generate there)."""
    model.eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        next_id = model(ids, logits_to_keep=1).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if next_id.item() == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


TINY_QUESTIONS = (("What colour is the snow?", "The snow is white."), ("Count to five.", "1 2 3 4 5."),
                  ("Spell 'bread' backwards.", "'bread' backwards is 'daerb'."),
                  ("What is 7 plus 8?", "7 plus 8 is 15."))


def show_tiny_answers(model, tokenizer, console: Console) -> list[tuple[str, str]]:
    """After the tiny run: the fine-tuned model answers a few questions of the kind it was trained on."""
    answers = []
    console.print("the fine-tuned tiny model answers (greedy):", markup=False)
    for question, expected in TINY_QUESTIONS:
        answer = greedy_reply(model, tokenizer, [{"role": "user", "content": question}])
        answers.append((question, answer))
        mark = "ok" if answer == expected else f"(expected: {expected})"
        console.print(f"  {question!r} -> {answer!r} {mark}", markup=False)
    return answers


class FastLanguageModel:
    """The same functions under the names Unsloth notebooks use: FastLanguageModel.from_pretrained(...),
    FastLanguageModel.get_peft_model(model, ...), for_inference(model), for_training(model)."""

    from_pretrained = staticmethod(from_pretrained)
    get_peft_model = staticmethod(get_peft_model)

    @staticmethod
    def for_inference(model):
        return model.eval()

    @staticmethod
    def for_training(model):
        return model.train()


__all__ = ["FastLanguageModel", "LoraModel", "QLoRAUnavailable", "Trainer", "TrainResult", "DataError", "finetune",
           "from_pretrained", "get_peft_model", "load_adapter", "merge", "save_merged", "train"]
