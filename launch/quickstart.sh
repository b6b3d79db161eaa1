#!/usr/bin/env bash
# Set up a CPU virtual environment (once) and train the quickstart model on the stdlib corpus.
#   bash launch/quickstart.sh [section.key=value ...]
# Rerunning resumes from the newest checkpoint in runs/quickstart/checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
exec megatron-lite train --config configs/quickstart.yaml "$@"
