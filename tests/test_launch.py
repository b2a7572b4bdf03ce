"""launch/local_cpu.sh and launch/local_gpu.sh: usage, unknown names, what they forward.

A stand-in interpreter (``PYTHON=fake``) records its arguments and environment, and plays a
machine with or without a GPU for local_gpu.sh's device check; one case runs the real
interpreter on an experiment's --help.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                     if f.endswith(".py") and not f.startswith("_"))
FAKE = """#!/usr/bin/env bash
if [[ "$1" == -c ]]; then  # the GPU check
  [[ "$FAKE_GPU" == 1 ]] && { echo "[CudaDevice(id=0)]"; exit 0; }
  echo "RuntimeError: Unable to initialize backend 'cuda'"; exit 1
fi
echo "args: $*"
echo "JAX_PLATFORMS=$JAX_PLATFORMS PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-unset}" \\
  "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
echo "PYTHONPATH=$PYTHONPATH"
"""


def _run(launcher, *args, python=sys.executable, cwd=None, **env):
  full = {k: v for k, v in os.environ.items()
          if k not in ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE")}
  full.update(PYTHON=python, **env)
  return subprocess.run([os.path.join(ROOT, "launch", launcher), *args], capture_output=True,
                        text=True, env=full, cwd=cwd or ROOT, timeout=120)


@pytest.fixture
def fake(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE)
  path.chmod(0o755)
  return str(path)


@pytest.mark.parametrize("launcher", ["local_cpu.sh", "local_gpu.sh"])
@pytest.mark.parametrize("args,rc", [((), 2), (("-h",), 0), (("--help",), 0)])
def test_usage(launcher, args, rc):
  r = _run(launcher, *args)
  assert r.returncode == rc
  assert f"usage: launch/{launcher} <experiment>" in r.stdout
  assert f"Experiments: {' '.join(EXPERIMENTS)}" in r.stdout


@pytest.mark.parametrize("launcher", ["local_cpu.sh", "local_gpu.sh"])
def test_unknown_experiment_lists_the_valid_ones(launcher, fake):
  r = _run(launcher, "alignment", "--out=x", python=fake)
  assert r.returncode == 2
  assert r.stderr.strip() == (f"launch/{launcher}: unknown experiment 'alignment'; choose one "
                              f"of: {' '.join(EXPERIMENTS)}")
  assert r.stdout == ""  # the interpreter never ran


@pytest.mark.parametrize("name", ["in_context_accuracy", "in_context_accuracy.py",
                                  "experiments/in_context_accuracy.py"])
def test_cpu_forwards_module_flags_and_platform(fake, tmp_path, name):
  r = _run("local_cpu.sh", name, "--out=runs/x y", "--num_questions=2", python=fake,
           cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0] == "args: -m experiments.in_context_accuracy --out=runs/x y --num_questions=2"
  assert lines[1].startswith("JAX_PLATFORMS=cpu ")
  assert lines[2].startswith(f"PYTHONPATH={ROOT}")


@pytest.mark.parametrize("env,expect", [
    ({}, "PREALLOCATE=false CUDA_VISIBLE_DEVICES=unset"),
    ({"CUDA_VISIBLE_DEVICES": "1"}, "PREALLOCATE=false CUDA_VISIBLE_DEVICES=1"),
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, "PREALLOCATE=true CUDA_VISIBLE_DEVICES=unset"),
])
def test_gpu_forwards_with_a_gpu(fake, env, expect):
  r = _run("local_gpu.sh", "alignment_sweep", "--seed=1", python=fake, FAKE_GPU="1", **env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[:2] == ["args: -m experiments.alignment_sweep --seed=1",
                                       f"JAX_PLATFORMS=cuda {expect}"]
  assert "devices [CudaDevice(id=0)]" in r.stderr


def test_gpu_refuses_without_a_gpu(fake):
  r = _run("local_gpu.sh", "alignment_sweep", python=fake, FAKE_GPU="0")
  assert r.returncode == 1
  assert r.stdout == ""
  assert "JAX sees no GPU" in r.stderr and "Unable to initialize backend 'cuda'" in r.stderr
  assert 'pip install -U "jax[cuda12]"' in r.stderr


@pytest.mark.parametrize("launcher", ["local_cpu.sh", "local_gpu.sh"])
def test_experiment_help_runs_the_real_module(launcher):
  r = _run(launcher, "in_context_accuracy", "--help")
  assert r.returncode == 1  # absl exits 1 after printing --help
  assert "In-context accuracy" in r.stdout and "--num_rollouts" in r.stdout
  assert "(default: 'runs/in_context')" in r.stdout
