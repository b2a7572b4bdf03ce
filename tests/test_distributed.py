"""Start-up and processes (gradalign_jax/distributed.py), a run directory shared by a job's
processes, and real jax.distributed jobs over loopback (launch/local_multiprocess.sh;
its argument handling is in test_launch.py).

The reference for a job of N processes is the same experiment run as one process: its
tables must come back exactly (pandas, check_exact). A job with a process SIGKILLed after its
first part (a sitecustomize hook in the subprocess, so the library has no test switch) and
then restarted must keep every part written before and redo only the groups left.
"""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from gradalign_jax import distributed, rundir
from gradalign_jax.models import loaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
needs_toy = pytest.mark.skipif(not os.path.isdir(os.path.join(loaded.TOY_DIR, "student_small")),
                               reason="bundled toy models not trained yet (train_toy.py)")


# ---------------------------------------------------------------------------------------
# Dealing and start-up, in this process


@pytest.mark.parametrize("n_items,count", [(0, 1), (5, 1), (4, 2), (7, 3), (2, 4)])
def test_deal_covers_every_item_once_round_robin(n_items, count):
  items = [f"g{i}" for i in range(n_items)]
  shares = [distributed.deal(items, k, count) for k in range(count)]
  assert sorted(x for s in shares for x in s) == sorted(items)
  for k, share in enumerate(shares):  # by hand: item i goes to process i mod count
    assert share == [f"g{i}" for i in range(n_items) if i % count == k]
  assert distributed.Processes(count - 1, count).deal(items) == shares[-1]


@pytest.mark.parametrize("index,count", [(2, 2), (-1, 2), (0, 0)])
def test_process_index_out_of_range_is_refused(index, count):
  with pytest.raises(ValueError, match="process"):
    distributed.Processes(index, count)


def test_initialize_alone_starts_nothing(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID, "SLURM_JOB_ID"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() == distributed.Processes(0, 1)
  assert distributed.initialize(num_processes=1) == distributed.Processes(0, 1)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
  assert distributed.initialize() == distributed.Processes(0, 1)
  assert distributed._client() is None  # jax.distributed was never started


@pytest.mark.parametrize("kwargs,env,match", [
    (dict(num_processes=2), {}, "needs --coordinator, --process_id"),
    (dict(num_processes=2, process_id=2, coordinator="127.0.0.1:1"), {}, "not in"),
    (dict(num_processes=1, process_id=1), {}, "process_id=0"),
    ({}, {distributed.ENV_NUM_PROCESSES: "two"}, "not an integer"),
])
def test_initialize_refuses_incomplete_or_bad_arguments(monkeypatch, kwargs, env, match):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID, "SLURM_JOB_ID"):
    monkeypatch.delenv(name, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    distributed.initialize(**kwargs)


class _FakeCoordinator:
  """The coordination service's key-value store, with a hook run after each read: another
  process's writes landing between this process's reads, at a chosen point."""

  def __init__(self, after_read=None):
    self.store, self.after_read = {}, after_read

  def key_value_set(self, key, value):
    self.store[key] = value

  def key_value_try_get(self, key):
    if key not in self.store:
      raise RuntimeError(f"NOT_FOUND: {key}")
    value = self.store[key]
    if self.after_read:
      self.after_read(self, key)
    return value


def test_barrier_passed_by_all_is_not_failed_by_a_later_report(monkeypatch):
  # Process 1 arrived, passed, and reported a failure just after process 0 read its arrival
  # (the interleaving that failed CI once): process 0 must pass this barrier, and hear of the
  # failure at its next one.
  def report_after_arrival_read(client, key):
    if key.endswith("/barrier/start/1"):
      client.store[distributed._FAILED] = "process 1 failed: ValueError: a bad checkpoint"

  fake = _FakeCoordinator(report_after_arrival_read)
  fake.store[f"{distributed._PREFIX}/barrier/start/1"] = "1"
  monkeypatch.setattr(distributed, "_client", lambda: fake)
  procs = distributed.Processes(0, 2)
  procs.barrier("start", timeout_s=5)
  with pytest.raises(distributed.ProcessFailed, match="stopped at barrier 'next'"):
    procs.barrier("next", timeout_s=5)


def test_barrier_with_a_missing_process_times_out_or_hears_a_failure(monkeypatch):
  fake = _FakeCoordinator()
  monkeypatch.setattr(distributed, "_client", lambda: fake)
  monkeypatch.setattr(distributed, "_POLL_S", 0.01)
  with pytest.raises(TimeoutError, match=r"processes \[1\] did not arrive"):
    distributed.Processes(0, 2).barrier("a", timeout_s=0.05)
  fake.store[distributed._FAILED] = "process 1 failed: OSError"
  with pytest.raises(distributed.ProcessFailed, match="process 1 failed: OSError"):
    distributed.Processes(0, 2).barrier("b", timeout_s=5)


# Two real processes (jax.distributed over loopback, started from the environment variables):
# a barrier, a reported failure seen by the other at its next barrier, initialize idempotent.
BARRIER_SCRIPT = """
import time
from gradalign_jax import distributed
procs = distributed.initialize()
assert distributed.initialize() == procs  # idempotent
procs.barrier("start")
print(f"process {procs.index} of {procs.count} passed the barrier", flush=True)
if procs.index == 1:
  procs.report_failure("ValueError: a bad checkpoint")
else:
  start = time.monotonic()
  try:
    procs.barrier("never", timeout_s=120)
  except distributed.ProcessFailed as e:
    print(f"stopped after {time.monotonic() - start:.0f} s: {e}", flush=True)
"""


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_meet_at_barriers_and_hear_of_a_failure():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             **{distributed.ENV_COORDINATOR: f"127.0.0.1:{_free_port()}",
                distributed.ENV_NUM_PROCESSES: "2"})
  procs = [subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(env, **{distributed.ENV_PROCESS_ID: str(k)}))
           for k in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  out0, out1 = outs[0][0].splitlines(), outs[1][0].splitlines()
  assert out0[0] == "process 0 of 2 passed the barrier"
  assert out1 == ["process 1 of 2 passed the barrier"]
  # Seen at once (polled every 0.25 s), not after the 120 s timeout or JAX's heartbeats.
  assert out0[1].startswith("stopped after ")
  assert int(out0[1].split()[2]) < 30
  assert out0[1].endswith("process 1 failed: ValueError: a bad checkpoint (process 0 stopped "
                          "at barrier 'never')")


