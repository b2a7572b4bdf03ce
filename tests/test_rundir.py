"""gradalign_jax/rundir.py: what a run directory refuses (leaving every byte in place), the
lock, the inputs check and the parts' checksums. No model: parts are written by hand."""

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest

from gradalign_jax import rundir

SETTINGS = {"students": ["s"], "seed": 0, "num_questions": 2}
INPUTS = {"--data=d.jsonl": {"/x/d.jsonl": "aaaa"}, "checkpoint /m": {"model.safetensors": "1"}}


def snapshot(root) -> dict:
  """{relative path: bytes} of every file under root (directories as None)."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = None
    for name in files:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), root)] = f.read()
  return out


def finished_run(path, settings=SETTINGS, inputs=INPUTS):
  """A run directory with both parts written (as a finished run leaves it)."""
  run = rundir.RunDir(str(path), settings, inputs=inputs)
  with run.open():
    run.write_parts("s", {i: {"rows": [{"x": i, "y": 10 * i}]} for i in range(2)})
  return run


def users_dir(path):
  os.makedirs(path / "data")
  (path / "notes.txt").write_text("mine")
  (path / "data" / "a.csv").write_text("1,2\n")


def checkout(path):
  os.makedirs(path / ".git")
  (path / "README.md").write_text("# project")


def corrupt_config(path):
  finished_run(path)
  (path / "config.json").write_text('{"students": ["s"], "se')


def _foreign_config(path):
  os.makedirs(path)
  (path / "config.json").write_text('{"model_type": "qwen3"}')


def _stray_file_in_run(path):
  finished_run(path)
  (path / "thesis.tex").write_text("mine")


REFUSED = [  # (name, make the directory, overwrite, message)
    ("users_dir", users_dir, False, r"not a run directory of this tool \(it holds data, "
     r"notes.txt\); nothing was changed"),
    ("users_dir_overwrite", users_dir, True, "not a run directory of this tool"),
    ("checkout_overwrite", checkout, True, r"it holds .git, README.md"),
    ("corrupt_config", corrupt_config, False, r"config.json cannot be read .*restore the file"),
    ("corrupt_config_overwrite", corrupt_config, True, r"config.json cannot be read"),
    ("foreign_config_overwrite", _foreign_config, True, "not this tool's run config"),
    ("stray_file_overwrite", _stray_file_in_run, True, r"holds thesis.tex.*move those files"),
    ("other_settings", finished_run, False, r"other settings \(seed: 0 there, 1 now\)"),
]


@pytest.mark.parametrize("name,make,overwrite,message", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_and_unchanged(tmp_path, name, make, overwrite, message):
  path = tmp_path / "out"
  make(path)
  before = snapshot(path)
  settings = dict(SETTINGS, seed=1) if name == "other_settings" else SETTINGS
  with pytest.raises(rundir.RunDirError, match=message):
    run = rundir.RunDir(str(path), settings, inputs=INPUTS, overwrite=overwrite)
    with run.open():
      pass
  assert snapshot(path) == before


def test_out_is_a_file_or_under_one(tmp_path):
  f = tmp_path / "results.txt"
  f.write_text("keep")
  with pytest.raises(rundir.RunDirError, match="is a file, not a directory; pass a directory"):
    rundir.RunDir(str(f), SETTINGS, overwrite=True)
  with pytest.raises(rundir.RunDirError, match="is a file, so the directory cannot be made"):
    rundir.RunDir(str(f / "sub"), SETTINGS)
  assert f.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out(tmp_path):
  locked = tmp_path / "ro"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(rundir.RunDirError, match="not writable by this user"):
      rundir.RunDir(str(locked / "run"), SETTINGS)
  finally:
    locked.chmod(0o700)


def test_overwrite_of_a_run_starts_over(tmp_path):
  path = tmp_path / "out"
  finished_run(path)
  run = rundir.RunDir(str(path), dict(SETTINGS, seed=1), inputs=INPUTS, overwrite=True)
  assert snapshot(path)["config.json"]  # nothing deleted before open
  with run.open():
    assert run.todo("s", [[0], [1]]) == [[0], [1]]
  assert sorted(snapshot(path)) == ["config.json", "manifest.json"]


@pytest.mark.parametrize("changed", ["--data=d.jsonl", "checkpoint /m"])
def test_resume_with_changed_input_is_refused(tmp_path, changed):
  path = tmp_path / "out"
  finished_run(path)
  before = snapshot(path)
  inputs = dict(INPUTS, **{changed: {"model.safetensors": "2"}})
  with pytest.raises(rundir.RunDirError, match=f"made from other inputs: {changed} changed"):
    rundir.RunDir(str(path), SETTINGS, inputs=inputs)
  assert snapshot(path) == before


def test_corrupt_part_is_named_and_only_it_recomputed(tmp_path, caplog):
  path = tmp_path / "out"
  run = finished_run(path)
  bad = os.path.join(run.part_dir("s", 1), "rows.parquet")
  with open(bad, "r+b") as f:
    f.seek(20)
    f.write(b"\0\0\0\0")
  good = snapshot(run.part_dir("s", 0))
  run = rundir.RunDir(str(path), SETTINGS, inputs=INPUTS)
  with run.open():
    assert f"part {run.part_dir('s', 1)} does not match its checksum" in caplog.text
    assert run.todo("s", [[0], [1]]) == [[1]]
    run.write_parts("s", {1: {"rows": [{"x": 1, "y": 10}]}})
    merged = run.merge(["s"], 2, ["rows"])["rows"]
  assert snapshot(run.part_dir("s", 0)) == good
  pd.testing.assert_frame_equal(merged, pd.DataFrame({"x": [0, 1], "y": [0, 10]}))


def test_part_changed_after_the_check_fails_the_merge(tmp_path):
  run = finished_run(tmp_path / "out")
  with open(os.path.join(run.part_dir("s", 0), "rows.parquet"), "ab") as f:
    f.write(b"x")
  with pytest.raises(rundir.RunDirError, match=r"q000000/rows.parquet changed after it was "
                     "written.*rerun the same command"):
    run.merge(["s"], 2, ["rows"])


def test_parts_before_the_manifest_are_adopted(tmp_path):
  run = finished_run(tmp_path / "out")
  os.remove(run.file("manifest.json"))
  shutil_target = os.path.join(run.part_dir("s", 1), "rows.parquet")
  with open(shutil_target, "wb") as f:
    f.write(b"not parquet")  # unreadable: recomputed, not adopted
  run = rundir.RunDir(run.path, SETTINGS, inputs=INPUTS)
  with run.open():
    assert run.todo("s", [[0], [1]]) == [[1]]


def _lock(path, pid, host=None):
  with open(os.path.join(path, "lock"), "w") as f:
    json.dump({"host": host or socket.gethostname(), "pid": pid}, f)


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_one(tmp_path):
  path = tmp_path / "out"
  finished_run(path)
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _lock(path, live.pid)
    before = snapshot(path)
    with pytest.raises(rundir.RunDirError, match=f"being written by process {live.pid} on "
                       f"{socket.gethostname()}.*delete the lock file"):
      rundir.RunDir(str(path), SETTINGS, inputs=INPUTS)
    assert snapshot(path) == before
  finally:
    live.kill()
    live.wait()
  # The holder is gone: its lock is taken over, then released.
  run = rundir.RunDir(str(path), SETTINGS, inputs=INPUTS)
  with run.open():
    with open(run.file("lock")) as f:
      assert json.load(f)["pid"] == os.getpid()
  assert not os.path.exists(run.file("lock"))
  # Another host's lock cannot be checked from here: refused.
  _lock(path, 1, host="elsewhere")
  with pytest.raises(rundir.RunDirError, match="process 1 on elsewhere"):
    rundir.RunDir(str(path), SETTINGS, inputs=INPUTS)


def test_write_parts_needs_the_lock(tmp_path):
  run = rundir.RunDir(str(tmp_path / "out"), SETTINGS)
  with pytest.raises(RuntimeError, match="outside"):
    run.write_parts("s", {0: {"rows": []}})
