"""One benchmark worker: a fresh process that measures one system on one shape and writes JSON lines.

The runner (runner.py) starts one worker per (system, shape), each with its own import path, so that the two
transformers baselines differ only in whether mamba_ssm is importable (see systems.py). By hand:

    python -m gyrfalcon.benchmark.worker --system gyrfalcon --shape tiny --suites train,prefill --device cpu
    python -m gyrfalcon.benchmark.worker --system hf-torch --shape 0.5B --spec spec.json --records out.jsonl

Without --spec the workloads are the default plan's for that shape and the settings are the defaults (--dtype
overrides the dtype). Records go to --records (appended and flushed one by one, so a killed worker loses nothing
it finished) or to stdout; progress goes to stderr. Exit status 0 whenever the worker itself ran to the end,
whatever the measurements' statuses; RESTART (75) when an error left the CUDA context unusable after a finished
workload: the runner then starts a new worker for the workloads not yet measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .plan import Settings, Workload, plan_workloads
from .records import HEADLINE, SYSTEMS, SUITES, make_record, new_run_id

RESTART = 75   # exit status: the workloads without records were not started; run them in a new worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gyrfalcon.benchmark.worker",
                                     description="Measure one system on one shape; print one JSON object per "
                                                 "measurement.")
    parser.add_argument("--system", required=True, choices=SYSTEMS)
    parser.add_argument("--shape", required=True, help="a preset name: 0.5B, 7B, tiny, ...")
    parser.add_argument("--suites", default=None,
                        help=f"comma-separated subset of {','.join(SUITES)} (without --spec; default: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32 (without --spec)")
    parser.add_argument("--spec", default=None, type=Path,
                        help="JSON file: {settings, workloads, run_id, commit} written by the runner")
    parser.add_argument("--records", default=None, type=Path, help="append records here (default: stdout)")
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--commit", default=None)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.suites is not None:
        suites = tuple(s for s in args.suites.split(",") if s)
        bad = [s for s in suites if s not in SUITES]
        if bad:
            parser.error(f"unknown suite(s) {', '.join(bad)}; suites: {', '.join(SUITES)}")
        args.suites = suites
    if args.spec is not None and (args.suites is not None or args.dtype is not None):
        parser.error("--suites and --dtype go into the spec file when --spec is given")
    return args


def load_job(args: argparse.Namespace) -> tuple[Settings, list[Workload], str, str | None]:
    """(settings, workloads, run_id, commit) from the spec file or from the defaults."""
    if args.spec is not None:
        spec = json.loads(args.spec.read_text())
        workloads = [Workload.from_dict(w) for w in spec["workloads"]]
        wrong = [w.label() for w in workloads if w.shape != args.shape]
        if wrong:
            raise ValueError(f"spec holds workloads of another shape than {args.shape}: {', '.join(wrong)}")
        return (Settings.from_dict(spec["settings"]), workloads, spec.get("run_id") or args.run_id or new_run_id(),
                spec.get("commit") or args.commit)
    settings = Settings() if args.dtype is None else Settings(dtype=args.dtype)
    workloads = [w for plan in ("default", "extra")
                 for w in plan_workloads(plan, shapes=(args.shape,), suites=args.suites)]
    return settings, workloads, args.run_id or new_run_id(), args.commit


class Emitter:
    """Writes each record as one JSON line, flushed at once."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.path is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, workloads, run_id, commit = load_job(args)

    import torch

    from .records import collect_env
    from .suites import Context, context_lost, run_workload
    from .systems import Unavailable, make_system

    emit = Emitter(args.records)
    device = torch.device(args.device)
    env = collect_env(args.device, commit=commit)
    system = make_system(args.system)
    problem = None
    if device.type == "cuda" and not torch.cuda.is_available():
        problem = f"no CUDA device in this process (device {args.device!r})"
    else:
        try:
            system.check()           # before transformers' model code is imported: see systems.py
        except Unavailable as err:
            problem = str(err)
    if problem is not None:
        print(f"[bench] {args.system} {args.shape}: unavailable: {problem}", file=sys.stderr, flush=True)
        for w in workloads:
            for metric in HEADLINE[w.suite]:
                emit(make_record(system=args.system, suite=w.suite, shape=w.shape, workload=w.params,
                                 metric=metric, value=None, status="unavailable", reason=problem,
                                 settings=settings.to_dict(), env=env, run_id=run_id))
        return 0
    ctx = Context(system=system, settings=settings, device=device, run_id=run_id, env=env, emit=emit,
                  describe=system.describe())
    for i, w in enumerate(workloads, 1):
        print(f"[bench] {args.system} {args.shape}: {w.label()} ({i}/{len(workloads)})", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        failure = run_workload(ctx, w)
        status = "ok" if failure is None else failure[0]
        print(f"[bench] {args.system} {args.shape}: {w.label()}: {status} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
        if failure is not None and context_lost(failure[1]) and i < len(workloads):
            print(f"[bench] {args.system} {args.shape}: the CUDA context is lost; a new worker takes the rest",
                  file=sys.stderr, flush=True)
            return RESTART
    return 0


if __name__ == "__main__":
    sys.exit(main())
