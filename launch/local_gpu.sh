#!/usr/bin/env bash
# Runs an experiment on this machine's GPU(s): launch/local_gpu.sh alignment_sweep --out=runs/x
# CUDA_VISIBLE_DEVICES, when set, picks the GPUs (e.g. CUDA_VISIBLE_DEVICES=1 launch/...).
set -euo pipefail
LAUNCHER="local_gpu.sh"
PLATFORM_NOTE="JAX_PLATFORMS=cuda, XLA_PYTHON_CLIENT_PREALLOCATE=false unless set; CUDA_VISIBLE_DEVICES picks GPUs"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
parse_experiment "$@"
shift
export JAX_PLATFORMS=cuda
# Allocate as needed: the sweep holds several models and the default grabs 75% of the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
  export CUDA_VISIBLE_DEVICES
  echo "launch/$LAUNCHER: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
fi
# One line either way: the devices, or why there are none (JAX's own error can be a bare assert).
check='
import jax
try:
  d = jax.devices()
except Exception as e:
  raise SystemExit(f"{type(e).__name__}: {e}" if str(e) else
                   f"{type(e).__name__} while starting the CUDA backend (no CUDA plugin?)")
print(d)
raise SystemExit(0 if d and d[0].platform == "gpu" else f"devices are {d}")
'
for arg in "$@"; do  # an experiment's --help needs no GPU
  [[ "$arg" == --help* ]] && exec "$PYTHON" -m "experiments.$EXPERIMENT" "$@"
done
if ! devices="$("$PYTHON" -c "$check" 2>&1)"; then
  cat >&2 <<MSG
launch/$LAUNCHER: JAX sees no GPU with JAX_PLATFORMS=cuda ($(echo "$devices" | tail -n 1)).
Install JAX's CUDA build in this environment ($PYTHON -m pip install -U "jax[cuda12]"), check
that nvidia-smi lists a GPU and that CUDA_VISIBLE_DEVICES (if set) names one, or run on CPU
with launch/local_cpu.sh.
MSG
  exit 1
fi
echo "launch/$LAUNCHER: devices $(echo "$devices" | tail -n 1)" >&2
exec "$PYTHON" -m "experiments.$EXPERIMENT" "$@"
