#!/usr/bin/env bash
# Everything that needs a GPU, in one run: the CUDA tests, the kernel benchmark and sweep, and the
# step throughput benchmark, on a one-GPU machine that already has megatron-lite's dependencies
# (torch, Triton, numpy, pyyaml, sentencepiece, tqdm, safetensors, transformers, pytest,
# pytest-timeout): the install step adds only this checkout (--no-deps), for machines without a
# package index.
#
#   bash tools/gpu_check.sh [OUT_DIR [PART ...]]   # logs and the benchmarks' output land in OUT_DIR
#
# PARTs run in the order given (default: all, in this order):
#   install            this checkout, editable, no dependencies (falls back to PYTHONPATH)
#   bench_kernels      tools/bench/kernels.py: Triton against torch eager (and Liger when installed)
#   tests_gpu          tests/gpu and tests/kernels on the GPU
#   bench_step_small   tools/bench/step_throughput.py on the quickstart model
#   bench_step_1b      the same on a ~0.56B Llama, sequence 2048
#   sweep              tools/bench/kernel_sweep.py: the kernels' tuning knobs
#   bench_compile      tools/bench/kernels.py against torch.compile (slow: inductor compiles each op)
#
# Optional peers that the machine lacks (Liger-Kernel, for the kernels benchmark's liger column) come
# as wheels in .whl/ (git-ignored): `pip download --no-deps -d .whl liger-kernel` here, then carry .whl
# to the GPU machine; they are installed (no index, no dependencies) before the parts run.
#
# Each part has its own time limit, and GPU_CHECK_BUDGET (seconds, default 570) caps the whole run:
# a part gets at most what is left, so the last parts shrink rather than the run overrunning. The
# stdlib corpus that the step benchmarks train on is built in the background from the start. The
# exit status is non-zero when any part failed. The CPU-only suite (tools/run_tests.sh) skips these.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
shift || true
all_parts="install bench_kernels tests_gpu bench_step_small bench_step_1b sweep bench_compile"
wanted=" ${*:-$all_parts} "
for name in $wanted; do
    [[ " $all_parts " == *" $name "* ]] || { echo "unknown part '$name'; parts: $all_parts" >&2; exit 2; }
done
# Without a GPU every part fails or skips (and the 0.56B CPU step can exhaust the RAM): say so at once.
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "tools/gpu_check.sh: no CUDA device here (or no torch for $(command -v python || echo python));" \
        "it runs the GPU-only checks on a GPU machine. Without a GPU: bash tools/run_tests.sh (CPU suite)," \
        "python tools/kernel_static.py (compiles the Triton kernels)" >&2
    exit 2
fi
budget="${GPU_CHECK_BUDGET:-570}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0

part() {  # part NAME SECONDS COMMAND...: run one part, log to OUT/NAME.log, echo its tail
    local name="$1" limit="$2"
    shift 2
    local left=$((budget - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: skipped, ${left}s of the run's budget left"
        status=1
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $((SECONDS - start)) s"
    tail -n 40 "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

install() {
    python -m pip install --no-deps --no-build-isolation -q -e . && return 0
    # the link is what package_dir does for an install (git ignores it); remove it when done
    echo "editable install failed: importing from the checkout (link megatron_lite/kernels -> ../kernels)"
    ln -sfn ../kernels megatron_lite/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/gpu_check_site"
    python -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl >"$out/wheels.log" 2>&1 &&
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" || { status=1; tail -n 5 "$out/wheels.log"; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ "$wanted" == *" install "* ]]; then
    echo "== install"
    install >"$out/install.log" 2>&1 || status=1
    tail -n 5 "$out/install.log"
fi
corpus_pid=""
if [[ "$wanted" == *" bench_step_"* ]]; then  # the corpus cache the step benchmarks' Trainer reads
    python -c "from megatron_lite.data.corpus import prepare_default_corpus as p; p('.cache/megatron-lite', 8192)" \
        >"$out/corpus.log" 2>&1 &
    corpus_pid=$!
fi
for name in $wanted; do
    case "$name" in
    bench_kernels) part bench_kernels 120 python tools/bench/kernels.py --impls triton,eager,liger ;;
    tests_gpu) part tests_gpu 200 python -m pytest tests/gpu tests/kernels -q --timeout=150 -rfE ;;
    bench_step_small | bench_step_1b)
        if [ -n "$corpus_pid" ]; then
            wait "$corpus_pid" || { status=1; tail -n 5 "$out/corpus.log"; }
            corpus_pid=""
        fi
        if [ "$name" = bench_step_small ]; then
            part bench_step_small 60 python tools/bench/step_throughput.py --steps 10
        else
            part bench_step_1b 110 python tools/bench/step_throughput.py --steps 6 --layers 12 --hidden 2048 \
                --heads 16 --kv-heads 4 --ffn 5632 --seq 2048 --batch 4
        fi
        ;;
    sweep) part sweep 180 python tools/bench/kernel_sweep.py ;;
    bench_compile) part bench_compile 300 python tools/bench/kernels.py --impls compile ;;
    esac
done
exit $status