# ---------------------------------------------------------------------------------------
# One run directory, two processes' roles played in turn (barriers are no-ops here)


class _Role(distributed.Processes):
  def barrier(self, name, timeout_s=None):
    pass


def _rows(i):
  return {"t": [{"q": i, "x": float(i) / 3}]}


def test_processes_share_a_run_directory(tmp_path):
  out = str(tmp_path / "run")
  settings = {"students": ["s"], "seed": 0}
  lead = rundir.RunDir(out, settings, processes=_Role(0, 2))
  worker = rundir.RunDir(out, settings, processes=_Role(1, 2))
  groups = [[0], [1], [2], [3]]
  with lead.open(), worker.open():  # the lead holds the lock; the worker does not trip it
    assert lead.deal(groups) == [[0], [2]] and worker.deal(groups) == [[1], [3]]
    lead.write_parts("s", {0: _rows(0)})
    worker.write_parts("s", {1: _rows(1)})
    with open(os.path.join(out, "manifest.json")) as f:
      assert set(json.load(f)["parts"]) == {"s/q000000"}  # manifest.json is the lead's alone
    with open(os.path.join(out, "manifest.p1.json")) as f:
      assert set(json.load(f)["parts"]) == {"s/q000001"}
    assert not worker.gather()
    assert lead.gather()
    assert not os.path.exists(os.path.join(out, "manifest.p1.json"))
    merged = lead.merge(["s"], 2, ["t"])["t"]
  assert merged["q"].tolist() == [0, 1]
  # A restarted job of one process keeps both parts (a worker's manifest folded in at open).
  again = rundir.RunDir(out, settings)
  with again.open():
    assert again.todo("s", groups) == [[2], [3]]


def test_a_killed_workers_parts_are_adopted_on_restart(tmp_path):
  out = str(tmp_path / "run")
  settings = {"students": ["s"], "seed": 0}
  lead = rundir.RunDir(out, settings, processes=_Role(0, 2))
  worker = rundir.RunDir(out, settings, processes=_Role(1, 2))
  with lead.open(), worker.open():
    worker.write_parts("s", {1: _rows(1), 3: _rows(3)})
    os.makedirs(worker.part_dir("s", 2) + ".tmp")  # a part being written when it was killed
  # (no gather: the job died) A new job of three processes starts.
  restarted = rundir.RunDir(out, settings, processes=_Role(0, 3))
  with restarted.open():
    assert restarted.todo("s", [[0], [1], [2], [3]]) == [[0], [2]]
  assert not os.path.exists(worker.part_dir("s", 2) + ".tmp")


def test_a_worker_that_does_not_see_the_directory_is_told_why(tmp_path):
  settings = {"students": ["s"], "seed": 0}
  lead = rundir.RunDir(str(tmp_path / "host0"), settings, processes=_Role(0, 2))
  worker = rundir.RunDir(str(tmp_path / "host1"), settings, processes=_Role(1, 2))
  with lead.open():
    with pytest.raises(rundir.RunDirError, match="filesystem every host mounts"):
      with worker.open():
        pass


def test_a_worker_with_other_settings_is_refused(tmp_path):
  out = str(tmp_path / "run")
  lead = rundir.RunDir(out, {"students": ["s"], "seed": 0}, processes=_Role(0, 2))
  worker = rundir.RunDir(out, {"students": ["s"], "seed": 1}, processes=_Role(1, 2))
  with lead.open():
    with pytest.raises(rundir.RunDirError, match="seed: 0 there, 1 now"):
      with worker.open():
        pass


