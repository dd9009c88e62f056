#!/usr/bin/env bash
# BirdSep: Conv-TasNet separation of overlapping bird sounds (asteroid-style recipe).
set -euo pipefail
caller_dir=$PWD       # a relative --conf is found from here (the other paths: from the recipe)
cd "$(dirname "$0")"
# Idle OpenMP threads sleep instead of spinning: spinning threads slow training down badly on a
# busy machine (RESULTS.md, Speed).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

cmdline="$0 $(printf '%q ' "$@")"

log() { echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${BASH_SOURCE[1]##*/}:${BASH_LINENO[0]}) $*"; }

# ---- Options (every tunable is declared here, above parse_options.sh) ----
stage=0               # first stage to run
stop_stage=""         # last stage to run (empty: 4, or --stage if above 4; the sweeps run only when asked)
conf=conf.yml         # recipe configuration; each of its second-level keys is also an option
data_dir=data         # where downloads, clips and mixtures go
exp_root=exp          # where experiments go
tag=""                # experiment name; derived from --conf and the overrides when empty
xc_source=https://xeno-canto.org/api/3/recordings  # API URL, or a local dump directory
tables="IV2 IV3 IV4"  # stage 5: which of the thesis' tables to sweep (local/thesis_tables/table_*.csv)
librimix_dir=""       # stage 5: a LibriMix tree for Table IV.4 (empty: those rows are not run)
wsj0_2mix_dir=""      # stage 5: a wsj0-2mix tree for Table IV.4 (empty: those rows are not run)
python=.venv/bin/python

help_message="Usage: $0 [options]
Stages:
  0  download xeno-canto recordings (API v3 with \$XC_API_KEY, or a local dump via --xc_source)
  1  cut vocalisation clips, resample, split by recording or species
  2  build BSD-2mix and BSD-3mix (mixtures of different species)
  3  train Conv-TasNet (exp/<tag>/)
  4  evaluate on the test split (exp/<tag>/eval/)
  5  sweeps and thesis tables (exp/tables/): one experiment per row of Tables IV.2-IV.4,
     each in exp/<tag derived from the row>, at the budget of --epochs / --max_minutes
Options:
  --stage N          first stage (default: $stage)
  --stop_stage N     last stage (default: 4, or --stage when that is 5: stage 5 runs only when asked)
  --conf FILE        configuration, relative to the current directory (default: $conf in the
                     recipe; conf_cpu.yml is a 2-core CPU preset)
  --data_dir DIR     data directory (default: $data_dir)
  --exp_root DIR     experiments directory (default: $exp_root)
  --tag NAME         experiment name (default: derived from --conf and overrides)
  --xc_source SRC    xeno-canto API URL or local dump directory (default: $xc_source)
  --tables LIST      stage 5: tables to sweep and build (default: \"$tables\")
  --librimix_dir DIR stage 5: LibriMix tree (Libri2Mix/wav8k/min/...) for Table IV.4 (default: none)
  --wsj0_2mix_dir DIR  stage 5: wsj0-2mix tree (wav8k/min/{tr,cv,tt}) for Table IV.4 (default: none)
  --python PATH      Python interpreter (default: $python, created by utils/prepare_python_env.sh)
  --KEY VALUE        override any second-level key of the conf file, e.g. --sample_rate 16000
Examples:
  XC_API_KEY=... $0                                   # everything, live API
  $0 --xc_source ../shared/xeno-canto --stop_stage 2  # data sets from a local dump
  $0 --stage 3 --stop_stage 4 --conf conf_cpu.yml --max_minutes 30 --tag cpu30
  $0 --stage 5 --conf conf_cpu.yml --max_minutes 2 --tables IV2  # scaled-down sweep"

run_options="stage stop_stage conf data_dir exp_root tag xc_source tables librimix_dir wsj0_2mix_dir python"

# --help needs no conf file and no Python.
for arg in "$@"; do
  case "$arg" in --help|-h) printf '%s\n' "$help_message"; exit 0 ;; esac
done

# The conf file's keys are options too, so --conf and --python are needed before parsing.
conf_arg=""
for ((i = 1; i <= $#; i++)); do
  j=$((i + 1))
  case "${!i}" in
    --conf) conf_arg="${!j:-}" ;;
    --conf=*) conf_arg="${!i#--conf=}" ;;
    --python) python="${!j:-}" ;;
    --python=*) python="${!i#--python=}" ;;
  esac
