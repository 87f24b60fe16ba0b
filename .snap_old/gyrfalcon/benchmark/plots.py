"""PNG plots of benchmark records (matplotlib, an optional dependency: `pip install matplotlib`).

    make_plots(records, Path("docs/plots")) -> [Path, ...]
        train_<shape>.png    training tokens/s and allocator peak (GiB) against sequence length, per system
                             and batch size
        decode_<shape>.png   decoding tokens/s against batch size, per system
Only measured points are drawn; failed ones are named in the legend (e.g. "hf-torch (batch 1): OOM at length
16384"). Plots are drawn on matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path

from .records import SYSTEMS
from .report import STATUS_LABELS, latest

COLORS = {"gyrfalcon": "#d62728", "hf-kernels": "#1f77b4", "hf-torch": "#7f7f7f"}
MARKERS = {"gyrfalcon": "o", "hf-kernels": "s", "hf-torch": "^"}


class MissingMatplotlib(RuntimeError):
    pass


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("plots need matplotlib: pip install matplotlib (or pip install 'gyrfalcon[bench]')"
                                ) from None
    return Figure


def _series(records: list[dict], suite: str, shape: str, metric: str, x_key: str, group_keys: tuple[str, ...]):
    """{(system, group): [(x, y)]} of ok points and {(system, group): [(x, status label)]} of failed ones."""
    points: dict[tuple, list] = {}
    failures: dict[tuple, list] = {}
    for r in latest(records).values():
        if r["suite"] != suite or r["shape"] != shape or r["metric"] != metric:
            continue
        group = (r["system"], tuple(r["workload"].get(k) for k in group_keys))
        if r["status"] == "ok":
            points.setdefault(group, []).append((r["workload"][x_key], r["value"]))
        else:
            failures.setdefault(group, []).append((r["workload"][x_key], STATUS_LABELS.get(r["status"], r["status"])))
    return {g: sorted(v) for g, v in points.items()}, {g: sorted(v) for g, v in failures.items()}


def _draw(ax, points: dict, failures: dict, group_label, x_name: str) -> None:
    """One line per (system, group); failed points are named in the legend ("OOM at 16384")."""
    order = sorted(set(points) | set(failures), key=lambda g: (SYSTEMS.index(g[0]), str(g[1])))
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for group in order:
        system = group[0]
        style = styles[seen.setdefault(system, 0) % len(styles)]
        seen[system] += 1
        label = f"{system}{group_label(group[1])}"
        failed = failures.get(group, [])
        if failed:
            label += ": " + ", ".join(f"{status} at {x_name} {x}" for x, status in failed[:2])
            label += " ..." if len(failed) > 2 else ""
        if group in points:
            xs, ys = zip(*points[group])
            ax.plot(xs, ys, marker=MARKERS[system], linestyle=style, color=COLORS[system], label=label)
        else:
            ax.plot([], [], marker="x", linestyle="none", color=COLORS[system], label=label)


def _shapes(records: list[dict], suite: str) -> list[str]:
    """Shapes with at least one measured point in `suite` (a shape whose runs all failed has nothing to plot;
    the tables still list its failures)."""
    return list(dict.fromkeys(r["shape"] for r in records if r["suite"] == suite and r["status"] == "ok"))


def _device(records: list[dict]) -> str:
    devices = {r["env"].get("device") for r in records if r["status"] == "ok"}
    return ", ".join(sorted(d for d in devices if d))


def plot_train(records: list[dict], out_dir: Path) -> list[Path]:
    Figure = _figure_class()
    written = []
    for shape in _shapes(records, "train"):
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, 2)
        for ax, metric, ylabel in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "peak_gib", "peak memory (GiB)")):
            points, failures = _series(records, "train", shape, metric, "seqlen", ("batch",))
            _draw(ax, points, failures, lambda g: f" (batch {g[0]})", "length")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"Falcon-H1 {shape} LoRA training — {_device(records)}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"train_{shape}.png"))
    return written


def plot_decode(records: list[dict], out_dir: Path) -> list[Path]:
    Figure = _figure_class()
    written = []
    for shape in _shapes(records, "decode"):
        fig = Figure(figsize=(6, 4.2))
        ax = fig.subplots()
        points, failures = _series(records, "decode", shape, "tokens_per_s", "batch", ("prompt", "new_tokens"))
        _draw(ax, points, failures, lambda g: f" ({g[0]} + {g[1]} new)", "batch")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.suptitle(f"Falcon-H1 {shape} greedy decoding — {_device(records)}", fontsize=10)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"decode_{shape}.png"))
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def make_plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Every plot the records allow; raises MissingMatplotlib without matplotlib."""
    return plot_train(records, out_dir) + plot_decode(records, out_dir)
