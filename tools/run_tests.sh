#!/usr/bin/env bash
# Set up .venv (once) and run lint, format check and the whole test suite.
#   bash tools/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
ruff check .
ruff format --check .
python -m pytest "$@"
