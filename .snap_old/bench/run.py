"""Run the benchmark suites: gyrfalcon against transformers + PEFT (hf-kernels, hf-torch), in one call.

    bash bench/setup_baselines.sh                  # once, on a machine with PyPI: prepares .baseline/
    python bench/run.py                            # the default plan (< 9 min on an H100) -> runs/bench/
    python bench/run.py --plan extra --resume      # decode and kernels at the same shapes, a second call
    python bench/run.py --plan sweep --resume      # the sequence-length and batch sweeps, in further calls
    python bench/run.py --plan maxlen --shapes 0.5B
    python bench/run.py --shapes tiny --device cpu --dtype float32 --systems gyrfalcon,hf-torch   # smoke run
    python bench/run.py --help

Same as `gyrfalcon bench run ...`; see gyrfalcon/benchmark/ and docs/benchmarks.md.
"""

import sys
from pathlib import Path


def main() -> int:
    try:
        from gyrfalcon.benchmark.cli import main as bench
    except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from gyrfalcon.benchmark.cli import main as bench
    return bench(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
