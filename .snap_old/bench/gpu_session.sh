#!/usr/bin/env bash
# What CPU runs cannot check: the GPU tests, then the decode, training-step and QLoRA scripts, each under its own
# time limit so one slow part cannot take the others with it. Logs and JSON lines go to OUT (default runs/gpu).
# The limits add up to more than one 10-minute device call: run it as two calls, `tests` then the rest. The
# benchmark harness (bench/run.py) needs calls of its own.
#
#     OUT=$OUT bash bench/gpu_session.sh tests                 # call 1 (up to 6 minutes)
#     OUT=$OUT bash bench/gpu_session.sh "decode train qlora"  # call 2 (up to 7.5 minutes)
#
# bitsandbytes (QLoRA) is optional: where it is missing its tests skip and the qlora part says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${1:-tests decode train qlora}

run() {  # run NAME SECONDS COMMAND...: output to OUT/NAME.log, status line to stdout
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name] exit $rc in $((SECONDS - start)) s (limit $limit s): $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"
}

for part in $parts; do
    case $part in
        tests)
            run gpu_tests 360 python -m pytest -q -p no:cacheprovider -m gpu tests/test_step_graph.py \
                tests/test_kernels_fused.py tests/test_kernels_decode_attention.py tests/test_kernels_skinny.py \
                tests/test_kernels_mamba_decode.py tests/test_generate.py \
                tests/test_activation_offload.py tests/test_train.py tests/test_quant.py tests/test_gpu_model.py ;;
        decode)
            run decode 200 python bench/decode.py --only 0.5B-b1 0.5B-b64 7B-b1 --no-transformers ;;
        skinny)
            run skinny_kernels 150 python bench/skinny_kernels.py --configs ;;
        mamba)
            run mamba_decode_kernels 90 python bench/mamba_decode_kernels.py --sweep ;;
        train)
            run profile_train 150 python bench/profile_train.py ;;
        qlora)
            run qlora 100 python bench/qlora_memory.py --steps 2 ;;
        *)
            echo "unknown part $part (tests | decode | skinny | mamba | train | qlora)" >&2
            exit 2 ;;
    esac
done
