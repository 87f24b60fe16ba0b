"""Make the benchmark plots and regenerate the figures section of docs/benchmarks.md from JSONL results.

    python bench/plot.py bench/results/2026-11-24_h100.jsonl [more.jsonl ...]
    python bench/plot.py RESULTS.jsonl --plots docs/plots --doc docs/benchmarks.md
    python bench/plot.py RESULTS.jsonl --no-plots        # tables only (no matplotlib needed)

Writes docs/plots/train_<shape>.png (tokens/s and peak memory vs sequence length) and decode_<shape>.png
(tokens/s vs batch), and rewrites the text between the figure markers of docs/benchmarks.md. Same as
`gyrfalcon bench report ...`. Needs matplotlib for the plots.
"""

import sys
from pathlib import Path


def main() -> int:
    try:
        from gyrfalcon.benchmark.cli import main as bench
    except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from gyrfalcon.benchmark.cli import main as bench
    return bench(["report", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
