"""`gyrfalcon bench`: run the benchmark suites, print the ratio table, make the plots and the docs figures.

    gyrfalcon bench run [--plan default|sweep|maxlen|all] [--suites ...] [--shapes ...] [--systems ...]
                        [--out runs/bench] [--time-limit 540] [--resume] [--dry-run]
    gyrfalcon bench table runs/bench/results.jsonl [more.jsonl ...]
    gyrfalcon bench report runs/bench/results.jsonl [--plots docs/plots] [--doc docs/benchmarks.md]

`main(argv)` is the entry point (bench/run.py and bench/plot.py call it); `add_bench_parser(subcommands)` adds
the same commands under an existing `gyrfalcon` parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .plan import DEFAULT_SHAPES, PLANS, Settings
from .records import SUITES, SYSTEMS


def _csv(choices: tuple[str, ...] | None = None):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if choices is not None and s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(choices)}")
        if not items:
            raise argparse.ArgumentTypeError("give at least one name")
        return items
    return parse


def _counts(text: str) -> dict[str, int]:
    """'train=5,decode=3' -> {'train': 5, 'decode': 3}."""
    out = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected SUITE=N[,SUITE=N...], got {text!r}")
        out[key.strip()] = int(value)
    return out


def populate(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the run / table / report subcommands to `parser`."""
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True)

    run = sub.add_parser(
        "run", help="measure gyrfalcon and both transformers baselines (one worker process per system and shape)",
        description="Measure the plan's workloads for each system in its own worker process, in this one call. "
                    "Appends JSON records to OUT/results.jsonl, writes OUT/table.md and prints the table. "
                    "Progress goes to stderr.")
    run.add_argument("--plan", default="default", choices=PLANS,
                     help="default: train and prefill at 0.5B and 7B (< 9 min on an H100); extra: decode and "
                          "kernels at the same shapes; sweep: sequence-length and batch sweeps for the plots; "
                          "maxlen: longest trainable sequence; all: all of them")
    run.add_argument("--suites", type=_csv(SUITES), default=None, help=f"subset of {','.join(SUITES)}")
    run.add_argument("--shapes", type=_csv(), default=None,
                     help=f"presets to measure (default {','.join(DEFAULT_SHAPES)}; 'tiny' for a CPU smoke run)")
    run.add_argument("--systems", type=_csv(SYSTEMS), default=SYSTEMS, help=f"subset of {','.join(SYSTEMS)}")
    run.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    run.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for smoke runs")
    run.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    run.add_argument("--time-limit", type=float, default=540.0,
                     help="seconds for the whole run (default 540); what does not fit is recorded as skipped")
    run.add_argument("--workload-limit", type=float, default=Settings.workload_limit_s,
                     help="seconds of timed repeats per workload: fewer repeats when one takes long "
                          "(default %(default)s)")
    run.add_argument("--probe-limit", type=float, default=Settings.probe_limit_s,
                     help="maxlen: seconds one probe step may take (default %(default)s)")
    run.add_argument("--repeats", type=_counts, default=None, metavar="SUITE=N,...",
                     help="timed repeats per suite, e.g. train=5,decode=3 (defaults: "
                          + ", ".join(f"{k}={v}" for k, v in Settings().repeats.items()) + ")")
    run.add_argument("--warmup", type=_counts, default=None, metavar="SUITE=N,...",
                     help="warm-up runs per suite (defaults: "
                          + ", ".join(f"{k}={v}" for k, v in Settings().warmup.items()) + ")")
    run.add_argument("--maxlen-start", type=int, default=Settings.maxlen_start)
    run.add_argument("--maxlen-cap", type=int, default=Settings.maxlen_cap)
    run.add_argument("--baseline-dir", type=Path, default=Path(".baseline"),
                     help="mamba_ssm / causal_conv1d sources for hf-kernels, from bench/setup_baselines.sh "
                          "(default .baseline)")
    run.add_argument("--resume", action="store_true",
                     help="skip workloads OUT/results.jsonl already holds (status ok or oom)")
    run.add_argument("--commit", default=None, help="commit to record (default: GYRFALCON_COMMIT, else git)")
    run.add_argument("--no-autotune-cache", action="store_true",
                     help="do not set TRITON_CACHE_AUTOTUNING=1 for the workers")
    run.add_argument("--triton-cache", type=Path, default=Path("runs/triton-cache"),
                     help="TRITON_CACHE_DIR of the workers unless already set (default runs/triton-cache)")
    run.add_argument("--dry-run", action="store_true", help="print the workers and workloads, run nothing")
    run.set_defaults(bench_run=_run)

    table = sub.add_parser("table", help="print the ratio table of results files",
                           description="Print the markdown table (gyrfalcon / best baseline) of JSONL results.")
    table.add_argument("results", nargs="+", type=Path)
    table.add_argument("--suites", type=_csv(SUITES), default=SUITES)
    table.set_defaults(bench_run=_table)

    rep = sub.add_parser("report", help="write the PNG plots and the figures section of docs/benchmarks.md",
                         description="From JSONL results: PNG plots (training tokens/s and memory vs sequence "
                                     "length, decoding tokens/s vs batch) and the generated figures section of "
                                     "the benchmarks page.")
    rep.add_argument("results", nargs="+", type=Path)
    rep.add_argument("--plots", type=Path, default=Path("docs/plots"), help="folder for the PNGs (docs/plots)")
    rep.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"), help="page to update")
    rep.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    rep.add_argument("--no-doc", action="store_true", help="plots only")
    rep.set_defaults(bench_run=_report)
    return parser


