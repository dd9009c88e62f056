#!/usr/bin/env bash
# The project's test command (README and .ci/run call exactly this).
# Creates .venv from requirements.txt when it is missing or older than requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .venv/.requirements-installed ] || [ requirements.txt -nt .venv/.requirements-installed ]; then
  utils/prepare_python_env.sh .venv
fi
exec .venv/bin/python -m pytest -q "$@" tests
