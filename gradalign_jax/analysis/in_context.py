"""The in-context accuracy table: how often each teacher spec's model answers correctly when it
reads the spec's context, next to the student's plain accuracy.

``table`` is experiments/in_context_accuracy.py's accuracy table: one row per (student, spec,
question) with ``n_samples``, ``n_correct``, ``accuracy`` (NaN when the context was
unavailable) and ``context`` ("ok" or why the question could not carry the context). The
student's plain rows have spec ``BASELINE``.

Intervals are percentile bootstraps over *questions* (a question's samples share its
difficulty, so resampling samples would understate the uncertainty); differences are paired
per question against the student's plain accuracy on the same questions, so a context that
is only available on easy questions (a correct rollout demo) is not credited for that.
Every function is pure: ``render_report`` gives report.md's text and ``plot_accuracy`` a
Figure; experiments/in_context_accuracy.py writes them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradalign_jax.analysis import stats
from gradalign_jax.analysis.plots import _empty, _figure
from gradalign_jax.analysis.markdown import _config_value, _num, _table
from gradalign_jax.analysis.tables import BASELINE

COLUMNS = ("student", "spec", "question_id", "n_samples", "n_correct", "accuracy", "context")


def _ci(values, n_boot: int, seed: int) -> tuple[float, float]:
  """Bootstrap 95% interval over questions; NaN with fewer than 2 (nothing to resample)."""
  values = np.asarray(values, np.float64)
  if np.sum(np.isfinite(values)) < 2:
    return (np.nan, np.nan)
  return stats.bootstrap_ci(values, n_boot=n_boot, seed=seed)


def _ordered(series) -> list:
  return list(dict.fromkeys(series.tolist()))


def summarize(table: pd.DataFrame, config: dict | None = None, *, n_boot: int = 2000,
              seed: int = 0) -> dict:
  """Per student and spec: accuracy (mean over questions with the context), its interval,
  question counts, why contexts were unavailable, and the paired difference vs the student's
  plain accuracy on the same questions.

  Returns {"config", "specs": [BASELINE, …], "students": {student: {spec: entry}}}; entry
  keys: accuracy, ci, n_questions, n_unavailable, unavailable (reason → count), n_samples,
  n_correct, baseline_same_questions, difference, difference_ci.
  """
  missing = [c for c in COLUMNS if c not in table.columns]
  if missing:
    raise ValueError(f"accuracy table lacks columns {missing}; build it with "
                     "experiments/in_context_accuracy.py")
  dup = table.duplicated(["student", "spec", "question_id"])
  if dup.any():
    raise ValueError(f"question ids repeat within a student and spec (e.g. "
                     f"{table.loc[dup, 'question_id'].iloc[0]!r}); give every question its own id")
  specs = _ordered(table["spec"])
  if BASELINE in specs:
    specs = [BASELINE] + [s for s in specs if s != BASELINE]
  out = {"config": config or {}, "specs": specs, "students": {}}
  for student in _ordered(table["student"]):
    rows = table[table["student"] == student]
    base = rows[rows["spec"] == BASELINE].set_index("question_id")["accuracy"]
    entries = {}
    for spec in specs:
      sub = rows[rows["spec"] == spec]
      ok = sub[sub["context"] == "ok"]
      acc = ok["accuracy"].to_numpy(np.float64)
      paired = acc - base.reindex(ok["question_id"]).to_numpy(np.float64)
      same = base.reindex(ok["question_id"]).to_numpy(np.float64)
      entries[spec] = dict(
          accuracy=float(np.mean(acc)) if len(acc) else np.nan,
          ci=_ci(acc, n_boot, seed),
          n_questions=int(len(ok)), n_unavailable=int(len(sub) - len(ok)),
          unavailable={str(k): int(v) for k, v in
                       sub.loc[sub["context"] != "ok", "context"].value_counts().items()},
          n_samples=int(ok["n_samples"].sum()), n_correct=int(ok["n_correct"].sum()),
          baseline_same_questions=float(np.nanmean(same)) if np.isfinite(same).any()
          else np.nan,
          difference=float(np.nanmean(paired)) if np.isfinite(paired).any() else np.nan,
          difference_ci=_ci(paired, n_boot, seed))
    out["students"][student] = entries
  return out


def _cell(entry: dict | None) -> str:
  if entry is None or entry["n_questions"] == 0:
    return "n/a"
  lo, hi = entry["ci"]
  return f"{_num(entry['accuracy'], 2)} [{_num(lo, 2)}, {_num(hi, 2)}]"


def _signed(x) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:+.2f}"


def _difference_cell(entry: dict | None) -> str:
  if entry is None or entry["n_questions"] == 0:
    return "n/a"
  lo, hi = entry["difference_ci"]
  return f"{_signed(entry['difference'])} [{_signed(lo)}, {_signed(hi)}]"


def render_report(summary: dict, plot: str | None = None) -> str:
  """report.md's markdown: accuracy per spec (rows) and student (columns), paired
  differences, availability of each context, the plot (a png path relative to the report)."""
  students, specs = list(summary["students"]), summary["specs"]
  get = lambda student, spec: summary["students"][student].get(spec)
  lines = ["# In-context accuracy", "",
           "Accuracy of each teacher spec's model answering with the spec's context in its "
           "prompt, and of the student with none. Cells: mean over questions of the fraction "
           "of correct samples [95% bootstrap interval over questions]; a spec's accuracy "
           "counts only the questions where its context was available.", ""]
  lines += _table(["spec"] + students,
                  [[s] + [_cell(get(st, s)) for st in students] for s in specs])
  lines += ["## Difference vs the student's plain accuracy", "",
            "Paired per question, on the questions where the context was available: "
            "mean(spec − student) [95% bootstrap interval].", ""]
  lines += _table(["spec"] + students,
                  [[s] + [_difference_cell(get(st, s)) for st in students]
                   for s in specs if s != BASELINE])
  lines += ["## Context availability", "", "Questions with the context / questions; reasons "
            "for the rest.", ""]
  rows = []
  for s in specs:
    cells = []
    for st in students:
      e = get(st, s)
      if e is None:
        cells.append("n/a")
        continue
      why = "; ".join(f"{n}× {r}" for r, n in e["unavailable"].items())
      cells.append(f"{e['n_questions']}/{e['n_questions'] + e['n_unavailable']}"
                   + (f" ({why})" if why else ""))
    rows.append([s] + cells)
  lines += _table(["spec"] + students, rows)
  if plot:
    lines += [f"![in-context accuracy]({plot})", ""]
  config = summary.get("config") or {}
  if config:
    lines += ["## Settings", ""]
    lines += [f"- {k}: {f'{v:.0f}' if k == 'seconds' else _config_value(v)}"
              for k, v in config.items()] + [""]
  return "\n".join(lines)


def plot_accuracy(summary: dict) -> Figure:
  """Grouped bars: accuracy per spec (the student's plain accuracy first), one bar per
  student, 95% interval error bars."""
  students, specs = list(summary["students"]), summary["specs"]
  fig, (ax,) = _figure(1, max(4.0, 1.1 * len(specs) * max(len(students), 1) ** 0.5 + 2), 4.2)
  if not students or not specs:
    _empty(ax)
    return fig
  x = np.arange(len(specs))
  width = 0.8 / len(students)
  for k, student in enumerate(students):
    ent = [summary["students"][student].get(s) or {} for s in specs]
    acc = np.array([_nan(e.get("accuracy")) for e in ent])
    lo = np.array([_nan((e.get("ci") or (None, None))[0]) for e in ent])
    hi = np.array([_nan((e.get("ci") or (None, None))[1]) for e in ent])
    err = np.vstack([np.where(np.isfinite(lo), acc - lo, 0),
                     np.where(np.isfinite(hi), hi - acc, 0)])
    ax.bar(x + (k - (len(students) - 1) / 2) * width, np.nan_to_num(acc), width, yerr=err,
           capsize=3, label=student)
  ax.set_xticks(x, [s.replace(":", ":\n", 1) for s in specs], fontsize=8, rotation=30,
                ha="right")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("accuracy")
  ax.set_title("accuracy with each teacher context (95% CI over questions)")
  ax.legend(fontsize=8)
  return fig


def _nan(x) -> float:
  return np.nan if x is None else float(x)


__all__ = ["BASELINE", "plot_accuracy", "render_report", "summarize"]
