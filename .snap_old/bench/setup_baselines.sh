#!/usr/bin/env bash
# Prepare .baseline/ for the hf-kernels baseline (transformers + mamba_ssm's Mamba-2 Triton kernels) without any
# CUDA compile, on a machine with PyPI access; the GPU machine then only needs the folder (carry it along).
#
#   bash bench/setup_baselines.sh [DEST]        # DEST defaults to .baseline at the repository root (git-ignored)
#
# DEST/ afterwards:
#   mamba_ssm-2.3.2.post1/   causal_conv1d-1.7.0/   the unpacked source distributions (not built)
#   pydeps/                  einops, which mamba_ssm imports (pure Python)
#   stub/                    bench/baseline_stubs/*.py: stand-ins for the two CUDA extensions
# gyrfalcon bench puts these on the import path of the hf-kernels worker only (gyrfalcon/benchmark/runner.py).
# Uses the `python` on PATH (activate the project's environment first). Safe to run again.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.baseline}"
python="${PYTHON:-python}"
mkdir -p "$dest"

# The two sdists, downloaded, not built: their setup.py must not try nvcc while pip reads their metadata.
export MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE
if [ ! -f "$dest/mamba_ssm-2.3.2.post1.tar.gz" ] || [ ! -f "$dest/causal_conv1d-1.7.0.tar.gz" ]; then
  "$python" -m pip download --no-deps --no-build-isolation --no-binary :all: \
    mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 -d "$dest"
fi
for name in mamba_ssm-2.3.2.post1 causal_conv1d-1.7.0; do
  [ -d "$dest/$name" ] || tar -xzf "$dest/$name.tar.gz" -C "$dest"
done

if [ ! -d "$dest/pydeps/einops" ]; then
  "$python" -m pip download --no-deps --only-binary :all: einops==0.8.2 -d "$dest"
  "$python" -m zipfile -e "$dest"/einops-0.8.2-py3-none-any.whl "$dest/pydeps"
fi

mkdir -p "$dest/stub"
cp "$root"/bench/baseline_stubs/*.py "$dest/stub/"

# Check: with this path, the kernels import (Triton needed; no GPU needed).
PYTHONPATH="$dest/stub:$dest/mamba_ssm-2.3.2.post1:$dest/causal_conv1d-1.7.0:$dest/pydeps" "$python" -c \
  "import mamba_ssm.ops.triton.ssd_combined, mamba_ssm.ops.triton.selective_state_update, causal_conv1d" \
  && echo "baseline sources ready in $dest ($(du -sh "$dest" | cut -f1))" \
  || echo "warning: the kernels do not import here (is triton installed?); the folder is still complete" >&2
