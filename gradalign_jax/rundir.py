"""A run directory: the settings it was made with, atomic per-question parts, resume, merge.

    run = rundir.RunDir(out, settings, overwrite=False)   # refuses other settings in out
    for student in students:
      tag = rundir.tag(student)
      for group in run.progress(run.todo(tag, groups), tag):  # groups without finished parts
        run.write_parts(tag, compute(group))                  # {index: {table: rows}}
    frames = run.merge(tags, num_questions, tables=("nodes", …))

Layout: ``config.json`` (the settings: a flat JSON object), ``parts/<tag>/q<index>/`` one
directory per (student, question) with one parquet file per table, written under a ``.tmp``
name and renamed into place, so a killed run leaves either a whole part or none; a rerun with
the same settings skips finished parts and gives identical tables.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Iterator, Sequence

import pandas as pd

_log = logging.getLogger(__name__)


def tag(name: str) -> str:
  """A directory name for a model reference (toy name, path or hub id)."""
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class Interrupt(Exception):
  """Raised by ``RunDir.progress`` once ``stop_after`` groups are done (tests simulate a killed
  run with it)."""


class RunDir:
  """One run's directory. settings: a JSON-able flat dict of everything that decides the
  results; an existing directory must hold the same settings (``check``). overwrite: delete
  ``path`` first. stop_after: raise Interrupt after that many groups (None: never)."""

  def __init__(self, path: str, settings: dict, *, overwrite: bool = False,
               stop_after: int | None = None):
    self.path = path
    self.settings = json.loads(json.dumps(settings))
    self.stop_after = stop_after
    self.groups_done = 0
    if overwrite:
      shutil.rmtree(path, ignore_errors=True)
    self.check()

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def check(self) -> None:
    """Writes config.json, or checks that a resumed run asks for the same thing, naming every
    setting that differs."""
    path = self.file("config.json")
    if os.path.exists(path):
      with open(path) as f:
        theirs = json.load(f)
      diff = {k: (theirs.get(k), v) for k, v in self.settings.items() if theirs.get(k) != v}
      if diff:
        what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{self.path} holds a run with other settings ({what}); pass the same "
                         "flags to resume it, another --out, or --overwrite to start over")
      return
    os.makedirs(self.path, exist_ok=True)
    with open(path, "w") as f:
      json.dump(self.settings, f, indent=1)

  def part_dir(self, tag: str, index: int) -> str:
    return os.path.join(self.path, "parts", tag, f"q{index:06d}")

  def done(self, tag: str, index: int) -> bool:
    return os.path.isdir(self.part_dir(tag, index))

  def todo(self, tag: str, groups: Sequence[Sequence[int]], label: str | None = None
           ) -> list[list[int]]:
    """The groups that lack a finished part, in order (logs how many are already done)."""
    todo = [list(g) for g in groups if not all(self.done(tag, i) for i in g)]
    if len(todo) < len(groups):
      _log.info("%s: %d of %d question groups already done in %s; resuming", label or tag,
                len(groups) - len(todo), len(groups), self.path)
    return todo

  def progress(self, todo: Sequence[list[int]], label: str) -> Iterator[list[int]]:
    """Yields the groups of ``todo``, logging progress after each; raises Interrupt once
    ``stop_after`` groups of this RunDir are done."""
    start = time.time()
    for n, group in enumerate(todo):
      if self.stop_after is not None and self.groups_done >= self.stop_after:
        raise Interrupt(f"stopped after {self.groups_done} groups")
      t0 = time.time()
      yield group
      self.groups_done += 1
      bar = "#" * (20 * (n + 1) // len(todo))
      _log.info("%s [%-20s] questions %d–%d done (group %d/%d in %.1f s; %.0f s elapsed, ~%.0f s "
                "left)", label, bar, group[0], group[-1], n + 1, len(todo), time.time() - t0,
                time.time() - start, (len(todo) - n - 1) * (time.time() - t0))

  def write_parts(self, tag: str, parts: dict[int, dict[str, list[dict]]]) -> None:
    """Writes each question's tables ({index: {table: rows}}) as one directory, renamed into
    place at the end; a question already done is left as it is."""
    for index, tables in parts.items():
      final = self.part_dir(tag, index)
      if os.path.isdir(final):
        continue
      tmp = final + ".tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
      for name, rows in tables.items():
        pd.DataFrame(rows).to_parquet(os.path.join(tmp, f"{name}.parquet"))
      os.rename(tmp, final)

  def merge(self, tags: Sequence[str], num_questions: int,
            tables: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Each table concatenated from every part, student by student then question by question."""
    out = {t: [] for t in tables}
    for t_ in tags:
      for i in range(num_questions):
        for name in tables:
          out[name].append(pd.read_parquet(os.path.join(self.part_dir(t_, i), f"{name}.parquet")))
    return {name: pd.concat(frames, ignore_index=True) for name, frames in out.items()}


__all__ = ["Interrupt", "RunDir", "tag"]
