"""Fine-tuning recipes: every setting of a run in one flat dataclass, read from YAML, checked, documented.

A run's settings come from three layers, later ones winning: the defaults below, a YAML recipe (`--config`, see
configs/*.yaml), and command-line flags (one per key: `lora_r` is `--lora-r`). Every key carries its help text
here, which is also what `gyrfalcon finetune --help` and `--print-config` show.

    config = load_recipe("configs/falcon-h1-0.5b-lora.yaml", overrides={"data": "chat.jsonl", "max_steps": 100})
    config.learning_rate, config.lora_targets
    print(render_recipe(config))       # YAML with a comment on every key
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import BAD_ROWS, FORMATS
from .lora import ALL_TARGETS

METHODS = ("lora", "qlora", "full")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # present in a clone / editable install


class RecipeError(ValueError):
    """A recipe or an override that is not a valid setting; the message names the key and the fix."""


def setting(default, help: str, group: str, choices: tuple | None = None):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default),
                     metadata={"help": help, "group": group, "choices": choices})
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (see each field's help)."""

    # ---- model
    model: str | None = setting(None, "Falcon-H1 checkpoint: a folder or a hub id (e.g. tiiuae/Falcon-H1-0.5B-"
                                      "Instruct). Empty: the built-in tiny model (random init) and its bundled chat "
                                      "data, a CPU run of a minute or two", "model")
    tokenizer: str | None = setting(None, "tokenizer folder or hub id (default: the model's)", "model")
    revision: str | None = setting(None, "hub branch, tag or commit of the model (default: main)", "model")
    method: str = setting("lora", "lora: train adapters on a frozen base; qlora: the same on a 4-bit base (CUDA + "
                                  "bitsandbytes); full: train every weight", "model", METHODS)
    dtype: str = setting("auto", "weights' dtype: auto is bfloat16 on a GPU that has it, else float32", "model",
                         DTYPES)
    device: str = setting("auto", "cpu, cuda or cuda:N (auto: the current GPU if there is one)", "model")
    gradient_checkpointing: bool = setting(False, "recompute each layer in the backward pass: far less activation "
                                                  "memory for about a third more compute", "model")
    offload_activations: bool = setting(False, "with gradient_checkpointing: keep each layer's saved input in "
                                               "host memory until the backward (7B at 128K tokens: 33 GiB off the "
                                               "GPU) at the cost of two host transfers per layer; steps run without "
                                               "CUDA graphs", "model")
    cuda_graphs: bool = setting(True, "on a CUDA GPU, replay each micro-batch's forward and backward from one CUDA "
                                      "graph (the host otherwise launches its 10,000+ kernels one by one); packed "
                                      "rows are then padded to max_seq_length so every batch has one shape. Runs "
                                      "eagerly, saying why, under LoRA dropout or dynamic RoPE", "model")
    # ---- LoRA
    lora_r: int = setting(16, "adapter rank", "lora")
    lora_alpha: float = setting(32.0, "adapter scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) "
                                      "with use_rslora)", "lora")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input, in [0, 1)", "lora")
    lora_targets: list = setting(list(ALL_TARGETS), "linear layers that get adapters: any of " +
                                 " ".join(ALL_TARGETS) + " (or 'all'). PEFT cannot load adapters on the Mamba "
                                 "out_proj; gyrfalcon and merged checkpoints can", "lora")
    use_rslora: bool = setting(False, "rank-stabilised LoRA: scale alpha / sqrt(r)", "lora")
    adapter: str | None = setting(None, "start from this adapter (PEFT folder or hub id) instead of a fresh one",
                                  "lora")
    # ---- data
    data: str | None = setting(None, "training data: a .jsonl/.json/.csv/.tsv/.parquet file or a hub dataset name "
                                     "(needs `pip install datasets`)", "data")
    data_split: str = setting("train", "split of a hub dataset", "data")
    data_format: str = setting("auto", "auto (from the first row's keys), text, prompt_completion or chat", "data",
                               FORMATS)
    text_field: str = setting("text", "column of the text format", "data")
    prompt_field: str = setting("prompt", "prompt column of the prompt_completion format", "data")
    completion_field: str = setting("completion", "completion column of the prompt_completion format", "data")
    messages_field: str = setting("messages", "column of chat messages (role/content)", "data")
    eval_data: str | None = setting(None, "evaluation data (same forms as data); or use eval_split", "data")
    eval_data_split: str | None = setting(None, "split of a hub eval_data (default: data_split)", "data")
    eval_split: float = setting(0.0, "hold out this share (< 1) or number (>= 1) of the training examples for "
                                     "evaluation (seeded)", "data")
    max_seq_length: int = setting(2048, "tokens per row: longer examples are cut (and counted)", "data")
    packing: bool = setting(True, "pack several examples per row; documents never see each other (attention, conv "
                                  "and scan all reset at each boundary)", "data")
    train_on_prompt: bool = setting(False, "take the loss on prompts and user turns too (default: responses only)",
                                    "data")
    bad_rows: str = setting("error", "a malformed row stops the run naming the row (error), or is skipped and "
                                     "counted (skip)", "data", BAD_ROWS)
    # ---- training
    epochs: float = setting(1.0, "passes over the training data (ignored when max_steps > 0)", "train")
    max_steps: int = setting(0, "optimizer steps to run; 0: as many as epochs take", "train")
    batch_size: int = setting(8, "rows per micro-batch", "train")
    grad_accum: int = setting(1, "micro-batches per optimizer step (the loss is averaged over all their tokens)",
                              "train")
    learning_rate: float = setting(2e-4, "peak learning rate", "train")
    lr_schedule: str = setting("cosine", "decay after warm-up: cosine, linear or constant", "train", SCHEDULES)
    warmup_steps: int = setting(0, "linear warm-up steps (0: use warmup_ratio)", "train")
    warmup_ratio: float = setting(0.03, "warm-up as a share of all steps, when warmup_steps is 0", "train")
    min_lr_ratio: float = setting(0.0, "the schedule ends at learning_rate * min_lr_ratio", "train")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay (matrices only; never norms or biases)",
                                  "train")
    adam_beta1: float = setting(0.9, "AdamW beta1", "train")
    adam_beta2: float = setting(0.999, "AdamW beta2", "train")
    adam_eps: float = setting(1e-8, "AdamW epsilon", "train")
    optimizer: str = setting("adamw", "adamw (fused on CUDA) or adamw_8bit (bitsandbytes' 8-bit AdamW)", "train",
                             OPTIMIZERS)
    max_grad_norm: float = setting(1.0, "clip the gradient's global norm to this (0: no clipping)", "train")
    master_weights: bool = setting(True, "keep fp32 copies of bf16/fp16 trained weights (full fine-tuning: 4 bytes "
                                   "per weight) so that small updates are not rounded away", "train")
    seed: int = setting(0, "seed of the adapters' init, data order, held-out split and dropout", "train")
    # ---- output
    output: str | None = setting(None, "run folder (default: runs/<model>-<method>-<date-time>)", "output")
    overwrite: bool = setting(False, "replace an existing run folder (never done otherwise; a folder holding other "
                              "files is refused)", "output")
    resume: bool = setting(False, "continue the run in `output` from its latest checkpoint", "output")
    save_every: int = setting(200, "write a checkpoint every this many steps, and at the end (0: none, except on "
                                     "Ctrl-C or an error)",
                              "output")
    keep_checkpoints: int = setting(2, "checkpoints kept (older ones are deleted; 0: keep all)", "output")
    eval_every: int = setting(0, "evaluate every this many steps (0: at the end only)", "output")
    log_every: int = setting(10, "print a log line every this many steps (every step goes to metrics.jsonl)",
                             "output")
    progress: bool = setting(True, "show the progress bar", "output")
    plot: bool = setting(True, "draw loss.png at the end (needs matplotlib)", "output")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        checks = [
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (self.lora_alpha > 0, "lora_alpha must be positive"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.max_seq_length >= 2, "max_seq_length must be at least 2"),
            (self.gradient_checkpointing or not self.offload_activations,
             "offload_activations needs gradient_checkpointing: true (it offloads the checkpointed layer inputs)"),
            (self.epochs > 0, "epochs must be positive"),
            (self.max_steps >= 0, "max_steps must be 0 (use epochs) or positive"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.warmup_steps >= 0, "warmup_steps must be 0 or positive"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be 0 or positive"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam betas must be in [0, 1)"),
            (self.adam_eps > 0, "adam_eps must be positive"),
            (self.max_grad_norm >= 0, "max_grad_norm must be 0 (no clipping) or positive"),
            (self.eval_split >= 0, "eval_split must be 0, a share below 1, or a count"),
            (self.eval_split < 1 or float(self.eval_split).is_integer(), "eval_split of 1 or more is a count of "
                                                                         "examples: give a whole number"),
            (self.save_every >= 0 and self.keep_checkpoints >= 0 and self.eval_every >= 0, "save_every, "
             "keep_checkpoints and eval_every must be 0 or positive"),
            (self.log_every >= 1, "log_every must be at least 1"),
            (self.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (not (self.resume and self.overwrite), "resume continues the run in `output` and overwrite replaces "
                                                   "it: choose one"),
        ]
        names = {f.name for f in dataclasses.fields(self)}
        for ok, message in checks:
            if not ok:
                name = message.split()[0]
                if name in names and "got" not in message:  # say what was given and where it is set
                    message += (f" (got {getattr(self, name)!r}; recipe key {name}, flag "
                                f"--{name.replace('_', '-')})")
                raise RecipeError(message)
        unknown = [t for t in self.lora_targets if t not in ALL_TARGETS]
        if unknown or not self.lora_targets:
            raise RecipeError(f"lora_targets: unknown layer(s) {unknown}; choose from {', '.join(ALL_TARGETS)} "
                              "or 'all'")

    @property
    def uses_builtin_model(self) -> bool:
        return self.model in (None, "", "tiny")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "FinetuneConfig":
        return FinetuneConfig(**{**self.to_dict(), **changes})


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(FinetuneConfig))