done
if [ -n "$conf_arg" ] && [[ "$conf_arg" != /* ]]; then
  conf_arg="$caller_dir/$conf_arg"
fi
conf=${conf_arg:-$conf}

# A fresh clone has no .venv yet: create it before asking Python for the conf keys.
if [ "$python" = .venv/bin/python ] && { [ ! -f .venv/.requirements-installed ] ||
    [ requirements.txt -nt .venv/.requirements-installed ]; }; then
  log "Setting up the Python environment (.venv)"
  utils/prepare_python_env.sh .venv
fi

# Every conf key (a preset's: its base's, as utils/config.py reads it) is an option, empty when
# not overridden.
conf_keys=$("$python" -m utils.config --keys "$conf") || {
  echo "$0: cannot read the conf keys of --conf $conf (see above)" >&2; exit 1; }
conf_keys=${conf_keys//$'\n'/ }
for key in $conf_keys; do
  printf -v "$key" '%s' ""
done

_po_set=""
_po_options="$run_options $conf_keys"   # parse_options.sh refuses any other name
. utils/parse_options.sh
[ -z "$conf_arg" ] || conf=$conf_arg    # resolved from the caller's directory

if [ $# -gt 0 ]; then
  echo "$0: unexpected argument(s): $*" >&2; exit 1
fi
for opt in stage stop_stage; do
  if [ -n "${!opt}" ] && [[ ! "${!opt}" =~ ^[0-5]$ ]]; then
    echo "$0: --$opt ${!opt}: expected a stage number, 0 to 5" >&2; exit 1
  fi
done
[ -n "$stage" ] || { echo "$0: --stage: expected a stage number, 0 to 5" >&2; exit 1; }
# Stage 5 trains one model per table row: never part of a plain ./run.sh.
if [ -z "$stop_stage" ]; then
  stop_stage=$(( stage > 4 ? stage : 4 ))
fi
if [ "$stage" -gt "$stop_stage" ]; then
  echo "$0: --stage $stage is after --stop_stage $stop_stage: no stage to run" >&2; exit 1
fi

# Conf overrides given on the command line, passed on to every stage script.
overrides=()
tag_suffix=""
for key in $conf_keys; do
  if [[ " $_po_set " == *" $key "* ]]; then
    overrides+=("--$key" "${!key}")
    tag_suffix+="_${key}${!key}"
  fi
done

if [ -z "$tag" ]; then
  tag="$(basename "${conf%.*}")${tag_suffix}"
  tag="${tag//[^A-Za-z0-9_.=-]/}"
fi
exp_dir="$exp_root/$tag"

common=(--conf "$conf")

if [ "$stage" -le 0 ] && [ "$stop_stage" -ge 0 ]; then
  log "Stage 0: download xeno-canto recordings"
  "$python" -m local.download "${common[@]}" --data_dir "$data_dir" --xc_source "$xc_source" "${overrides[@]}"
fi

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  log "Stage 1: vocalisation clips"
  "$python" -m local.clips "${common[@]}" --data_dir "$data_dir" "${overrides[@]}"
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  log "Stage 2: BSD-2mix and BSD-3mix"
  "$python" -m local.mixtures "${common[@]}" --data_dir "$data_dir" "${overrides[@]}"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  log "Stage 3: train Conv-TasNet in $exp_dir"
  mkdir -p "$exp_dir"
  "$python" train.py "${common[@]}" --data_dir "$data_dir" --exp_dir "$exp_dir" --run_command "$cmdline" "${overrides[@]}"
fi

if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then
  log "Stage 4: evaluate $exp_dir"
  "$python" eval.py --data_dir "$data_dir" --exp_dir "$exp_dir" "${overrides[@]}"
fi

if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
  log "Stage 5: sweeps for tables $tables, markdown tables in $exp_root/tables"
  if [[ " $_po_set " == *" tag "* ]]; then
    log "Stage 5: --tag $tag is not used here: each table row trains in $exp_root/<tag derived from the row>"
  fi
  "$python" -m local.sweep "${common[@]}" --data_dir "$data_dir" --exp_root "$exp_root" \
    --tables "$tables" --librimix_dir "$librimix_dir" --wsj0_2mix_dir "$wsj0_2mix_dir" "${overrides[@]}"
fi

log "Done (stages $stage to $stop_stage)."
