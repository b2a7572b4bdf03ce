# Shared by the local launchers (sourced, not run): usage, experiment-name check, PYTHONPATH.
# The caller sets LAUNCHER (its file name) and PLATFORM_NOTE (one line for the usage text).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# The experiment modules: experiments/*.py but __init__ and private helpers.
EXPERIMENTS=()
for _f in "$ROOT"/experiments/*.py; do
  _f="$(basename "$_f" .py)"
  [[ "$_f" == _* ]] || EXPERIMENTS+=("$_f")
done

usage() {
  cat <<USAGE
usage: launch/$LAUNCHER <experiment> [--flag=value ...]

Runs \`\$PYTHON -m experiments.<experiment>\` with the flags given ($PLATFORM_NOTE).
Experiments: ${EXPERIMENTS[*]}
Each experiment's flags: launch/$LAUNCHER <experiment> --help
Python: \$PYTHON (now: $PYTHON)
USAGE
}

# Checks $1 (an experiment name; "name.py" and "experiments/name.py" are accepted too) and
# sets EXPERIMENT, or prints the usage and exits.
parse_experiment() {
  if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -eq 0 ]] && exit 2
    exit 0
  fi
  EXPERIMENT="${1#experiments/}"
  EXPERIMENT="${EXPERIMENT%.py}"
  local e
  for e in "${EXPERIMENTS[@]}"; do
    [[ "$e" == "$EXPERIMENT" ]] && return 0
  done
  echo "launch/$LAUNCHER: unknown experiment '$1'; choose one of: ${EXPERIMENTS[*]}" >&2
  exit 2
}

# The repository on the path, so the launchers work without \`pip install -e .\`.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