def base_type(f: dataclasses.Field):
    """(the field's type without None, whether None is allowed)."""
    hint = typing.get_type_hints(FinetuneConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return (args[0] if optional and args else hint), optional


def _coerce(f: dataclasses.Field, value):
    """Check one value against its field's type (and choices); YAML's '2e-4' strings become floats."""
    kind, optional = base_type(f)
    name = f.name
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise RecipeError(f"{name} needs a value ({f.metadata['help']})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise RecipeError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and
                                                                      re.fullmatch(r"-?\d+", value.strip()))):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise RecipeError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{name} must be a number, got {value!r}") from None
    if kind is list:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{name} must be a list of names, got {value!r}")
        if list(value) == ["all"]:
            return list(ALL_TARGETS)
        return list(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise RecipeError(f"{name} must be a string, got {value!r}")
    value = str(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise RecipeError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_keys(data: dict, source: str) -> None:
    known = [f.name for f in config_fields()]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise RecipeError(f"{source}: unknown key {key!r}{hint}")


def find_recipe(name_or_path) -> Path:
    """A recipe file path, or the name of one in the repository's configs/ folder (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / str(name_or_path), CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    listing = (f"; recipes in {CONFIG_DIR}: {', '.join(available)}" if available else
               "; the named recipes live in the repository's configs/ folder, which this installation does not "
               "have: pass the path of a recipe file (e.g. a copy of configs/falcon-h1-0.5b-lora.yaml)")
    raise RecipeError(f"{name_or_path}: no such recipe file{listing}")


def read_recipe(path) -> dict:
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of key: value lines, got {type(data).__name__}")
    check_keys(data, str(path))
    return data


def load_recipe(path=None, overrides: dict | None = None) -> FinetuneConfig:
    """Defaults < the recipe file (if any) < overrides (None values in overrides are ignored). With no model, the
    built-in tiny run's defaults (TINY_RUN) replace the general ones (its evaluation split only on its own data)."""
    values = read_recipe(path) if path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_keys(overrides, "override")
    values.update(overrides)
    if values.get("model") in (None, "", "tiny"):
        tiny = dict(TINY_RUN)
        if values.get("data"):  # the evaluation split counts examples of the bundled data: not for the user's own
            tiny.pop("eval_split")
            tiny.pop("eval_every")
        values = {**tiny, **values}  # the built-in tiny run's own defaults, under anything given
    source = str(path) if path else "settings"
    try:
        return FinetuneConfig(**values)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None


def render_recipe(config: FinetuneConfig, title: str | None = None) -> str:
    """The config as a YAML recipe with every key's help as a comment, grouped."""
    lines = [f"# {line}" for line in (title or "gyrfalcon fine-tuning recipe").splitlines()]
    lines.append("# Every key is optional; command-line flags (--key-name) override these values.")
    group = None
    for f in config_fields():
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"# ---- {group}"]
        value = getattr(config, f.name)
        if f.name == "lora_targets" and sorted(value) == sorted(ALL_TARGETS):
            text = "all"
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"] + (f" [{' | '.join(choices)}]" if choices else "")
        lines.append(f"{f.name}: {text}  # {help_text}")
    return "\n".join(lines) + "\n"


# The built-in tiny run (`gyrfalcon finetune` with no model): values that make the random-init tiny model learn
# its bundled chat data visibly within a minute on 2 CPU cores. A LoRA adapter on a random-init base barely moves the
# loss, so this run trains every weight (method full), in float32 also on a GPU (bf16 weights would round away
# its updates).
TINY_RUN = {
    "method": "full", "dtype": "float32", "max_seq_length": 256, "batch_size": 8, "learning_rate": 3e-2,
    "epochs": 12.0, "warmup_ratio": 0.05, "min_lr_ratio": 0.1, "eval_split": 100, "eval_every": 60, "save_every": 100,
    "log_every": 20,
}
