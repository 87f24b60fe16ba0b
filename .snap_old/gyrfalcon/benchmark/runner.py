"""The benchmark runner: one worker process per (shape, system), all in one call, records collected into JSONL.

    run(RunConfig(plan="default", systems=SYSTEMS, out_dir=Path("runs/bench"), ...)) -> list of records

Each worker is `python -m gyrfalcon.benchmark.worker` with its own PYTHONPATH (worker_env): hf-kernels sees the
mamba_ssm / causal_conv1d sources prepared by bench/setup_baselines.sh (.baseline/), the other two systems never
do. Workers run one after another (shape-major: the three systems of a shape, then the next shape), so each has
the device to itself.

Time: the whole run has a budget (`time_limit_s`); a worker gets what is left and is killed when it is spent.
Workloads it had not finished become `timeout` records, those never started `skipped`; `resume` lets a later call
measure only those. A worker that crashes (a segfault) costs the workload it was on a `failed` record with the
tail of its output, and a new worker takes the rest; a worker whose CUDA context broke (an illegal memory access)
records the failure itself and exits with worker.RESTART for the same. Records are appended to results.jsonl as
each worker ends, so a run stopped from outside keeps what it measured. Nothing planned is dropped.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .plan import Settings, Workload, plan_workloads
from .records import HEADLINE, SYSTEMS, package_version, git_commit, make_record, new_run_id, read_jsonl, write_jsonl
from .suites import maxlen_result
from .worker import RESTART

PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the folder holding the gyrfalcon package
MIN_START_S = 20.0                                    # do not start a worker with less time than this left
MAX_RESTARTS = 3                                      # new workers after crashes, per (shape, system)
RESUME_DONE = ("ok", "oom")                           # statuses a resumed run does not measure again


@dataclass
class RunConfig:
    plan: str = "default"
    systems: tuple[str, ...] = SYSTEMS
    shapes: tuple[str, ...] | None = None
    suites: tuple[str, ...] | None = None
    settings: Settings = field(default_factory=Settings)
    device: str = "cuda"
    out_dir: Path = Path("runs/bench")
    time_limit_s: float = 540.0
    baseline_dir: Path | None = Path(".baseline")
    resume: bool = False
    commit: str | None = None
    autotune_cache: bool = True
    triton_cache_dir: Path | None = Path("runs/triton-cache")
    python: str = sys.executable
    min_start_s: float = MIN_START_S


# ---------------------------------------------------------------------------------------------- environment
def baseline_paths(baseline_dir: Path | None) -> list[Path]:
    """The import path entries of a .baseline/ folder made by bench/setup_baselines.sh: the stubs, the unpacked
    mamba_ssm and causal_conv1d sources, and pure-Python dependencies (einops). [] when there is none."""
    if baseline_dir is None or not baseline_dir.is_dir():
        return []
    paths = [baseline_dir / "stub"]
    paths += sorted(p for p in baseline_dir.glob("mamba_ssm-*") if p.is_dir())
    paths += sorted(p for p in baseline_dir.glob("causal_conv1d-*") if p.is_dir())
    paths.append(baseline_dir / "pydeps")
    return [p.resolve() for p in paths if p.is_dir()]


def worker_env(system: str, config: RunConfig, base: dict | None = None) -> dict:
    """The environment of a worker: PYTHONPATH = gyrfalcon's root [+ the baseline sources for hf-kernels]
    + the inherited entries (less any inside the baseline folder, for the other systems)."""
    env = dict(os.environ if base is None else base)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if config.baseline_dir is not None and system != "hf-kernels":
        inside = str(config.baseline_dir.resolve())
        inherited = [p for p in inherited if not str(Path(p).resolve()).startswith(inside)]
    paths = [str(PACKAGE_ROOT)]
    if system == "hf-kernels":
        paths += [str(p) for p in baseline_paths(config.baseline_dir)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + inherited))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")            # random-init models only: nothing to fetch
    if config.autotune_cache:
        # Triton keeps autotuning results on disk: a restarted worker, or the next call, does not tune again.
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if config.triton_cache_dir is not None:
        # Compiled kernels and tuning results in a folder of the checkout (git-ignored runs/), which a device
        # machine keeps between calls, rather than in a home directory that may not survive.
        env.setdefault("TRITON_CACHE_DIR", str(config.triton_cache_dir.resolve()))
    return env


def worker_command(config: RunConfig, system: str, shape: str, spec: Path, records: Path) -> list[str]:
    return [config.python, "-m", "gyrfalcon.benchmark.worker", "--system", system, "--shape", shape,
            "--device", config.device, "--spec", str(spec), "--records", str(records)]


def parent_env(config: RunConfig) -> dict:
    """The env of records the runner writes itself (skipped, timeout, crash): versions without importing torch
    or touching the device."""
    versions = {name: package_version(name) for name in ("torch", "triton", "transformers", "peft", "gyrfalcon")}
    return {"device": config.device + " (not measured)", **versions, "commit": config.commit or "unknown"}


# ---------------------------------------------------------------------------------------------- planning
def jobs(workloads: list[Workload], systems: tuple[str, ...]) -> list[tuple[str, str, list[Workload]]]:
    """(shape, system, workloads) in run order: shape-major, systems in the order given."""
    shapes = list(dict.fromkeys(w.shape for w in workloads))
    return [(shape, system, [w for w in workloads if w.shape == shape]) for shape in shapes for system in systems]


def done_keys(records: list[dict]) -> set[tuple]:
    """(system, suite, shape, params-json) of workloads whose headline was measured (status in RESUME_DONE)."""
    return {(r["system"], r["suite"], r["shape"], json.dumps(r["workload"], sort_keys=True)) for r in records
            if r["metric"] in HEADLINE[r["suite"]] and r["status"] in RESUME_DONE}


def finished(records: list[dict], system: str) -> set[tuple]:
    """Workload keys with a headline record of `system`, whatever its status."""
    return {(r["suite"], r["shape"], json.dumps(r["workload"], sort_keys=True)) for r in records
            if r["system"] == system and r["metric"] in HEADLINE[r["suite"]]}


# ---------------------------------------------------------------------------------------------- one worker
@dataclass
class WorkerResult:
    records: list[dict]
    returncode: int | None
    timed_out: bool
    tail: list[str]


def _pump(stream, prefix: str, log, tail: collections.deque) -> None:
    for line in iter(stream.readline, ""):
        sys.stderr.write(f"{prefix}{line}" if not line.startswith("[bench]") else line)
        sys.stderr.flush()
        log.write(line)
        tail.append(line.rstrip("\n"))


def run_worker(config: RunConfig, system: str, shape: str, workloads: list[Workload], run_id: str,
               timeout_s: float) -> WorkerResult:
    """Start one worker for these workloads, forward its output to stderr (and a log under out_dir/logs), stop
    it after `timeout_s`, and return the records it wrote."""
    logs = config.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gyrfalcon-bench-") as tmp:
        spec, records = Path(tmp) / "spec.json", Path(tmp) / "records.jsonl"
        spec.write_text(json.dumps({"settings": config.settings.to_dict(), "run_id": run_id, "commit": config.commit,
                                    "workloads": [w.to_dict() for w in workloads]}))
        tail: collections.deque = collections.deque(maxlen=30)
        with (logs / f"{run_id}_{system}_{shape}.log").open("a") as log:
            proc = subprocess.Popen(worker_command(config, system, shape, spec, records),
                                    env=worker_env(system, config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            pump = threading.Thread(target=_pump, args=(proc.stdout, f"  [{system} {shape}] ", log, tail),
                                    daemon=True)
            pump.start()
            timed_out = False
            try:
                proc.wait(timeout=max(1.0, timeout_s))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)   # the worker's own session: it and its compiler children
                proc.wait()
            pump.join(timeout=10)
        got = read_jsonl([records], strict=False) if records.exists() else []
    return WorkerResult(got, proc.returncode, timed_out, list(tail))


# ---------------------------------------------------------------------------------------------- the run
def _stand_in(config: RunConfig, run_id: str, system: str, workload: Workload, status: str, reason: str,
              probes: list[dict]) -> list[dict]:
    """Records the runner writes for a workload its worker did not finish."""
    env, settings = parent_env(config), config.settings.to_dict()
    if workload.suite == "maxlen" and any(p["status"] == "ok" for p in probes):
        value, _, _, extra = maxlen_result(probes, cap=config.settings.maxlen_cap)
        extra["limited_by"] = f"worker stopped ({status}) after this length"
        return [make_record(system=system, suite="maxlen", shape=workload.shape, workload=workload.params,
                            metric="max_seqlen", value=value, settings=settings, env=env, run_id=run_id,
                            extra={**extra, "note": f"lower bound: {reason}"})]
    return [make_record(system=system, suite=workload.suite, shape=workload.shape, workload=workload.params,
                        metric=metric, value=None, status=status, reason=reason, settings=settings, env=env,
                        run_id=run_id) for metric in HEADLINE[workload.suite]]


def _probes_of(records: list[dict], workload: Workload) -> list[dict]:
    return [r for r in records if r["suite"] == "maxlen" and r["metric"] == "probe_step_s"
            and r["shape"] == workload.shape]


def run(config: RunConfig, *, dry_run: bool = False) -> list[dict]:
    """Run the plan; append every record to out_dir/results.jsonl, write out_dir/table.md; return this run's
    records. dry_run: print the jobs and worker commands only."""
    workloads = plan_workloads(config.plan, shapes=config.shapes, suites=config.suites)
    results = config.out_dir / "results.jsonl"
    previous = read_jsonl([results], strict=False) if config.resume and results.exists() else []
    skip = done_keys(previous)
    run_id = new_run_id()
    config.commit = config.commit or os.environ.get("GYRFALCON_COMMIT") or git_commit()
    plan = [(shape, system, [w for w in wls if (system, *w.key) not in skip])
            for shape, system, wls in jobs(workloads, config.systems)]
    plan = [job for job in plan if job[2]]
    say = lambda text: print(f"[bench] {text}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"run {run_id}: plan {config.plan}, {sum(len(j[2]) for j in plan)} measurements in {len(plan)} workers, "
        f"time limit {config.time_limit_s:.0f} s, commit {config.commit}")
    if any(system == "hf-kernels" for _, system, _ in plan):
        found = baseline_paths(config.baseline_dir)
        say("hf-kernels import path: " + (", ".join(str(p) for p in found) if found else
                                          f"no sources in {config.baseline_dir} (run bench/setup_baselines.sh); "
                                          "hf-kernels works only if mamba_ssm is installed"))
    if dry_run:
        for shape, system, wls in plan:
            print(f"{system} {shape}: " + " ".join(worker_command(config, system, shape, Path("SPEC"),
                                                                  Path("RECORDS"))))
            for w in wls:
                print(f"    {w.label()}")
        return []
    deadline = time.monotonic() + config.time_limit_s
    out: list[dict] = []

    def keep(records: list[dict]) -> None:
        """Append at once: a run stopped from outside keeps every record it has."""
        write_jsonl(results, records)
        out.extend(records)

    def stand_in(system: str, workloads: list[Workload], status: str, reason: str, probes=()) -> None:
        keep([r for w in workloads for r in _stand_in(config, run_id, system, w, status, reason, list(probes))])

    for shape, system, pending in plan:
        restarts = 0
        while pending:
            left = deadline - time.monotonic()
            if left < config.min_start_s:
                stand_in(system, pending, "skipped", "the run's time limit was spent")
                break
            say(f"{system} {shape}: {len(pending)} workload(s), {left:.0f} s left")
            result = run_worker(config, system, shape, pending, run_id, left)
            keep(result.records)
            done = finished(result.records, system)
            missing = [w for w in pending if w.key not in done]
            if not missing:
                break
            if result.returncode == RESTART and not result.timed_out:
                restarts += 1              # none of the missing ones was started
                if restarts <= MAX_RESTARTS:
                    pending = missing
                    continue
                stand_in(system, missing, "failed", "not run: the CUDA context kept breaking")
                break
            first, rest = missing[0], missing[1:]
            if result.timed_out:
                stand_in(system, [first], "timeout", "stopped at the run's time limit",
                         _probes_of(result.records, first))
                stand_in(system, rest, "skipped", "the run's time limit was spent")
                break
            tail = " | ".join(result.tail[-8:])[-1200:]
            stand_in(system, [first], "failed", f"worker exited with status {result.returncode} during this "
                                                f"workload: {tail}", _probes_of(result.records, first))
            restarts += 1
            if restarts > MAX_RESTARTS:
                stand_in(system, rest, "failed", "not run: workers kept crashing")
                break
            pending = rest
    table = report.markdown_table(read_jsonl([results], strict=False))
    (config.out_dir / "table.md").write_text(table)
    print(table)
    return out
