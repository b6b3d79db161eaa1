#!/usr/bin/env bash
# Everything that needs a GPU, in one run: the CUDA tests, the kernel benchmark and the step
# throughput benchmark, on a one-GPU machine that already has megatron-lite's dependencies (torch,
# Triton, numpy, pyyaml, sentencepiece, tqdm, safetensors, transformers, pytest, pytest-timeout):
# the install step adds only this checkout (--no-deps), for machines without a package index.
#
#   bash tools/gpu_check.sh [OUT_DIR [PART ...]]   # logs and the benchmarks' output land in OUT_DIR
#
# PARTs (default: all, in this order): install tests_gpu bench_kernels bench_step_small bench_step_1b.
#
# Each part has its own time limit, so one slow part cannot starve the rest; the exit status is
# non-zero when any part failed. The limits add up to under 10 minutes. The CPU-only suite
# (tools/run_tests.sh) skips these tests.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
shift || true
all_parts="install tests_gpu bench_kernels bench_step_small bench_step_1b"
wanted=" ${*:-$all_parts} "
for name in $wanted; do
    [[ " $all_parts " == *" $name "* ]] || { echo "unknown part '$name'; parts: $all_parts" >&2; exit 2; }
done
mkdir -p "$out"
status=0

part() {  # part NAME SECONDS COMMAND...: run one part, log to OUT/NAME.log, echo its tail
    local name="$1" limit="$2"
    shift 2
    [[ "$wanted" == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $((SECONDS - start)) s"
    tail -n 25 "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
part install 60 python -m pip install --no-deps --no-build-isolation -q -e .
part tests_gpu 220 python -m pytest tests/gpu tests/kernels -q -x -p no:cacheprovider
part bench_kernels 150 python tools/bench/kernels.py
part bench_step_small 50 python tools/bench/step_throughput.py --steps 10
part bench_step_1b 110 python tools/bench/step_throughput.py --steps 6 --layers 12 --hidden 2048 \
    --heads 16 --kv-heads 4 --ffn 5632 --seq 2048 --batch 4
exit $status
