# Kaldi-style option parsing, sourced by run.sh after it declares its variables:
#   --name value  or  --name=value   sets the already-declared shell variable "name"
#   (dashes in names become underscores); an undeclared name is an error, and so is a name
#   not in "$_po_options" (space-separated) when the caller sets it;
#   --help / -h prints "$help_message" and exits.
# Positional arguments after the options are left in "$@".
# shellcheck shell=bash

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h)
      printf '%s\n' "${help_message:-No help message.}"
      exit 0 ;;
    --*=*)
      _po_name="${1%%=*}"; _po_name="${_po_name#--}"; _po_value="${1#*=}"; shift ;;
    --*)
      _po_name="${1#--}"
      if [ $# -lt 2 ]; then
        echo "$0: option --${_po_name} needs a value" >&2; exit 1
      fi
      _po_value="$2"; shift 2 ;;
    *) break ;;
  esac
  _po_name="${_po_name//-/_}"
  if [[ ! "$_po_name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ -z "${!_po_name+set}" ] ||
      { [ -n "${_po_options:-}" ] && [[ " $_po_options " != *" $_po_name "* ]]; }; then
    echo "$0: unknown option --${_po_name} (see $0 --help)" >&2
    exit 1
  fi
  printf -v "$_po_name" '%s' "$_po_value"
  _po_set+=" $_po_name"
done
unset _po_name _po_value
true
