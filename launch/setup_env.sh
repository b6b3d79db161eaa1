#!/usr/bin/env bash
# Source me: create .venv (once) and install megatron-lite with its CPU torch pin and dev tools.
#   source launch/setup_env.sh
# On a GPU machine with torch already installed, `pip install -e .[dev,hf]` instead keeps that torch.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import megatron_lite, pytest, transformers" 2>/dev/null || [ requirements/cpu.txt -nt "$VENV/.installed" ] \
   || [ setup.py -nt "$VENV/.installed" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements/cpu.txt
  python -c "import torch; torch.version.cuda and print(f'warning: pip installed torch {torch.__version__}, a CUDA build' \
    ' (several GB), not the CPU wheel requirements/cpu.txt asks for; see the comments there')"
  touch "$VENV/.installed"
fi