def add_bench_parser(subcommands) -> argparse.ArgumentParser:
    """Add `bench` to a `gyrfalcon` parser's subcommands; its `run` default takes the parsed args."""
    bench = subcommands.add_parser(
        "bench", help="benchmarks against transformers + PEFT (run, table, report)",
        description="Benchmark gyrfalcon against transformers + PEFT, with and without mamba_ssm's kernels.")
    populate(bench)
    bench.set_defaults(run=dispatch)
    return bench


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed bench action; bad input or a missing file is a message and exit status 2."""
    try:
        return args.bench_run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"gyrfalcon bench {args.bench_command}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .runner import RunConfig, run

    settings = Settings(dtype=args.dtype, workload_limit_s=args.workload_limit, probe_limit_s=args.probe_limit,
                        maxlen_start=args.maxlen_start, maxlen_cap=args.maxlen_cap
                        ).with_counts(warmup=args.warmup, repeats=args.repeats)
    config = RunConfig(plan=args.plan, systems=args.systems, shapes=args.shapes, suites=args.suites,
                       settings=settings, device=args.device, out_dir=args.out, time_limit_s=args.time_limit,
                       baseline_dir=args.baseline_dir, resume=args.resume, commit=args.commit,
                       autotune_cache=not args.no_autotune_cache, triton_cache_dir=args.triton_cache)
    run(config, dry_run=args.dry_run)
    return 0


def _table(args: argparse.Namespace) -> int:
    from .records import read_jsonl
    from .report import markdown_table

    print(markdown_table(read_jsonl(args.results, strict=False), args.suites), end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .records import read_jsonl
    from .report import update_docs

    records = read_jsonl(args.results, strict=False)
    plots: list[Path] = []
    if not args.no_plots:
        from .plots import make_plots
        plots = make_plots(records, args.plots)
        for path in plots:
            print(f"wrote {path}")
    if not args.no_doc:
        update_docs(args.doc, records, plots=plots, sources=[p.as_posix() for p in args.results])
        print(f"updated {args.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = populate(argparse.ArgumentParser(
        prog="gyrfalcon bench",
        description="Benchmark gyrfalcon against transformers + PEFT, with and without mamba_ssm's kernels."))
    return dispatch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
