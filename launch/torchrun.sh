#!/usr/bin/env bash
# Train under torchrun on one machine or several (c10d rendezvous hosted by the first machine).
#   One machine, all its GPUs (a global batch of micro batch x dp, or a multiple; its own log.dir):
#     bash launch/torchrun.sh --config configs/quickstart.yaml train.global_batch_size=64 log.dir=runs/dp8  # 8 GPUs
#   Two machines: run on each, with the first one's host name or address as MASTER_ADDR:
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash launch/torchrun.sh --config FILE [overrides]  # host0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 bash launch/torchrun.sh --config FILE [overrides]  # host1
#   CPU processes instead of GPUs (gloo): NPROC_PER_NODE=2 bash launch/torchrun.sh --config FILE
# Rendezvous id: the same on every machine of a job, and each job its own. By default the scheduler's
# job id (SLURM_JOB_ID, PBS_JOBID or LSB_JOBID), else a checksum of what every machine is given alike:
# MASTER_ADDR:MASTER_PORT, NNODES and the arguments, so give each machine the same arguments (the same
# config path and overrides) or set RDZV_ID. One id for every job would let a second job on the same
# endpoint join the first one's rendezvous, where torchrun restarts a job's workers for each newcomer.
# Under SLURM use launch/train.sbatch (or `megatron-lite launch slurm`), which runs torchrun the same way.
# A machine that never joins: the others wait RDZV_TIMEOUT seconds (default 600, torchrun's own), then
# exit 1 with one line naming the rendezvous (megatron_lite/launcher/torchrun.py).
# Signals: SIGTERM to torchrun reaches the ranks, which save a checkpoint and exit 0, while torchrun
# exits 1 (SignalException, its own behaviour); ranks whose torchrun was SIGKILLed get SIGTERM too.
# torchrun runs as megatron_lite.launcher.torchrun, which passes SIGUSR1 on to the ranks (they save and
# exit 0, and so does torchrun) instead of dying of it.
set -euo pipefail

# ---- cluster specifics (environment variables of the same name override these) ----------------
NNODES=${NNODES:-1}                    # machines in the job
NODE_RANK=${NODE_RANK:-0}              # this machine's index 0..NNODES-1 (used by RDZV_BACKEND=static)
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}  # ranks per machine: a number, or gpu (every visible GPU)
MASTER_ADDR=${MASTER_ADDR:-}           # first machine's host name or address (needed when NNODES > 1)
MASTER_PORT=${MASTER_PORT:-29500}      # rendezvous port on it, reachable from every machine
RDZV_BACKEND=${RDZV_BACKEND:-c10d}     # c10d (machines join in any order) or static (by NODE_RANK)
RDZV_ID=${RDZV_ID:-}                   # the same on every machine of a job, new for each job (default: above)
RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}      # seconds the machines wait for each other at the rendezvous (c10d or static)
PYTHON=${PYTHON:-python3}              # the interpreter with megatron-lite installed

# Every value is checked before torchrun starts: one line for each bad one, naming what is accepted,
# and exit 2 (megatron_lite/launcher/launch_vars.py; MASTER_ADDR must also resolve, where torchrun's
# rendezvous would retry an unknown host for minutes). On the machine that hosts the rendezvous of
# several (NODE_RANK=0; under c10d, where MASTER_ADDR names it) MASTER_PORT must be free, where torchrun
# would wait on whatever holds it: the line names the holder (launcher/rendezvous_port.py).
if ! command -v "$PYTHON" >/dev/null; then
  echo "launch/torchrun.sh: PYTHON=$PYTHON is not a command here: set PYTHON to the interpreter with megatron-lite" \
       "installed" >&2
  exit 2
fi
"$PYTHON" -m megatron_lite.launcher.launch_vars launch/torchrun.sh NNODES="$NNODES" NODE_RANK="$NODE_RANK" \
  NPROC_PER_NODE="$NPROC_PER_NODE" MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" RDZV_BACKEND="$RDZV_BACKEND" \
  RDZV_TIMEOUT="$RDZV_TIMEOUT" \
  || { status=$?; [ "$status" -eq 2 ] || echo "launch/torchrun.sh: PYTHON=$PYTHON cannot run megatron-lite (see above):" \
       "set PYTHON to the interpreter with megatron-lite installed" >&2; exit 2; }
if [ "$NPROC_PER_NODE" = gpu ]; then
  # every visible GPU, counted as torchrun counts them for `gpu` (CUDA_VISIBLE_DEVICES applies), so
  # that the thread setting below sees the number of ranks
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" \
    2>/dev/null) || NPROC_PER_NODE=0
  if ! [ "$NPROC_PER_NODE" -ge 1 ] 2>/dev/null; then
    echo "launch/torchrun.sh: no CUDA device here (or no torch for $PYTHON); for CPU ranks set" \
         "NPROC_PER_NODE=<ranks>, e.g. NPROC_PER_NODE=4 bash launch/torchrun.sh ..." >&2
    exit 2
  fi
fi
# one thread per rank: torchrun's own default for several ranks on a machine, set here so that
# torchrun does not print its four-line warning about it into every job's log (launch/train.sbatch
# does the same); one rank keeps every core, as under torchrun
[ "$NPROC_PER_NODE" -eq 1 ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" -eq 1 ]; then
  # --standalone: a private rendezvous on a free local port; nothing to configure.
  exec "$PYTHON" -m megatron_lite.launcher.torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" \
    -m megatron_lite.train "$@"
fi
if [ -z "$RDZV_ID" ]; then
  JOB_ID=${SLURM_JOB_ID:-${PBS_JOBID:-${LSB_JOBID:-}}}
  if [ -n "$JOB_ID" ]; then
    RDZV_ID="megatron-lite-$JOB_ID"
  else
    RDZV_ID="megatron-lite-$(printf '%s\n' "$MASTER_ADDR:$MASTER_PORT" "$NNODES" "$@" | cksum | cut -d' ' -f1)"
  fi
fi
# machines that wait for each other in vain (given other arguments, so another id) show it here
echo "launch/torchrun.sh: rendezvous $RDZV_ID at $MASTER_ADDR:$MASTER_PORT for $NNODES machines" >&2
exec "$PYTHON" -m megatron_lite.launcher.torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC_PER_NODE" --rdzv_backend="$RDZV_BACKEND" --rdzv_id="$RDZV_ID" \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_conf=join_timeout="$RDZV_TIMEOUT",timeout="$RDZV_TIMEOUT" -m megatron_lite.train "$@"
