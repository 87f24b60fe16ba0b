"""`gyrfalcon finetune` and `gyrfalcon merge`: the argparse parsers and their handlers.

    gyrfalcon finetune                                  the built-in tiny model on its bundled chat data (CPU, ~1 min)
    gyrfalcon finetune --model tiiuae/Falcon-H1-0.5B-Instruct --data chat.jsonl --config falcon-h1-0.5b-lora
    gyrfalcon finetune --output runs/x --resume         continue an interrupted run
    gyrfalcon merge --adapter runs/x/adapter --output merged-model
    gyrfalcon merge --adapter peft-qlora-adapter --output merged-model --base-4bit    an adapter with no record

Every key of a recipe (gyrfalcon.recipes.FinetuneConfig) is also a flag: `lora_r` is `--lora-r`; flags win over
the recipe, the recipe over the defaults. `add_finetune_parsers(subparsers)` adds both commands to a parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .recipes import RecipeError, base_type, config_fields, load_recipe, render_recipe

# Flags with a shorter or clearer form than the key's own name.
_ALIASES = {"model": ["--model", "-m"], "data": ["--data", "-d"], "output": ["--output", "-o"]}


def add_finetune_parsers(subparsers) -> None:
    """Add `finetune` and `merge` to an argparse subparsers object."""
    _add_finetune(subparsers)
    _add_merge(subparsers)


def _add_finetune(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a Falcon-H1 model (LoRA, QLoRA or full) on your data",
        description="Fine-tune a Falcon-H1 model. With no --model, the built-in tiny model learns its bundled chat "
                    "data on this machine (CPU is fine, a minute or two) and the loss falls; that run has defaults of "
                    "its own (see --print-config). Settings: defaults < --config recipe < flags; every recipe key "
                    "is a flag.",
        epilog="Gated hub models: set HF_TOKEN or run `hf auth login` once. Recipes: configs/*.yaml (0.5B, "
               "1.5B-Deep, 7B, 34B; LoRA and QLoRA). Outputs in --output: adapter/ "
               "or model/, checkpoints/, metrics.jsonl, loss.png, run.json. Ctrl-C writes a checkpoint; the same "
               "command plus --output DIR --resume continues the run.")
    parser.add_argument("--config", "-c", metavar="RECIPE", default=None,
                        help="YAML recipe: a file, or a name in configs/ (e.g. falcon-h1-0.5b-lora)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as a documented YAML recipe and exit")
    groups = {}
    for f in config_fields():
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        group = groups[group_name]
        flags = _ALIASES.get(f.name, [f"--{f.name.replace('_', '-')}"])
        kind, _ = base_type(f)
        default_text = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default_part = "" if "default" in f.metadata["help"] else f"; default: {_show(default_text)}"
        help_text = f"{f.metadata['help']} (recipe key {f.name}{default_part})"
        common = dict(dest=f.name, default=None, help=help_text.replace("%", "%%"))
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif kind is list:
            group.add_argument(*flags, nargs="+", metavar="NAME", **common)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(*flags, type=kind if kind in (int, float) else str, choices=choices,
                               metavar=None if choices else f.name.upper(), **common)
    parser.set_defaults(run=_finetune)


def _show(value) -> str:
    """A default as a recipe writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "[]"
    return "empty" if value is None else str(value)


def _add_merge(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge", help="fold a LoRA adapter into its base model and save a Hugging Face checkpoint",
        description="Fold a LoRA adapter (a PEFT folder, e.g. a run's adapter/) into its base model's weights and "
                    "write a Hugging Face checkpoint that transformers, gyrfalcon and other tools load as is. A "
                    "QLoRA adapter is merged onto the dequantized 4-bit weights it was trained on: gyrfalcon's "
                    "adapter folders record it (gyrfalcon_training.json); for others, pass --base-4bit. merge says "
                    "which base it used.")
    parser.add_argument("--adapter", "-a", required=True, help="adapter folder (or hub id)")
    parser.add_argument("--output", "-o", required=True, help="folder to write (never replaced unless --overwrite)")
    parser.add_argument("--model", "-m", default=None,
                        help="base model folder or hub id (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="dtype of the merged weights (auto: the base checkpoint's own)")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 2GB)")
    parser.add_argument("--base-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="the adapter was trained on a 4-bit base (QLoRA): merge onto the dequantized 4-bit (NF4) "
                             "weights (needs bitsandbytes); --no-base-4bit: onto the dense weights (default: as the "
                             "adapter's gyrfalcon_training.json records it; dense where it records nothing)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--token", default=None, help="Hugging Face token for gated or private models")
    parser.set_defaults(run=_merge)


def _errors():
    from .api import QLoRAUnavailable
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .train import TrainingError

    return (DataError, RecipeError, TrainingError, QLoRAUnavailable, CheckpointError, ConfigError)


def _finetune(args: argparse.Namespace) -> int:
    from .api import finetune

    overrides = {f.name: getattr(args, f.name) for f in config_fields()}
    try:
        config = load_recipe(args.config, overrides)
        if args.print_config:
            print(render_recipe(config, title="resolved settings of `gyrfalcon finetune`"), end="")
            return 0
        finetune(config)
    except _errors() as err:
        print(f"gyrfalcon finetune: error: {err}", file=sys.stderr)
        return 2
    return 0


def tiny_finetune(seed: int = 0, output: str | None = None, overwrite: bool = False, resume: bool = False) -> int:
    """The fine-tuning part of `gyrfalcon demo`: the built-in tiny model learns its bundled chat data on this
    machine (about a minute on 2 CPU cores). Returns an exit status (2 with a message on bad input)."""
    from .api import finetune

    try:
        finetune(None, seed=seed, output=output, overwrite=overwrite, resume=resume)
    except _errors() as err:
        print(f"gyrfalcon demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .api import merge

    try:
        merge(args.adapter, args.output, model=args.model, dtype=args.dtype, device=args.device,
              overwrite=args.overwrite, max_shard_size=args.max_shard_size, base_4bit=args.base_4bit,
              token=args.token)
    except _errors() as err:
        print(f"gyrfalcon merge: error: {err}", file=sys.stderr)
        return 2
    return 0
