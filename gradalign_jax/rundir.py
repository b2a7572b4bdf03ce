"""A run directory: the settings and inputs it was made with, atomic per-question parts with
checksums, a lock, resume, merge.

    run = rundir.RunDir(out, settings, inputs=fingerprints)  # checks only: writes nothing
    ...                                                       # load models, validate the rest
    with run.open():                                          # lock, config.json, parts checked
      for student in students:
        tag = rundir.tag(student)
        for group in run.progress(run.todo(tag, groups), tag):  # groups without finished parts
          run.write_parts(tag, compute(group))                  # {index: {table: rows}}
      frames = run.merge(tags, num_questions, tables=("nodes", …))

Layout: ``config.json`` (the settings, a flat JSON object, plus ``inputs``: fingerprints of
the data and of every checkpoint), ``parts/<tag>/q<index>/`` one directory per (student,
question) with one parquet file per table, written under a ``.tmp`` name and renamed into
place, ``manifest.json`` (each finished part's file checksums) and ``lock`` (the writer's host
and pid). A killed run leaves either a whole part or none; a rerun with the same settings and
inputs skips the parts whose checksums match and gives identical tables.

A job of several processes (``processes``: ``distributed.Processes``) shares one directory:
process 0 takes the lock, checks and writes config.json and the manifest, then lets the
others in (a barrier); each process writes only the parts of the groups dealt to it, and
records them in its own ``manifest.p<index>.json``; ``gather`` waits for all and folds their
manifests into ``manifest.json`` for process 0's ``merge``. A restarted job (of any number of
processes) folds in what the manifests of a killed one recorded, so only unfinished groups
are redone.

What it refuses, before anything is written (``RunDirError``, naming the path and the fix):
``--out`` that is a file or not writable, a directory that is not this tool's run (with or
without ``overwrite``: only a run directory is ever deleted), a run with other settings or
inputs (unless ``overwrite``), an unreadable ``config.json`` or ``manifest.json``, and a
directory another live process is writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from typing import Iterator, Sequence

import pandas as pd


_log = logging.getLogger(__name__)

CONFIG, MANIFEST, LOCK, PARTS = "config.json", "manifest.json", "lock", "parts"
# What a run directory may hold besides CONFIG, MANIFEST, LOCK and PARTS: the experiments'
# outputs and caches. Anything else means the directory holds someone's files.
OUTPUT_SUFFIXES = (".parquet", ".csv", ".json", ".md", ".png", ".html", ".tmp")


class RunDirError(ValueError):
  """A run directory that cannot be used as asked; the message names it and the fix."""


class Interrupt(Exception):
  """Raised by ``RunDir.progress`` once ``stop_after`` groups are done (tests simulate a killed
  run with it)."""


def tag(name: str) -> str:
  """A directory name for a model reference (toy name, path or hub id)."""
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_json(path: str, obj) -> None:
  """Atomically (a .tmp file renamed over path)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _describe(names: Sequence[str]) -> str:
  names = sorted(names)
  return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class RunDir:
  """One run's directory.

  path: the directory (``--out``). settings: a JSON-able flat dict of everything that decides
  the results. inputs: JSON-able fingerprints of the files behind them ({name: fingerprint};
  a resumed run must find the same). overwrite: start over (allowed only for a directory that
  holds this tool's run; done in ``open``). stop_after: raise Interrupt after that many groups
  (None: never). processes: this process's place in a job of several (default: alone);
  only process 0 checks in the constructor, the others once it has opened the directory.
  The constructor only checks (``check``); ``open`` writes.
  """

  def __init__(self, path: str, settings: dict, *, inputs: dict | None = None,
               overwrite: bool = False, stop_after: int | None = None,
               processes: "distributed.Processes | None" = None):
    if processes is None:
      # Imported here: distributed.py needs jax, and a task's data (tasks.base) reads this
      # module's checksums without jax.
      from gradalign_jax.distributed import Processes
      processes = Processes()
    if stop_after is not None and processes.count > 1:
      raise RunDirError("stop_after stops one process of the job and leaves the others waiting "
                        "at its end: use it in a one-process run")
    self.path = path
    self.settings = json.loads(json.dumps(settings))
    self.inputs = json.loads(json.dumps(inputs or {}))
    self.overwrite = overwrite
    self.stop_after = stop_after
    self.processes = processes
    self.groups_done = 0
    self.manifest: dict[str, dict[str, str]] = {}
    self._mine: dict[str, dict[str, str]] = {}  # a worker's parts, for its own manifest
    self._locked = self._open = False
    if processes.lead:  # the others would race process 0's overwrite and lock
      self.check()

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  # --- checks (read only)

  def check(self, lock: bool = True) -> None:
    """Refuses, writing nothing, a path this run cannot use (see the module docstring);
    ``lock=False``: not the lock (another process of this job holds it)."""
    path = self.path
    if os.path.exists(path) and not os.path.isdir(path):
      raise RunDirError(f"--out={path} is a file, not a directory; pass a directory path")
    parent = path
    while not os.path.exists(parent):
      parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent):
      raise RunDirError(f"--out={path}: {parent} is a file, so the directory cannot be made; "
                        "pass another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise RunDirError(f"--out={path}: {parent} is not writable by this user; pass a "
                        "writable --out or fix its permissions")
    if not os.path.isdir(path) or not os.listdir(path):
      return
    theirs = self._recorded()
    foreign = [n for n in os.listdir(path)
               if n not in (CONFIG, MANIFEST, LOCK, PARTS) and not n.endswith(OUTPUT_SUFFIXES)]
    if theirs is None or foreign:
      what = _describe(os.listdir(path) if theirs is None else foreign)
      raise RunDirError(
          f"--out={path} is not empty and is not a run directory of this tool (it holds "
          f"{what}); nothing was changed there. Pass a new or empty --out"
          + ("" if theirs is None else ", or move those files out first"))
    if lock:
      self._check_lock()
    if self.overwrite:
      return
    diff = {k: (theirs.get(k), v) for k, v in self.settings.items() if theirs.get(k) != v}
    if diff:
      what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
      raise RunDirError(f"{path} holds a run with other settings ({what}); pass the same "
                        "flags to resume it, another --out, or --overwrite to start over")
    recorded = theirs.get("inputs")
    if recorded is None:
      return  # a run from before inputs were recorded: open() records them
    changed = sorted(k for k in set(recorded) | set(self.inputs)
                     if recorded.get(k) != self.inputs.get(k))
    if changed:
      raise RunDirError(
          f"{path} holds a run made from other inputs: {', '.join(changed)} changed since "
          "(content, size or modification time); its parts would mix old and new results. "
          "Restore the original, pass another --out, or --overwrite to start over")

  def _recorded(self) -> dict | None:
    """config.json's content, or None when the directory has none."""
    path = self.file(CONFIG)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        theirs = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise RunDirError(f"{path} cannot be read ({type(e).__name__}: {e}); the run there "
                        "cannot be resumed or safely deleted: restore the file, delete the "
                        "directory yourself, or pass another --out") from None
    if not isinstance(theirs, dict) or "students" not in theirs:
      raise RunDirError(f"{path} is not this tool's run config; nothing was changed. Pass a "
                        "new or empty --out")
    return theirs

  def _check_lock(self) -> None:
    """Refuses a directory another live process holds; a dead holder's lock may be taken."""
    path = self.file(LOCK)
    try:
      with open(path) as f:
        holder = json.load(f)
      host, pid = holder["host"], int(holder["pid"])
    except FileNotFoundError:
      return
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise RunDirError(f"{path} cannot be read ({type(e).__name__}); if no other run is "
                        "writing to this directory, delete that file and rerun") from None
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
      return
    raise RunDirError(
        f"{self.path} is being written by process {pid} on {host} (lock file {path}); wait "
        "for it to finish or pass another --out. If that process is gone (another machine "
        "cannot be checked from here), delete the lock file and rerun")

  # --- writing

  @contextlib.contextmanager
  def open(self) -> Iterator["RunDir"]:
    """Takes the lock, starts over (``overwrite``) or checks the parts against the manifest
    (a corrupt or unlisted part is logged and deleted: its group is recomputed), writes
    config.json; releases the lock on exit. In a job of several processes process 0 does
    all that, then the others (waiting at a barrier until then) check the settings against
    its config.json and read its manifest."""
    if not self.processes.lead:
      self.processes.barrier("rundir-open")
      if not os.path.exists(self.file(MANIFEST)):
        raise RunDirError(
            f"--out={self.path}: process 0 has opened the run there, but process "
            f"{self.processes.index} on {socket.gethostname()} does not see its files; put "
            "--out on a filesystem every host mounts at the same path (NFS, Filestore, Lustre)")
      self.overwrite = False  # process 0 has started over: compare with its config.json
      self.check(lock=False)
      with open(self.file(MANIFEST)) as f:
        self.manifest = json.load(f)["parts"]
      self._open = True
      try:
        yield self
      finally:
        self._open = False
      return
    self.check()  # again: the directory may have changed while the models loaded
    os.makedirs(self.path, exist_ok=True)
    self._lock()
    try:
      if self.overwrite:
        for name in os.listdir(self.path):
          if name != LOCK:
            p = self.file(name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
      _write_json(self.file(CONFIG), dict(self.settings, inputs=self.inputs))
      self._verify_parts()
      self._open = True
      self.processes.barrier("rundir-open")
      yield self
    finally:
      self._open = False
      self._unlock()

  def _lock(self) -> None:
    path, tmp = self.file(LOCK), self.file(f"{LOCK}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
      json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    try:
      try:
        os.link(tmp, path)  # atomic: fails when a lock exists
      except FileExistsError:
        self._check_lock()  # raises unless the holder is gone
        _log.warning("%s: taking over the lock of a process that is gone", self.path)
        os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    self._locked = True

  def _unlock(self) -> None:
    if self._locked:
      self._locked = False
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.file(LOCK))

  def part_dir(self, tag: str, index: int) -> str:
    return os.path.join(self.path, PARTS, tag, f"q{index:06d}")

  @staticmethod
  def _key(tag: str, index: int) -> str:
    return f"{tag}/q{index:06d}"

  def _checksums(self, directory: str) -> dict[str, str]:
    return {n: sha256_file(os.path.join(directory, n)) for n in sorted(os.listdir(directory))}

  def _verify_parts(self) -> None:
    """Loads the manifest and keeps only the parts whose files match it."""
    path = self.file(MANIFEST)
    parts_root = self.file(PARTS)
    on_disk = {}
    if os.path.isdir(parts_root):
      for t in sorted(os.listdir(parts_root)):
        for q in sorted(os.listdir(os.path.join(parts_root, t))):
          on_disk[f"{t}/{q}"] = os.path.join(parts_root, t, q)
    if not os.path.exists(path):
      # A run from before the manifest: parts that read back are adopted as they are.
      self.manifest = {}
      for key, d in on_disk.items():
        if not key.endswith(".tmp") and self._readable(d):
          self.manifest[key] = self._checksums(d)
      if self.manifest:
        _log.warning("%s: %d parts written before checksums were kept adopted as found",
                     self.path, len(self.manifest))
    else:
      try:
        with open(path) as f:
          self.manifest = json.load(f)["parts"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}); delete it to "
                          "recompute every part, or --overwrite to start over") from None
    adopted = self._adopt_process_manifests()
    for key, d in on_disk.items():
      want = self.manifest.get(key)
      if want is not None and self._checksums(d) == want:
        continue
      why = "was never finished" if want is None else "does not match its checksum"
      if not key.endswith(".tmp"):
        _log.warning("%s: part %s %s; deleting it, its group is recomputed", self.path,
                     d, why)
      shutil.rmtree(d)
      self.manifest.pop(key, None)
    self.manifest = {k: v for k, v in self.manifest.items() if k in on_disk}
    _write_json(path, {"parts": self.manifest})
    for p in adopted:  # only now: until manifest.json holds their entries, they do
      os.remove(p)

  def _process_manifest(self, index: int) -> str:
    return self.file(f"manifest.p{index}.json")

  def _adopt_process_manifests(self) -> list[str]:
    """Adds the parts that other processes (of this job or of a killed one) recorded in their
    own manifests to ``self.manifest``; returns those files (deleted by the caller once
    manifest.json holds their entries)."""
    found = sorted(n for n in os.listdir(self.path)
                   if n.startswith("manifest.p") and n.endswith(".json"))
    for name in found:
      try:
        with open(self.file(name)) as f:
          self.manifest.update(json.load(f)["parts"])
      except (OSError, ValueError, KeyError, TypeError) as e:
        _log.warning("%s cannot be read (%s); the parts it recorded are recomputed",
                     self.file(name), type(e).__name__)
    return [self.file(n) for n in found]

  def gather(self) -> bool:
    """Waits until every process has written its share (a barrier), then process 0 folds
    their manifests into manifest.json. Returns True on process 0 (it merges and reports),
    False on the others. Alone: returns True at once."""
    self.processes.barrier("rundir-gather")
    if not self.processes.lead:
      return False
    adopted = self._adopt_process_manifests()
    _write_json(self.file(MANIFEST), {"parts": self.manifest})
    for p in adopted:
      os.remove(p)
    return True

  def deal(self, todo: Sequence) -> list:
    """This process's share of ``todo`` (``distributed.deal``); alone: all of it. Every
    process must deal the same list, so all of them meet here (a barrier) before any writes
    a part: a part written before another process read the manifest would drop its group
    from that process's ``todo`` only, and the two would deal different lists."""
    self.processes.barrier("rundir-deal")
    return self.processes.deal(todo)

  @staticmethod
  def _readable(directory: str) -> bool:
    try:
      for name in os.listdir(directory):
        pd.read_parquet(os.path.join(directory, name))
    except Exception:  # pyarrow raises several types for a bad file
      return False
    return True

  def done(self, tag: str, index: int) -> bool:
    return self._key(tag, index) in self.manifest

  def todo(self, tag: str, groups: Sequence[Sequence[int]], label: str | None = None
           ) -> list[list[int]]:
    """The groups that lack a finished part, in order (logs how many are already done)."""
    todo = [list(g) for g in groups if not all(self.done(tag, i) for i in g)]
    if len(todo) < len(groups):
      _log.info("%s: %d of %d question groups already done in %s; resuming", label or tag,
                len(groups) - len(todo), len(groups), self.path)
    return todo

  def progress(self, todo: Sequence[list[int]], label: str,
               unit: str = "questions") -> Iterator[list[int]]:
    """Yields the groups of ``todo`` (of ``unit``: questions, seeds), logging progress after
    each; raises Interrupt once ``stop_after`` groups of this RunDir are done."""
    start = time.time()
    for n, group in enumerate(todo):
      if self.stop_after is not None and self.groups_done >= self.stop_after:
        raise Interrupt(f"stopped after {self.groups_done} groups")
      t0 = time.time()
      yield group
      self.groups_done += 1
      bar = "#" * (20 * (n + 1) // len(todo))
      _log.info("%s [%-20s] %s %d–%d done (group %d/%d in %.1f s; %.0f s elapsed, ~%.0f s "
                "left)", label, bar, unit, group[0], group[-1], n + 1, len(todo), time.time() - t0,
                time.time() - start, (len(todo) - n - 1) * (time.time() - t0))

  def write_parts(self, tag: str, parts: dict[int, dict[str, list[dict]]]) -> None:
    """Writes each question's tables ({index: {table: rows}}) as one directory, renamed into
    place at the end, then records its checksums; a question already done is left as it is."""
    if not self._open:
      raise RuntimeError("RunDir.write_parts outside `with run_dir.open():`")
    for index, tables in parts.items():
      if self.done(tag, index):
        continue
      final = self.part_dir(tag, index)
      tmp = final + ".tmp"
      for stale in (tmp, final):
        shutil.rmtree(stale, ignore_errors=True)
      os.makedirs(tmp)
      for name, rows in tables.items():
        pd.DataFrame(rows).to_parquet(os.path.join(tmp, f"{name}.parquet"))
      sums = self._checksums(tmp)
      os.rename(tmp, final)
      self.manifest[self._key(tag, index)] = sums
      self._mine[self._key(tag, index)] = sums
    if self.processes.lead:
      _write_json(self.file(MANIFEST), {"parts": self.manifest})
    else:  # manifest.json is process 0's alone
      _write_json(self._process_manifest(self.processes.index), {"parts": self._mine})

  def merge(self, tags: Sequence[str], num_questions: int,
            tables: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Each table concatenated from every part, student by student then question by question;
    every file checked against the manifest as it is read."""
    out = {t: [] for t in tables}
    for t_ in tags:
      for i in range(num_questions):
        want = self.manifest.get(self._key(t_, i), {})
        for name in tables:
          path = os.path.join(self.part_dir(t_, i), f"{name}.parquet")
          with open(path, "rb") as f:
            data = f.read()
          if hashlib.sha256(data).hexdigest() != want.get(f"{name}.parquet"):
            raise RunDirError(f"{path} changed after it was written (checksum differs from "
                              f"{self.file(MANIFEST)}); rerun the same command: it recomputes "
                              "that part")
          out[name].append(pd.read_parquet(io.BytesIO(data)))
    return {name: pd.concat(frames, ignore_index=True) for name, frames in out.items()}


__all__ = ["Interrupt", "RunDir", "RunDirError", "sha256_file", "tag"]
