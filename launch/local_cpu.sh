#!/usr/bin/env bash
# Runs an experiment on this machine's CPU: launch/local_cpu.sh alignment_sweep --out=runs/x
set -euo pipefail
LAUNCHER="local_cpu.sh"
PLATFORM_NOTE="JAX_PLATFORMS=cpu"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
parse_experiment "$@"
shift
export JAX_PLATFORMS=cpu
exec "$PYTHON" -m "experiments.$EXPERIMENT" "$@"
