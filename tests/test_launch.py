"""The launchers (launch/): usage, unknown names, what they forward or print.

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


# ---------------------------------------------------------------------------------------
# launch/local_multiprocess.sh, tpu_pod.sh and slurm.sh

FAKE_JOB = """#!/usr/bin/env bash
if [[ "$1" == -c ]]; then exec python3 "$@"; fi
echo "process $GRADALIGN_JAX_PROCESS_ID of $GRADALIGN_JAX_NUM_PROCESSES at $GRADALIGN_JAX_COORDINATOR: $*"
echo "JAX_PLATFORMS=$JAX_PLATFORMS"
if [[ "$GRADALIGN_JAX_PROCESS_ID" == "${FAIL_ID:-none}" ]]; then exit 7; fi
exec sleep "${SLEEP:-0}"
"""


def _launch(*args, python, **env):
  full = dict(os.environ, PYTHON=python, **env)
  full.pop("JAX_PLATFORMS", None)
  return subprocess.run([os.path.join(ROOT, "launch", "local_multiprocess.sh"), *args],
                        capture_output=True, text=True, env=full, timeout=120)


@pytest.fixture
def fake_job(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE_JOB)
  path.chmod(0o755)
  return str(path)


def test_launcher_starts_n_processes_of_one_job(fake_job, tmp_path):
  logs = tmp_path / "logs"
  r = _launch("3", "alignment_sweep", "--out=x", "--seed=1", python=fake_job, LOG_DIR=str(logs),
              PORT="12345")
  assert r.returncode == 0, r.stderr
  for k in range(3):
    lines = (logs / f"process-{k}.log").read_text().splitlines()
    assert lines == [f"process {k} of 3 at 127.0.0.1:12345: -m experiments.alignment_sweep "
                     "--out=x --seed=1", "JAX_PLATFORMS=cpu"]
    assert (logs / f"process-{k}.pid").read_text().strip().isdigit()


def test_launcher_gives_each_process_its_gpu_on_request(fake_job, tmp_path):
  logs = tmp_path / "logs"
  r = _launch("2", "alignment_sweep", python=fake_job, LOG_DIR=str(logs), ONE_GPU_EACH="1",
              DRY_RUN="1", PORT="7")
  assert [line.split(" -m ")[0] for line in r.stdout.splitlines()] == [
      f"GRADALIGN_JAX_COORDINATOR=127.0.0.1:7 GRADALIGN_JAX_NUM_PROCESSES=2 "
      f"GRADALIGN_JAX_PROCESS_ID={k} CUDA_VISIBLE_DEVICES={k} {fake_job}" for k in range(2)]
  r = _launch("2", "alignment_sweep", python=fake_job, LOG_DIR=str(logs), ONE_GPU_EACH="1")
  assert r.returncode == 0, r.stderr
  assert (logs / "process-1.log").read_text().splitlines()[1] == "JAX_PLATFORMS=cuda"


def test_launcher_stops_the_others_when_one_fails(fake_job, tmp_path):
  logs = tmp_path / "logs"
  r = _launch("3", "alignment_sweep", python=fake_job, LOG_DIR=str(logs), FAIL_ID="1",
              SLEEP="60")
  assert r.returncode == 7
  assert "process 1 (pid" in r.stderr and "failed with status 7" in r.stderr
  for k in (0, 2):  # the sleepers were stopped, not waited for
    pid = int((logs / f"process-{k}.pid").read_text())
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@pytest.mark.parametrize("args,rc,err", [
    ((), 2, ""), (("-h",), 0, ""), (("0", "alignment_sweep"), 2, "not a positive number"),
    (("2", "nope"), 2, "unknown experiment 'nope'"),
])
def test_launcher_usage(fake_job, args, rc, err):
  r = _launch(*args, python=fake_job)
  assert r.returncode == rc
  assert err in r.stderr
  if not err:
    assert "usage: launch/local_multiprocess.sh N <experiment>" in r.stdout


def test_launcher_dry_run_prints_the_commands(fake_job):
  r = _launch("2", "in_context_accuracy", "--out=y", python=fake_job, DRY_RUN="1", PORT="999",
              LOG_DIR="/tmp/l")
  assert r.returncode == 0
  assert r.stdout.splitlines() == [
      f"GRADALIGN_JAX_COORDINATOR=127.0.0.1:999 GRADALIGN_JAX_NUM_PROCESSES=2 "
      f"GRADALIGN_JAX_PROCESS_ID={k} {fake_job} -m experiments.in_context_accuracy --out=y "
      f">/tmp/l/process-{k}.log 2>&1" for k in range(2)]


@pytest.mark.parametrize("launcher", ["local_multiprocess.sh", "tpu_pod.sh", "slurm.sh"])
def test_scripts_parse(launcher):
  assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", launcher)]).returncode == 0


def _dry(launcher, *args, **env):
  full = {k: v for k, v in os.environ.items() if k not in ("TPU", "ZONE", "PROJECT",
                                                           "SLURM_JOB_ID", "JAX_PLATFORMS")}
  full.update(env)
  return subprocess.run([os.path.join(ROOT, "launch", launcher), *args], capture_output=True,
                        text=True, env=full, timeout=60)


def test_tpu_pod_dry_run_copies_installs_and_runs_on_every_worker():
  r = _dry("tpu_pod.sh", "alignment_sweep", "--out=/mnt/shared/x", "--data=a b.jsonl",
           DRY_RUN="1", TPU="v5e-32", ZONE="us-west4-a", PROJECT="proj")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 5 and lines[0].startswith("tar -czf ")
  where = "--zone=us-west4-a --worker=all --project=proj"
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp ") and lines[1].endswith(
      f" v5e-32:gradalign_jax.tar.gz {where}")
  for line in lines[2:]:
    assert line.startswith(f"gcloud compute tpus tpu-vm ssh v5e-32 {where} --command=")
  # The remote commands as gcloud receives them (the shell removes one level of quoting).
  assert [_remote(line) for line in lines[2:]] == [
      "mkdir -p ~/gradalign_jax && tar -xzf ~/gradalign_jax.tar.gz -C ~/gradalign_jax",
      "python3 -m pip install -U jax\\[tpu\\] && python3 -m pip install -e ~/gradalign_jax",
      "cd ~/gradalign_jax && JAX_PLATFORMS=tpu python3 -m experiments.alignment_sweep "
      "--out=/mnt/shared/x --data=a\\ b.jsonl"]


def _remote(line):
  quoted = line.split("--command=", 1)[1]
  return subprocess.run(["bash", "-c", f"printf '%s' {quoted}"], capture_output=True,
                        text=True).stdout


@pytest.mark.parametrize("env,match", [({}, "set TPU ZONE"), ({"TPU": "x"}, "set ZONE")])
def test_tpu_pod_needs_its_name_and_zone(env, match):
  r = _dry("tpu_pod.sh", "alignment_sweep", DRY_RUN="1", **env)
  assert r.returncode == 2 and match in r.stderr and r.stdout == ""


def test_tpu_pod_skips_copy_and_install_on_request():
  r = _dry("tpu_pod.sh", "in_context_accuracy", DRY_RUN="1", TPU="t", ZONE="z", SKIP_COPY="1",
           SKIP_INSTALL="1")
  assert r.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command=cd\\ ~/gradalign_jax"
      "\\ \\&\\&\\ JAX_PLATFORMS=tpu\\ python3\\ -m\\ experiments.in_context_accuracy"]


def test_slurm_dry_run_and_outside_a_job():
  r = _dry("slurm.sh", "alignment_sweep", "--out=/shared/x", DRY_RUN="1", PYTHON="py")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == ("srun --kill-on-bad-exit=1 py -m experiments.alignment_sweep "
                              "--out=/shared/x")
  r = _dry("slurm.sh", "alignment_sweep", "--out=/shared/x")
  assert r.returncode == 2 and "not inside a SLURM job; submit it: sbatch" in r.stderr


def test_slurm_runs_srun_inside_a_job(fake_job, tmp_path):
  srun = tmp_path / "srun"
  srun.write_text('#!/usr/bin/env bash\necho "srun $* JAX_PLATFORMS=$JAX_PLATFORMS"\n')
  srun.chmod(0o755)
  r = _dry("slurm.sh", "null_calibration", "--seeds=4", SLURM_JOB_ID="12", SLURM_NTASKS="8",
           SRUN=str(srun), PYTHON="py", SLURM_SUBMIT_DIR=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == ("srun --kill-on-bad-exit=1 py -m experiments.null_calibration "
                              "--seeds=4 JAX_PLATFORMS=cuda")
  assert "job 12, 8 tasks" in r.stderr
