#!/usr/bin/env bash
# Create the recipe's virtual environment (.venv by default) and install requirements.txt.
# Usage: utils/prepare_python_env.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "$0: Python >= 3.10 is needed ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements.txt
# Fail here, not in stage 3, if the torch/torchaudio/asteroid stack does not import.
"$venv/bin/python" -c 'import torch, torchaudio, asteroid, soundfile, pytorch_lightning; print(f"python env ready: torch {torch.__version__}, torchaudio {torchaudio.__version__}, asteroid {asteroid.__version__}")'
touch "$venv/.requirements-installed"
