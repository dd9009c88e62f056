#!/usr/bin/env bash
# Stage 5 at the thesis' budget (conf.yml: its model sizes, 10 epochs of 4 s windows) on one
# GPU, in calls of at most 10 minutes each: Table IV.3's best row (r14) first, then the other
# rows in table order, as many as fit in --minutes; then the tables (exp/tables/*.md) are built
# from what is finished. Each call goes on where the last one stopped: finished rows are
# skipped, a row cut short resumes from its last checkpoint (local/sweep.py). Call it again
# until it prints "all ... finished". Without --first and the time limit this is
# `./run.sh --stage 5`.
#
#   tools/gpu_tables.sh [--minutes 8] [--python PYTHON] [local.sweep options, --key value ...]
#
# Run from anywhere; it works in the repository root. Needs the data sets of stages 0-2 in
# --data_dir (default data/) and a Python with requirements.txt (default: .venv/bin/python,
# else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=8        # the sweep's share of a 10-minute call; the tables take seconds after it
python=.venv/bin/python
[ -x "$python" ] || python=python3
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" PYTHONUNBUFFERED=1
exec "$python" -m local.sweep --conf conf.yml --first IV3/r14 --time_limit_minutes "$minutes" \
  ${args[@]+"${args[@]}"}
