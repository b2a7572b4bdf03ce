#!/usr/bin/env bash
# Runs an experiment as N processes of one jax.distributed job on this machine, over loopback:
#   launch/local_multiprocess.sh 2 alignment_sweep --out=runs/x
# Each process does its share of the question groups; process 0 merges and writes the report.
# Each process's output goes to $LOG_DIR/process-<k>.log (pid in process-<k>.pid); when one
# fails the others are stopped and the launcher exits with its status. A rerun of the same
# command resumes (only unfinished groups are redone). DRY_RUN=1 prints the commands only.
# On a multi-GPU machine, ONE_GPU_EACH=1 gives process k GPU k (CUDA_VISIBLE_DEVICES=k, JAX on
# cuda): launch/local_multiprocess.sh 8 alignment_sweep ... on an 8-GPU node is data=8.
set -euo pipefail
LAUNCHER="local_multiprocess.sh"
PLATFORM_NOTE="as N processes over 127.0.0.1, JAX_PLATFORMS=\${JAX_PLATFORMS:-cpu}"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: launch/$LAUNCHER N <experiment> [--flag=value ...]  (N: processes)"
  echo "env: LOG_DIR (default: a new directory under \${TMPDIR:-/tmp}), PORT (default: a free" \
       "one), JAX_PLATFORMS (default: cpu), ONE_GPU_EACH=1 (process k on GPU k), DRY_RUN=1" \
       "(print the commands, run nothing)"
  usage
  [[ $# -eq 0 ]] && exit 2
  exit 0
fi
N="$1"
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/$LAUNCHER: N='$N' is not a positive number of processes;" \
       "usage: launch/$LAUNCHER N <experiment> [--flag=value ...]" >&2
  exit 2
fi
shift
parse_experiment "$@"
shift
for arg in "$@"; do  # an experiment's --help needs no job
  [[ "$arg" == --help* ]] && exec "$PYTHON" -m "experiments.$EXPERIMENT" "$@"
done

ONE_GPU_EACH="${ONE_GPU_EACH:-0}"
if [[ "$ONE_GPU_EACH" == 1 ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi
# The environment of process $1 (its place in the job and, with ONE_GPU_EACH=1, its GPU).
process_env() {
  local env=("GRADALIGN_JAX_COORDINATOR=127.0.0.1:$PORT" "GRADALIGN_JAX_NUM_PROCESSES=$N"
             "GRADALIGN_JAX_PROCESS_ID=$1")
  [[ "$ONE_GPU_EACH" == 1 ]] && env+=("CUDA_VISIBLE_DEVICES=$1")
  echo "${env[*]}"
}
if [[ -z "${PORT:-}" ]]; then
  # A port the kernel hands out is free now; process 0 binds it a second later.
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
LOG_DIR="${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gradalign_jax-$EXPERIMENT.XXXXXX")}"
mkdir -p "$LOG_DIR"

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for ((k = 0; k < N; k++)); do
    echo "$(process_env "$k") $PYTHON -m experiments.$EXPERIMENT $* >$LOG_DIR/process-$k.log 2>&1"
  done
  exit 0
fi

PIDS=()
stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
echo "launch/$LAUNCHER: $N processes of experiments.$EXPERIMENT, coordinator 127.0.0.1:$PORT," \
     "logs in $LOG_DIR" >&2
for ((k = 0; k < N; k++)); do
  # shellcheck disable=SC2046  # process_env's words are NAME=value pairs without spaces
  env $(process_env "$k") "$PYTHON" -m "experiments.$EXPERIMENT" "$@" \
    >"$LOG_DIR/process-$k.log" 2>&1 &
  PIDS+=("$!")
  echo "$!" >"$LOG_DIR/process-$k.pid"
done

LEFT=("${PIDS[@]}")
while ((${#LEFT[@]})); do
  finished=""
  status=0
  wait -n -p finished "${LEFT[@]}" || status=$?
  rest=()
  for p in "${LEFT[@]}"; do [[ "$p" == "$finished" ]] || rest+=("$p"); done
  LEFT=("${rest[@]+"${rest[@]}"}")
  ((status == 0)) && continue
  for ((k = 0; k < N; k++)); do
    [[ "${PIDS[$k]}" == "$finished" ]] && break
  done
  echo "launch/$LAUNCHER: process $k (pid $finished) failed with status $status; stopping" \
       "the others. The end of $LOG_DIR/process-$k.log:" >&2
  tail -n 15 "$LOG_DIR/process-$k.log" >&2 || true
  stop_all
  wait || true
  exit "$status"
done
tail -n 1 "$LOG_DIR/process-0.log"
