"""Benchmark records: one JSON object per measurement, their schema, the environment they carry, JSONL I/O.

A record (one line of results.jsonl):
    {"schema": "gyrfalcon.bench/1", "run_id": "20261124T101500Z", "time": "2026-11-24T10:16:02Z",
     "system": "hf-kernels", "suite": "train", "shape": "7B", "workload": {"batch": 1, "seqlen": 2048},
     "metric": "tokens_per_s", "value": 1306.2, "unit": "tok/s", "better": "higher",
     "status": "ok", "reason": null, "settings": {...identical for every system of a run...},
     "extra": {"samples": [...], ...}, "env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", ...}}
A measurement that could not be taken keeps its row: `value` null and `status` one of oom, unsupported (the
system lacks the feature), unavailable (the system cannot be set up here), failed (an error; `reason` says which),
timeout (stopped by a time limit) or skipped (not started: the run's time budget was spent).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable

SCHEMA = "gyrfalcon.bench/1"
SYSTEMS = ("gyrfalcon", "hf-kernels", "hf-torch")
BASELINES = ("hf-kernels", "hf-torch")
SUITES = ("train", "prefill", "decode", "kernels", "maxlen")
STATUSES = ("ok", "oom", "unsupported", "unavailable", "failed", "timeout", "skipped")

# metric -> (unit, which direction is better)
METRICS: dict[str, tuple[str, str]] = {
    "tokens_per_s": ("tok/s", "higher"),          # train, prefill: tokens processed; decode: tokens generated
    "step_s": ("s", "lower"),                     # one optimizer step / one prefill forward
    "peak_gib": ("GiB", "lower"),                 # allocator peak over the timed repeats
    "model_tflops": ("TFLOP/s", "higher"),        # model FLOPs (flops.py) per second
    "flops_share": ("share", "higher"),           # model FLOP/s over the peak (989 TFLOP/s on H100)
    "ms_per_step": ("ms", "lower"),               # decode: one generated token of the whole batch
    "e2e_tokens_per_s": ("tok/s", "higher"),      # decode: new tokens / whole generate call (prefill included)
    "bandwidth_share": ("share", "higher"),       # decode bytes per step (flops.py) per second over 3.35 TB/s
    "ms": ("ms", "lower"),                        # kernels: one call of an op
    "max_seqlen": ("tokens", "higher"),           # maxlen: longest sequence that trains at batch 1
    "probe_step_s": ("s", "lower"),               # maxlen: one probe's train step time
}

# The metrics a suite reports when a workload fails: the rows the table must still show.
HEADLINE: dict[str, tuple[str, ...]] = {
    "train": ("tokens_per_s", "peak_gib"),
    "prefill": ("tokens_per_s", "peak_gib"),
    "decode": ("tokens_per_s", "peak_gib"),
    "kernels": ("ms",),
    "maxlen": ("max_seqlen",),
}

REQUIRED = ("schema", "run_id", "time", "system", "suite", "shape", "workload", "metric", "value", "unit", "better",
            "status", "reason", "settings", "extra", "env")
ENV_REQUIRED = ("device", "torch", "triton", "transformers", "commit")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def make_record(*, system: str, suite: str, shape: str, workload: dict, metric: str, value: float | None,
                status: str = "ok", reason: str | None = None, settings: dict, env: dict, run_id: str,
                extra: dict | None = None) -> dict:
    """A validated record; unit and direction come from METRICS."""
    unit, better = METRICS[metric] if metric in METRICS else (None, None)
    record = {"schema": SCHEMA, "run_id": run_id, "time": utc_now(), "system": system, "suite": suite,
              "shape": shape, "workload": dict(workload), "metric": metric,
              "value": None if value is None else float(value), "unit": unit, "better": better, "status": status,
              "reason": reason, "settings": dict(settings), "extra": dict(extra or {}), "env": dict(env)}
    validate_record(record)
    return record


def validate_record(record: dict) -> None:
    """Raise ValueError naming every way `record` departs from the schema."""
    problems = [f"missing {key!r}" for key in REQUIRED if key not in record]
    if problems:
        raise ValueError(f"bad benchmark record: {', '.join(problems)}")
    if record["schema"] != SCHEMA:
        problems.append(f"schema {record['schema']!r} is not {SCHEMA!r}")
    for key, allowed in (("system", SYSTEMS), ("suite", SUITES), ("status", STATUSES), ("metric", tuple(METRICS))):
        if record[key] not in allowed:
            problems.append(f"{key} {record[key]!r} is not one of {allowed}")
    if record["metric"] in METRICS and (record["unit"], record["better"]) != METRICS[record["metric"]]:
        problems.append(f"unit/better of {record['metric']!r} must be {METRICS[record['metric']]}")
    value = record["value"]
    if record["status"] == "ok":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"status ok needs a finite number as value, got {value!r}")
    else:
        if value is not None:
            problems.append(f"status {record['status']!r} needs value null, got {value!r}")
        if not record["reason"]:
            problems.append(f"status {record['status']!r} needs a reason")
    for key in ("workload", "settings", "extra", "env"):
        if not isinstance(record[key], dict):
            problems.append(f"{key} must be an object")
    if isinstance(record["env"], dict):
        problems += [f"env lacks {key!r}" for key in ENV_REQUIRED if key not in record["env"]]
    if problems:
        raise ValueError(f"bad benchmark record: {'; '.join(problems)}")


def workload_key(record: dict) -> tuple:
    """What identifies a measured point across runs: suite, shape, workload, metric (not the system)."""
    return (record["suite"], record["shape"], json.dumps(record["workload"], sort_keys=True), record["metric"])


def write_jsonl(path: str | os.PathLike, records: Iterable[dict], *, append: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=False) + "\n")


def read_jsonl(paths: Iterable[str | os.PathLike], *, strict: bool = True) -> list[dict]:
    """Records of one or more JSONL files, in file order. Blank lines are skipped; with strict=False, lines that
    are not valid records (a worker's stray output) are skipped too, otherwise they raise ValueError."""
    out = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate_record(record)
            except (json.JSONDecodeError, ValueError, TypeError) as err:
                if strict:
                    raise ValueError(f"{path}:{number}: {err}") from None
                continue
            out.append(record)
    return out


# ---------------------------------------------------------------------------------------------- environment
def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(directory: str | os.PathLike | None = None) -> str | None:
    """Short commit of the checkout holding `directory` (+"-dirty" with uncommitted changes), or None."""
    cwd = str(directory or Path(__file__).resolve().parents[2])
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def collect_env(device: str, *, commit: str | None) -> dict:
    """Versions and device of the current process. Workers differ in mamba_ssm / causal_conv1d (only hf-kernels
    sees them; sources put on PYTHONPATH by bench/setup_baselines.sh carry their egg-info, so they show here)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        name = torch.cuda.get_device_name(dev)
        total = torch.cuda.get_device_properties(dev).total_memory / 1024 ** 3
        device_name = f"{name} ({total:.0f} GiB)"
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()})"
    versions = {name: package_version(name) for name in ("triton", "transformers", "peft", "mamba_ssm",
                                                         "causal_conv1d", "gyrfalcon")}
    return {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda, **versions,
            "python": platform.python_version(), "commit": commit or "unknown"}
