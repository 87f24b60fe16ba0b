"""Tables from benchmark records: the ratio table (gyrfalcon / best baseline) and docs/benchmarks.md's figures.

    print(markdown_table(read_jsonl(["runs/bench/results.jsonl"])))
    update_docs(Path("docs/benchmarks.md"), records, plots=[...], sources=[...])

Rows are (suite, shape, workload, metric); columns the three systems, then gyrfalcon's value over the best
baseline's (the higher of the two for throughput, the lower for memory and milliseconds: below 1x is better there).
Throughput cells carry the roofline share in parentheses: model FLOP/s over the peak for train and prefill
(flops.py), bytes moved per decode step over the bandwidth for decode. A measurement that failed keeps its cell:
OOM, unsupported, unavailable, failed, timeout or skipped, with the reason as a numbered note below the table.
When a results file holds several runs, the latest record of each cell wins, except that `skipped` (nothing was
measured) never hides an earlier result.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..presets import PRESETS
from .plan import KERNEL_OPS, workload_label
from .records import BASELINES, METRICS, SUITES, SYSTEMS

TABLE_METRICS = {
    "train": ("tokens_per_s", "peak_gib"),
    "prefill": ("tokens_per_s", "peak_gib"),
    "decode": ("tokens_per_s", "peak_gib"),
    "kernels": ("ms",),
    "maxlen": ("max_seqlen",),
}
SHARE_OF = {"train": "flops_share", "prefill": "flops_share", "decode": "bandwidth_share"}
METRIC_LABELS = {"tokens_per_s": "tok/s", "peak_gib": "peak GiB", "ms": "ms", "max_seqlen": "tokens"}
STATUS_LABELS = {"oom": "OOM", "unsupported": "unsupported", "unavailable": "unavailable", "failed": "failed",
                 "timeout": "timeout", "skipped": "skipped"}
NOTED = ("unsupported", "unavailable", "failed")         # statuses whose reason is printed as a note
SUITE_TITLES = {
    "train": "Training: LoRA step (forward, backward, AdamW)",
    "prefill": "Prefill: one forward over the prompt, logits of the last position",
    "decode": "Decoding: greedy, tokens per second excluding the prefill",
    "kernels": "Kernels: the Mamba ops each system runs, milliseconds per call",
    "maxlen": "Longest sequence that trains at batch 1",
}
BEGIN, END = "<!-- bench:figures:begin -->", "<!-- bench:figures:end -->"


def _params_json(record: dict) -> str:
    return json.dumps(record["workload"], sort_keys=True)


def latest(records: list[dict]) -> dict[tuple, dict]:
    """(system, suite, shape, workload-json, metric) -> the record that counts (see the module docstring)."""
    out: dict[tuple, dict] = {}
    for r in records:
        key = (r["system"], r["suite"], r["shape"], _params_json(r), r["metric"])
        if r["status"] == "skipped" and key in out:
            continue
        out[key] = r
    return out


def format_value(value: float, unit: str) -> str:
    if unit == "share":
        return f"{value:.1%}"
    if unit == "GiB":
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:#.3g}"


def ratio(gyrfalcon: dict | None, baselines: list[dict | None]) -> float | None:
    """gyrfalcon's value over the best baseline's (max when higher is better, min when lower), or None."""
    if gyrfalcon is None or gyrfalcon["status"] != "ok":
        return None
    values = [b["value"] for b in baselines if b is not None and b["status"] == "ok"]
    if not values:
        return None
    best = max(values) if gyrfalcon["better"] == "higher" else min(values)
    return gyrfalcon["value"] / best if best else None


def _workload_order(suite: str, params: dict) -> tuple:
    if suite == "kernels":
        op = (params["op"], params["pass"])
        return (KERNEL_OPS.index(op) if op in KERNEL_OPS else len(KERNEL_OPS), params.get("batch", 0),
                params.get("seqlen", 0))
    return tuple(params.get(k, 0) for k in ("batch", "seqlen", "prompt", "new_tokens"))


def _shape_order(shape: str) -> int:
    names = list(PRESETS)
    return names.index(shape) if shape in names else len(names)


def rows(records: list[dict], suites: tuple[str, ...] = SUITES) -> list[dict]:
    """One dict per table row: suite, shape, workload (params), metric, cells {system: record | None},
    shares {system: record | None}, ratio."""
    table = latest(records)
    points = {(r["suite"], r["shape"], _params_json(r)) for r in table.values()
              if r["suite"] in suites and r["metric"] in TABLE_METRICS[r["suite"]]}
    ordered = sorted(points, key=lambda p: (SUITES.index(p[0]), _shape_order(p[1]),
                                            _workload_order(p[0], json.loads(p[2]))))
    out = []
    for suite, shape, params in ordered:
        for metric in TABLE_METRICS[suite]:
            cells = {s: table.get((s, suite, shape, params, metric)) for s in SYSTEMS}
            if not any(cells.values()):
                continue
            shares = ({s: table.get((s, suite, shape, params, SHARE_OF[suite])) for s in SYSTEMS}
                      if metric == "tokens_per_s" and suite in SHARE_OF else {})
            out.append({"suite": suite, "shape": shape, "workload": json.loads(params), "metric": metric,
                        "cells": cells, "shares": shares,
                        "ratio": ratio(cells["gyrfalcon"], [cells[b] for b in BASELINES])})
    return out


class _Notes:
    """Numbered notes for the reasons of unsupported / unavailable / failed cells."""

    def __init__(self):
        self.items: dict[str, int] = {}

    def ref(self, system: str, reason: str | None) -> str:
        text = f"{system}: {(reason or 'no reason given').strip()}"
        text = re.sub(r"\s+", " ", text)
        if len(text) > 300:
            text = text[:300] + " ..."
        return f"[{self.items.setdefault(text, len(self.items) + 1)}]"

    def markdown(self) -> str:
        return "\n".join(f"[{n}] {text.replace('|', '/')}  " for text, n in self.items.items())


def _cell(record: dict | None, share: dict | None, notes: _Notes) -> str:
    if record is None:
        return "—"
    if record["status"] != "ok":
        label = STATUS_LABELS.get(record["status"], record["status"])
        return label + (" " + notes.ref(record["system"], record["reason"]) if record["status"] in NOTED else "")
    text = format_value(record["value"], record["unit"])
    if share is not None and share["status"] == "ok":
        text += f" ({share['value']:.1%})"
    return text


def markdown_table(records: list[dict], suites: tuple[str, ...] = SUITES) -> str:
    """The ratio table as GitHub markdown, with its notes; a line saying so when there is nothing to show."""
    table_rows = rows(records, suites)
    if not table_rows:
        return "_No measurements._\n"
    notes = _Notes()
    with_suite = len({r["suite"] for r in table_rows}) > 1
    head = (["suite"] if with_suite else []) + ["shape", "workload", "metric", *SYSTEMS, "gyrfalcon / best baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < len(head) - 4 else "---:"
                                                           for i in range(len(head))) + "|"]
    for row in table_rows:
        cells = [_cell(row["cells"][s], row["shares"].get(s), notes) for s in SYSTEMS]
        r = row["ratio"]
        lower = METRICS[row["metric"]][1] == "lower"
        ratio_text = "—" if r is None else f"{r:.2f}x" + (" (lower is better)" if lower else "")
        lead = [row["suite"]] if with_suite else []
        lines.append("| " + " | ".join(lead + [row["shape"], workload_label(row["suite"], row["workload"]),
                                               METRIC_LABELS.get(row["metric"], row["metric"]), *cells,
                                               ratio_text]) + " |")
    shared = {row["suite"] for row in table_rows if row["shares"]}
    legend = []
    if shared & {"train", "prefill"}:
        legend.append("model FLOP/s over the peak FLOP/s (train, prefill)")
    if "decode" in shared:
        legend.append("bytes moved per decode step over the memory bandwidth (decode)")
    body = "\n".join(lines) + "\n"
    if legend:
        body += "\nIn parentheses: " + "; ".join(legend) + " (counted as docs/benchmarks.md describes).\n"
    if notes.items:
        body += "\n" + notes.markdown() + "\n"
    return body


# ---------------------------------------------------------------------------------------------- docs
def environments(records: list[dict]) -> list[str]:
    """One line per distinct measuring environment among the ok records: device, date, commit, versions."""
    groups: dict[tuple, dict] = {}
    for r in records:
        if r["status"] != "ok":
            continue
        env = r["env"]
        key = (env.get("device"), r["time"][:10], env.get("commit"), env.get("torch"), env.get("triton"),
               env.get("transformers"), env.get("peft"))
        group = groups.setdefault(key, {"mamba_ssm": None, "systems": set()})
        group["systems"].add(r["system"])
        if r["system"] == "hf-kernels" and env.get("mamba_ssm"):
            group["mamba_ssm"] = env["mamba_ssm"]
    lines = []
    for (device, date, commit, torch_v, triton_v, tf_v, peft_v), group in groups.items():
        systems = ", ".join(s for s in SYSTEMS if s in group["systems"])
        text = (f"{device}, {date}, commit `{commit}`: torch {torch_v}, triton {triton_v}, transformers {tf_v}, "
                f"peft {peft_v}")
        if group["mamba_ssm"]:
            text += f", mamba_ssm {group['mamba_ssm']} (hf-kernels)"
        lines.append(f"- {text} ({systems})")
    return lines


def settings_line(records: list[dict]) -> str:
    for r in records:
        if r["status"] == "ok":
            s = r["settings"]
            return (f"Settings shared by all systems: {s['dtype']}, LoRA r={s['lora_r']} alpha={s['lora_alpha']} "
                    f"on {', '.join(s['lora_targets'])}, activation checkpointing "
                    f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['optimizer']}; random-init weights "
                    f"at the released shapes.")
    return ""


def figures_section(records: list[dict], *, plots: list[Path], doc_dir: Path, sources: list[str]) -> str:
    """The generated part of docs/benchmarks.md: environments, one table per suite, the plots under it."""
    parts = ["## Latest figures", "",
             f"Generated by `python bench/plot.py` from {', '.join(f'`{s}`' for s in sources) or 'no file'}; "
             "edit the text outside this section only.", ""]
    env_lines = environments(records)
    if env_lines:
        parts += ["Measured on:", *env_lines, "", settings_line(records), ""]
    for suite in SUITES:
        table = markdown_table(records, (suite,))
        if table.startswith("_No"):
            continue
        parts += [f"### {SUITE_TITLES[suite]}", "", table.rstrip("\n"), ""]
        for plot in plots:
            if plot.name.startswith(suite + "_"):
                rel = Path(_relative(plot, doc_dir))
                parts += [f"![{plot.stem.replace('_', ' ')}]({rel.as_posix()})", ""]
    if len(parts) <= 4:
        parts += ["_No measurements yet._", ""]
    return "\n".join(parts)


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def update_docs(doc: Path, records: list[dict], *, plots: list[Path], sources: list[str]) -> None:
    """Replace the text between the figure markers of `doc` with figures_section(...)."""
    text = doc.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{doc} lacks the markers {BEGIN} ... {END} around its figures section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    section = figures_section(records, plots=plots, doc_dir=doc.parent, sources=sources)
    doc.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")
