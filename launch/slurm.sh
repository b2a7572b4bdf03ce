#!/usr/bin/env bash
# An sbatch script for GPU clusters: one process per GPU, every process one jax.distributed job.
#   sbatch launch/slurm.sh alignment_sweep --out=/shared/runs/x          (from the repository)
#   sbatch --nodes=4 launch/slurm.sh alignment_sweep --out=/shared/runs/x
# srun starts the tasks; JAX reads the job's layout from SLURM's variables (coordinator on
# the first node, process id = task id, each task its own GPU by SLURM_LOCALID). Every task
# must see all of its node's GPUs (--gpus-per-node, not --gpus-per-task=1, which hides all but
# one and leaves JAX asking for GPU SLURM_LOCALID: jax-ml/jax#28194). Process 0
# merges and writes the report; a resubmission resumes (only unfinished groups are redone).
# --out must be on a filesystem every node sees. The #SBATCH lines are defaults: override
# them on the sbatch command line. DRY_RUN=1 bash launch/slurm.sh ... prints the srun command.
#SBATCH --job-name=gradalign_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=gradalign_jax-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find the repository from where
# the job was submitted (or $GRADALIGN_JAX_ROOT).
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="${GRADALIGN_JAX_ROOT:-}"
if [[ -z "$REPO" ]]; then
  for d in "$HERE" "${SLURM_SUBMIT_DIR:-}"; do
    [[ -n "$d" && -f "$d/launch/_common.sh" ]] && { REPO="$d"; break; }
  done
fi
if [[ -z "$REPO" || ! -f "$REPO/launch/_common.sh" ]]; then
  echo "launch/slurm.sh: cannot find the repository; submit from its root or set" \
       "GRADALIGN_JAX_ROOT=/path/to/gradalign_jax" >&2
  exit 2
fi
LAUNCHER="slurm.sh"
PLATFORM_NOTE="under sbatch: srun, one task per GPU, JAX_PLATFORMS=cuda"
source "$REPO/launch/_common.sh"
if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: sbatch [sbatch options] launch/$LAUNCHER <experiment> [--flag=value ...]"
  echo "env: PYTHON (default python), SRUN (default srun), DRY_RUN=1 (print the command)"
fi
parse_experiment "$@"
shift

export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
# One failed task ends the job at once, instead of the others waiting for it.
CMD=("${SRUN:-srun}" --kill-on-bad-exit=1 "$PYTHON" -m "experiments.$EXPERIMENT" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}" | sed 's/ $//'
  echo
  exit 0
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "launch/$LAUNCHER: not inside a SLURM job; submit it: sbatch launch/$LAUNCHER" \
       "$EXPERIMENT $*" >&2
  exit 2
fi
echo "launch/$LAUNCHER: job $SLURM_JOB_ID, ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?}" \
     "nodes: ${CMD[*]}" >&2
exec "${CMD[@]}"
