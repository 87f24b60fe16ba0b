"""The `gyrfalcon` command line: `gyrfalcon <command> --help` documents each command.

    gyrfalcon info MODEL        config summary, parameter counts by block, bf16 / 4-bit memory estimates
    gyrfalcon demo              the built-in tiny model end to end on this machine, then a one-minute fine-tune
    gyrfalcon finetune          fine-tune (LoRA, QLoRA, full); no model: the tiny model learns its bundled chat data
    gyrfalcon merge             fold a LoRA adapter into its base model and save a Hugging Face checkpoint
    gyrfalcon generate          complete prompts (one, or a JSONL file of them); the tiny model without --model
    gyrfalcon chat              interactive chat with the model's chat template, streaming
    gyrfalcon bench ACTION      run / table / report: benchmarks against transformers + PEFT (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .benchmark.cli import add_bench_parser
from .finetune_cli import add_finetune_parsers
from .generate_cli import add_generate_parsers
from .checkpoint import CheckpointError
from .config import ConfigError


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .checkpoint import load_config
    from .info import config_summary, memory_estimates, parameter_counts

    config = load_config(args.model, token=args.token, revision=args.revision)
    summary, counts, memory = config_summary(config), parameter_counts(config), memory_estimates(config)
    total = sum(counts.values())
    if args.json:
        print(json.dumps({"model": args.model, "config": summary, "parameters": counts, "total_parameters": total,
                          "memory_gib": memory}, indent=2))
        return 0
    console = Console()
    table = Table(title=f"Falcon-H1: {args.model}", show_header=False)
    for key, value in summary.items():
        if key == "multipliers":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, str(value))
    console.print(table)
    params = Table(title="Parameters by block")
    params.add_column("block")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    for block, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        params.add_row(block, f"{n:,}", f"{100 * n / total:.1f}%")
    params.add_row("total", f"{total:,}", "100%", style="bold")
    console.print(params)
    console.print(f"weights in bf16: {memory['bf16_gib']:.2f} GiB;  with the layers' linears in 4-bit NF4 "
                  f"(QLoRA): {memory['nf4_gib']:.2f} GiB")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if (args.overwrite or args.resume) and (not args.finetune or args.output is None):
        print("gyrfalcon demo: error: --overwrite and --resume apply to the fine-tune's --output DIR: pass it "
              "(and leave out --no-finetune)", file=sys.stderr)
        return 2
    run_demo(seed=args.seed, batch=args.batch, seq_len=args.seq_len)
    if not args.finetune:
        return 0
    from .finetune_cli import tiny_finetune

    return tiny_finetune(seed=args.seed, output=args.output, overwrite=args.overwrite, resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gyrfalcon",
        description="Fine-tune and run TII's Falcon-H1 hybrid (Mamba-2 + attention) models on one GPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  gyrfalcon demo                                   the tiny model end to end on this machine\n"
               "  gyrfalcon info tiiuae/Falcon-H1-7B-Instruct      shape, parameters, memory\n"
               "  gyrfalcon finetune -m tiiuae/Falcon-H1-0.5B-Instruct -d chat.jsonl -c falcon-h1-0.5b-lora\n"
               "  gyrfalcon generate --model runs/x/adapter --prompt \"Hello\"\n\n"
               "Run `gyrfalcon COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"gyrfalcon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info", help="config summary, parameter counts and memory estimates of a model",
        description="Show a Falcon-H1 model's shape, its parameter counts by block and the memory its weights "
                    "need in bf16 and with 4-bit NF4 linears (QLoRA). Reads config.json only; no weights.")
    info.add_argument("model", metavar="MODEL",
                      help="a preset (tiny, 0.5B, 1.5B, 1.5B-Deep, 3B, 7B, 34B), a checkpoint folder, or a hub id "
                           "such as tiiuae/Falcon-H1-0.5B-Instruct")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.add_argument("--token", default=None, help="Hugging Face token for gated or private hub models")
    info.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    info.set_defaults(run=_info)

    demo = commands.add_parser(
        "demo", help="run the built-in tiny model end to end (no download, CPU is fine)",
        description="Build the built-in tiny Falcon-H1 (random weights), check it, run it, then fine-tune it on its "
                    "bundled chat data (about a minute on 2 CPU cores): the loss falls and it answers questions.")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--batch", type=int, default=4, help="sequences per batch (default: 4)")
    demo.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    demo.add_argument("--no-finetune", dest="finetune", action="store_false",
                      help="skip the tiny fine-tune that follows the checks")
    demo.add_argument("--output", "-o", default=None,
                      help="run folder of the tiny fine-tune (default: runs/tiny-full-<date-time>)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace --output if it holds an earlier run (default: refuse)")
    demo.add_argument("--resume", action="store_true",
                      help="continue the interrupted fine-tune in --output from its last checkpoint")
    demo.set_defaults(run=_demo)

    add_finetune_parsers(commands)
    add_generate_parsers(commands)
    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError) as err:
        print(f"gyrfalcon {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gyrfalcon {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
