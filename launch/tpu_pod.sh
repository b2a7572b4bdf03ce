#!/usr/bin/env bash
# Runs an experiment on every worker of a Cloud TPU VM (a pod slice or a single host):
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh alignment_sweep --out=/mnt/shared/runs/x
# 1. copies this working tree (without .git, .venv, runs/) to ~/$REMOTE_DIR on every worker,
# 2. installs JAX for TPU and the package there (SKIP_INSTALL=1 skips it on reruns),
# 3. runs `python3 -m experiments.<experiment> <flags>` on every worker at once; JAX finds the
#    pod's workers itself (jax.distributed), process 0 merges and writes the report.
# --out must be a directory every worker sees (NFS or Filestore mounted at the same path):
# each worker writes its own parts there. DRY_RUN=1 prints the gcloud commands only.
set -euo pipefail
LAUNCHER="tpu_pod.sh"
PLATFORM_NOTE="on every worker of TPU VM \$TPU in \$ZONE, JAX_PLATFORMS=tpu"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: TPU=<tpu-vm name> ZONE=<zone> launch/$LAUNCHER <experiment> [--flag=value ...]"
  echo "env: PROJECT (gcloud --project), REMOTE_DIR (default gradalign_jax, under ~ on each" \
       "worker), JAX_SPEC (default 'jax[tpu]'), SKIP_COPY=1, SKIP_INSTALL=1, DRY_RUN=1" \
       "(print the commands), GCLOUD (default gcloud)"
fi
parse_experiment "$@"
shift
missing=()
[[ -n "${TPU:-}" ]] || missing+=(TPU)
[[ -n "${ZONE:-}" ]] || missing+=(ZONE)
if ((${#missing[@]})); then
  echo "launch/$LAUNCHER: set ${missing[*]} (the TPU VM's name and zone, as in" \
       "\`gcloud compute tpus tpu-vm list --zone=...\`)" >&2
  exit 2
fi
GCLOUD="${GCLOUD:-gcloud}"
REMOTE_DIR="${REMOTE_DIR:-gradalign_jax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
TPU_ARGS=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && TPU_ARGS+=(--project="$PROJECT")

# Prints a command (shell-quoted) with DRY_RUN=1, runs it otherwise.
step() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

q() { (($#)) && printf '%q ' "$@" | sed 's/ $//'; return 0; }

if [[ "${SKIP_COPY:-0}" != 1 ]]; then
  tarball="${TMPDIR:-/tmp}/gradalign_jax-$$.tar.gz"
  step tar -czf "$tarball" -C "$ROOT" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ .
  step "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU:gradalign_jax.tar.gz" "${TPU_ARGS[@]}"
  step "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${TPU_ARGS[@]}" --command="mkdir -p ~/$(q "$REMOTE_DIR") && tar -xzf ~/gradalign_jax.tar.gz -C ~/$(q "$REMOTE_DIR")"
  [[ "${DRY_RUN:-0}" == 1 ]] || rm -f "$tarball"
fi
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  step "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${TPU_ARGS[@]}" --command="python3 -m pip install -U $(q "$JAX_SPEC") && python3 -m pip install -e ~/$(q "$REMOTE_DIR")"
fi
# Every worker runs the same command; JAX reads the pod's layout from the TPU metadata.
RUN="cd ~/$(q "$REMOTE_DIR") && JAX_PLATFORMS=tpu python3 -m experiments.$EXPERIMENT"
(($#)) && RUN+=" $(q "$@")"
step "$GCLOUD" compute tpus tpu-vm ssh "$TPU" "${TPU_ARGS[@]}" --command="$RUN"