# ---------------------------------------------------------------------------------------
# Real jobs over loopback: the tiny sweep as 1 process, 2 processes, 2 with one killed

# A summary spec: process 0 writes the summaries, the others wait for them and read them.
SWEEP = ["--students=student_small", "--teachers=teacher,self:summary", "--num_questions=4",
         "--num_rollouts=4", "--max_new_tokens=24", "--budget=4", "--question_batch=1",
         "--permutations=20", "--summary_tokens=16"]
KEYS = {"nodes": ["student", "spec", "question_id", "node_id"],
        "rollouts": ["student", "spec", "question_id", "rollout"],
        "questions": ["student", "spec", "question_id"]}
# Loaded in the subprocess before anything else: SIGKILLs process $KILL_PROCESS right after it
# recorded its first part, as a crash would.
KILL_HOOK = """import os, signal
if os.environ.get("GRADALIGN_JAX_PROCESS_ID") == os.environ.get("KILL_PROCESS"):
  from gradalign_jax import rundir
  _write = rundir.RunDir.write_parts
  def write_parts(self, tag, parts):
    _write(self, tag, parts)
    os.kill(os.getpid(), signal.SIGKILL)
  rundir.RunDir.write_parts = write_parts
"""


def _job(launcher, *args, **env):
  full = dict(os.environ, PYTHON=sys.executable, **env)
  return subprocess.run([os.path.join(LAUNCH, launcher), *args], capture_output=True,
                        text=True, env=full, timeout=600)


def _tables(out):
  out_ = {}
  for t, keys in KEYS.items():
    df = pd.read_parquet(os.path.join(out, f"{t}.parquet"))
    out_[t] = df.sort_values(keys).reset_index(drop=True)
  return out_


def _assert_same_tables(a, b):
  ta, tb = _tables(a), _tables(b)
  for t in KEYS:
    assert len(ta[t]) > 0
    pd.testing.assert_frame_equal(ta[t], tb[t], check_exact=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("one") / "run")
  r = _job("local_cpu.sh", "alignment_sweep", *SWEEP, f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  return out


@needs_toy
@pytest.mark.slow
def test_two_processes_write_the_tables_of_one(one_process, tmp_path):
  out = str(tmp_path / "run")
  r = _job("local_multiprocess.sh", "2", "alignment_sweep", *SWEEP, f"--out={out}",
           LOG_DIR=str(tmp_path / "logs"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == f"report: {out}/report.md"
  log1 = (tmp_path / "logs" / "process-1.log").read_text()
  assert "process 1 of 2: 2 of the 4 question groups left" in log1
  assert sorted(os.listdir(os.path.join(out, "parts", "student_small"))) == [
      f"q{i:06d}" for i in range(4)]
  assert not [n for n in os.listdir(out) if n.startswith("manifest.p")]  # folded in
  _assert_same_tables(one_process, out)


@needs_toy
@pytest.mark.slow
def test_a_killed_process_then_a_restart_loses_nothing(one_process, tmp_path):
  out = str(tmp_path / "run")
  hook = tmp_path / "hook"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(KILL_HOOK)
  env = dict(PYTHONPATH=f"{hook}:{os.environ.get('PYTHONPATH', '')}", KILL_PROCESS="1")
  r = _job("local_multiprocess.sh", "2", "alignment_sweep", *SWEEP, f"--out={out}",
           LOG_DIR=str(tmp_path / "logs1"), **env)
  assert r.returncode == 137, r.stderr[-3000:]  # SIGKILL; the launcher stopped process 0
  assert "process 1 (pid" in r.stderr
  parts = os.path.join(out, "parts", "student_small")
  before = {q: os.stat(os.path.join(parts, q)).st_mtime_ns for q in os.listdir(parts)
            if not q.endswith(".tmp")}
  assert "q000001" in before  # process 1's first group (dealt 1 and 3) was written
  assert "q000003" not in before  # ... and its second never was
  assert not os.path.exists(os.path.join(out, "summary.json"))

  r = _job("local_multiprocess.sh", "2", "alignment_sweep", *SWEEP, f"--out={out}",
           LOG_DIR=str(tmp_path / "logs2"))
  assert r.returncode == 0, r.stderr[-3000:]
  log0 = (tmp_path / "logs2" / "process-0.log").read_text()
  assert f"{len(before)} of 4 question groups already done" in log0
  left = 4 - len(before)
  assert f"process 0 of 2: {(left + 1) // 2} of the {left} question groups left" in log0
  after = {q: os.stat(os.path.join(parts, q)).st_mtime_ns for q in os.listdir(parts)}
  assert sorted(after) == [f"q{i:06d}" for i in range(4)]
  assert {q: after[q] for q in before} == before  # nothing written before was redone
  _assert_same_tables(one_process, out)
