"""From the sweep's tables to ``summary.json`` and ``report.md`` (MATH.md, "Alignment").

Inputs are the three tables of ``pipeline.diagnose`` (pandas DataFrames; every column is
documented in ``analysis/tables.py``), for the reported directions (the first is the primary
one):

- rollouts: one row per on-policy rollout; ``student, spec, question_id, rollout, correct,
  length, n_nodes``, per direction ``mean_<d>, sum_dot_<d>, sum_normprod_<d>, sum_dd_<d>,
  n_pos_<d>``, and ``sum_gg`` (sums over the informative nodes of the rollout's path).
- questions: one row per (student, spec, question_id); ``n_rollouts, n_correct, accuracy,
  context`` ("ok" or why the teacher context could not be built) and ``mean_<d>``.
- nodes: one row per scored node; ``student, spec, depth, depth_norm, informative``,
  ``align_<d>, norm_<d>`` and the covariates (``kl_pq, kl_qp, l2_pq, cos_pq, entropy_p,
  entropy_q, norm_ideal``).

Every function is pure (the sweep writes the files): ``summarize`` returns plain Python
values (NaN where a quantity is undefined), ``to_json`` turns NaN into null and ``render``
gives report.md's text.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd

from gradalign_jax.analysis import stats, tables
from gradalign_jax.gradients import COVARIATES

ALPHA = 0.05
NODE_COVARIATES = COVARIATES + ("depth", "depth_norm", "norm_ideal")


# ---------------------------------------------------------------------------------------
# Small helpers


def _check_columns(df: pd.DataFrame, columns, table: str) -> pd.DataFrame:
  """df with every listed column; an empty table may lack them (they are added, empty)."""
  missing = [c for c in columns if c not in df.columns]
  if missing and len(df):
    raise ValueError(f"{table} table lacks columns {missing}; build it with "
                     f"experiments/alignment_sweep.py's schema (see analysis/report.py)")
  return df.reindex(columns=list(df.columns) + missing) if missing else df


def _rollout_columns(dirs) -> list[str]:
  """The rollouts-table columns the summary reads (the per-path lists are not needed)."""
  per_dir = [c for c in tables.direction_columns(tables.ROLLOUT_DIRECTION_COLUMNS, dirs)
             if not c.startswith("path_")]
  return ["student", "spec", "question_id", "rollout", "correct", "n_nodes", "sum_gg"] + per_dir


def _float(x) -> float:
  return float(x) if x is not None and np.isfinite(x) else math.nan


def _ratio(num: float, den: float) -> float:
  return float(num / den) if den > 0 else math.nan


def _mean(values) -> float:
  x = np.asarray(values, np.float64)
  x = x[np.isfinite(x)]
  return float(x.mean()) if len(x) else math.nan


def _comparison(c: stats.Comparison) -> dict:
  return {k: (int(v) if k in ("n_a", "n_b") else _float(v)) for k, v in c.as_dict().items()}


def _ordered_unique(*series) -> list:
  seen = {}
  for s in series:
    for v in s:
      seen.setdefault(v, None)
  return list(seen)


# ---------------------------------------------------------------------------------------
# Aggregates


def split_block(rollouts: pd.DataFrame, directions, *, n_boot: int = 2000, seed: int = 0) -> dict:
  """Aggregates of one split (a set of rollouts) under MATH.md's four definitions.

  rollouts: rows of the rollouts table (any subset; may be empty). A node counts once per
  rollout whose path crosses it, so summing the rollouts' per-path sums gives the weighted
  and pooled cosines over (rollout, node) pairs. Returns ``{"n_rollouts", "n_questions",
  "n_nodes", "n_scored" (rollouts with ≥ 1 informative node), d: {"mean", "mean_ci": [lo,
  hi], "weighted", "pooled", "frac_pos"}}`` for each d in directions; NaN where undefined.
  """
  dirs = list(directions)
  rollouts = _check_columns(rollouts, _rollout_columns(dirs), "rollouts")
  block = {"n_rollouts": int(len(rollouts)),
           "n_questions": int(rollouts["question_id"].nunique()),
           "n_nodes": int(rollouts["n_nodes"].sum()),
           "n_scored": int((rollouts["n_nodes"] > 0).sum())}
  for d in dirs:
    means = rollouts[f"mean_{d}"].to_numpy(np.float64)
    sums = tables.rollout_sums(rollouts, d).summary()
    block[d] = {
        "mean": _mean(means),
        "mean_ci": [_float(v) for v in stats.bootstrap_ci(means, n_boot=n_boot, seed=seed)],
        "weighted": sums["weighted_cos"],
        "pooled": sums["pooled_cos"],
        "frac_pos": sums["frac_positive"],
    }
  return block


def _tests(rollouts: pd.DataFrame, d: str, n_boot: int, seed: int) -> dict:
  """Incorrect vs correct rollouts of one (student, spec) for direction d."""
  col = f"mean_{d}"
  correct = rollouts["correct"].astype(bool)
  inc, cor = rollouts.loc[~correct, col].to_numpy(float), rollouts.loc[correct, col].to_numpy(float)
  # paired: per-question mean of its rollouts' scores on each side, questions with both
  per_q = rollouts.groupby(["question_id", correct.rename("is_correct")])[col].mean().unstack()
  per_q = per_q.reindex(columns=[False, True])
  return {
      "mann_whitney": _comparison(stats.mann_whitney(inc, cor)),
      "wilcoxon": _comparison(stats.paired_wilcoxon(per_q[False].to_numpy(float),
                                                    per_q[True].to_numpy(float))),
      "difference": _mean(inc) - _mean(cor),
      "difference_ci": [_float(v) for v in stats.bootstrap_difference_ci(
          inc, cor, n_boot=n_boot, seed=seed)],
  }


def _covariates(nodes: pd.DataFrame, primary: str) -> dict:
  """Spearman ρ of align_<primary> with each node covariate, over informative nodes."""
  informative = nodes[nodes["informative"].astype(bool)]
  align = informative[f"align_{primary}"].to_numpy(float)
  out = {}
  for name in NODE_COVARIATES + (f"norm_{primary}",):
    rho, p = stats.spearman(align, informative[name].to_numpy(float))
    out[name] = {"spearman": rho, "p": p}
  return out


def _question_wins(questions: pd.DataFrame, specs, primary: str) -> tuple[dict, int]:
  """Fraction of common questions on which each spec's question mean is the highest.

  Common: every spec has a usable context and a finite mean_<primary>. A tie splits the win
  equally, so the fractions sum to 1. Returns ({spec: fraction}, n common questions).
  """
  ok = questions[(questions["context"] == "ok")
                 & np.isfinite(questions[f"mean_{primary}"].astype(float))]
  table = ok.pivot_table(index="question_id", columns="spec", values=f"mean_{primary}",
                         aggfunc="first").reindex(columns=specs).dropna()
  if table.empty:
    return {s: math.nan for s in specs}, 0
  values = table.to_numpy(float)
  best = values == values.max(axis=1, keepdims=True)
  wins = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
  return {s: float(w) for s, w in zip(specs, wins)}, int(len(table))


def summarize(rollouts: pd.DataFrame, questions: pd.DataFrame, nodes: pd.DataFrame,
              directions=("reverse_kl",), config: dict | None = None, *, n_boot: int = 2000,
              seed: int = 0) -> dict:
  """The content of summary.json.

  directions: those to report, the first being the primary one (best spec, question wins,
  covariates and findings use it). config: the run's settings, copied verbatim. Per student:
  ``accuracy`` (Σ n_correct / Σ n_rollouts over all its question rows), ``n_questions`` and
  per spec ``{"accuracy"`` (over the spec's scored rollouts, so questions without a context
  drop out), ``"correct", "incorrect", "all"`` (split_block), ``"questions": {"n",
  "context_unavailable": {reason: count}}, "tests": {d: {"mann_whitney", "wilcoxon",
  "difference", "difference_ci"}}, "covariates": {name: {"spearman", "p"}}}``, then
  ``best_spec``, ``question_wins`` and ``n_common_questions``. ``findings`` answers the
  research questions for the primary direction (see _findings).
  """
  dirs = list(directions)
  if not dirs:
    raise ValueError("directions is empty; pass at least the primary one, e.g. ('reverse_kl',)")
  primary = dirs[0]
  rollouts = _check_columns(rollouts, _rollout_columns(dirs), "rollouts")
  questions = _check_columns(
      questions, ["student", "spec", "question_id", "n_rollouts", "n_correct", "context"]
      + [f"mean_{d}" for d in dirs], "questions")
  nodes = _check_columns(
      nodes, ["student", "spec", "informative", f"align_{primary}", f"norm_{primary}"]
      + list(NODE_COVARIATES), "nodes")

  students = {}
  for student in _ordered_unique(questions["student"], rollouts["student"]):
    s_roll = rollouts[rollouts["student"] == student]
    s_q = questions[questions["student"] == student]
    s_nodes = nodes[nodes["student"] == student]
    specs = {}
    for spec in _ordered_unique(s_q["spec"], s_roll["spec"]):
      r = s_roll[s_roll["spec"] == spec]
      q = s_q[s_q["spec"] == spec]
      correct = r["correct"].astype(bool)
      unavailable = q.loc[q["context"] != "ok", "context"].value_counts()
      specs[spec] = {
          "accuracy": _ratio(float(correct.sum()), float(len(r))),
          "correct": split_block(r[correct], dirs, n_boot=n_boot, seed=seed),
          "incorrect": split_block(r[~correct], dirs, n_boot=n_boot, seed=seed),
          "all": split_block(r, dirs, n_boot=n_boot, seed=seed),
          "questions": {"n": int(q["question_id"].nunique()),
                        "context_unavailable": {str(k): int(v) for k, v in unavailable.items()}},
          "tests": {d: _tests(r, d, n_boot, seed) for d in dirs},
          "covariates": _covariates(s_nodes[s_nodes["spec"] == spec], primary),
      }
    all_means = {spec: b["all"][primary]["mean"] for spec, b in specs.items()}
    finite = {k: v for k, v in all_means.items() if np.isfinite(v)}
    wins, n_common = _question_wins(s_q, list(specs), primary)
    students[student] = {
        "accuracy": _ratio(float(s_q["n_correct"].sum()), float(s_q["n_rollouts"].sum())),
        "n_questions": int(s_q["question_id"].nunique()),
        "specs": specs,
        "best_spec": max(finite, key=finite.get) if finite else None,
        "question_wins": wins,
        "n_common_questions": n_common,
    }
  return {"config": dict(config or {}), "directions": dirs, "students": students,
          "findings": _findings(students, primary)}


def _findings(students: dict, primary: str) -> dict:
  """Per student, for the primary direction: how many specs score higher on incorrect (or
  correct) rollouts, how many of those significantly (Mann–Whitney, p < ALPHA), and whether
  the best spec differs between students."""
  per_student = {}
  for student, s in students.items():
    rows = {spec: b["tests"][primary] for spec, b in s["specs"].items()}
    diff = {spec: t["difference"] for spec, t in rows.items()}
    sig = {spec: bool(t["mann_whitney"]["p_value"] < ALPHA) for spec, t in rows.items()}
    inc_higher = [spec for spec, v in diff.items() if np.isfinite(v) and v > 0]
    cor_higher = [spec for spec, v in diff.items() if np.isfinite(v) and v < 0]
    per_student[student] = {
        "n_specs": len(rows),
        "n_compared": sum(bool(np.isfinite(v)) for v in diff.values()),
        "n_incorrect_higher": len(inc_higher),
        "n_incorrect_higher_significant": sum(sig[s_] for s_ in inc_higher),
        "n_correct_higher": len(cor_higher),
        "n_correct_higher_significant": sum(sig[s_] for s_ in cor_higher),
        "specs_incorrect_higher": inc_higher,
        "specs_significant": [s_ for s_ in rows if sig[s_]],
        "best_spec": s["best_spec"],
    }
  best = {k: v["best_spec"] for k, v in per_student.items() if v["best_spec"] is not None}
  return {"direction": primary, "alpha": ALPHA, "students": per_student, "best_spec": best,
          "best_spec_differs": len(set(best.values())) > 1}


def to_json(summary: dict) -> str:
  """summary as strict JSON: NaN/inf → null, numpy scalars → Python numbers, tuples → lists.
  """

  def clean(x):
    if isinstance(x, dict):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
      return [clean(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
      return bool(x)
    if isinstance(x, (int, np.integer)):
      return int(x)
    if isinstance(x, (float, np.floating)):
      return float(x) if np.isfinite(x) else None
    return x

  return json.dumps(clean(summary), indent=2, allow_nan=False)


# ---------------------------------------------------------------------------------------
# report.md


def _num(x, digits: int = 3) -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _p(p) -> str:
  """0.003, 2e-05, or n/a."""
  if p is None or not np.isfinite(p):
    return "n/a"
  if p == 0:
    return "0"
  return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def _ci(ci) -> str:
  return f"[{_num(ci[0])}, {_num(ci[1])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _difference_cell(test: dict) -> str:
  return f"{_num(test['difference'])} ({_p(test['mann_whitney']['p_value'])})"


def _config_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return ", ".join(str(x) for x in v)
  return str(v)


def _findings_text(summary: dict) -> list[str]:
  f = summary["findings"]
  d = f["direction"]
  alpha = f["alpha"]
  lines = []
  for student, s in f["students"].items():
    text = (f"{student}: alignment ({d}) is higher on incorrect rollouts for "
            f"{s['n_incorrect_higher']} of {s['n_specs']} teacher specs "
            f"({s['n_incorrect_higher_significant']} significant at p<{alpha:g}, "
            f"Mann–Whitney U), "
            f"and higher on correct rollouts for {s['n_correct_higher']} "
            f"({s['n_correct_higher_significant']} significant).")
    missing = s["n_specs"] - s["n_compared"]
    if missing:
      text += (f" {missing} spec(s) could not be compared (no correct or no incorrect "
               f"rollouts with an informative node).")
    lines.append(f"- {text}")
  best = f["best_spec"]
  if len(best) > 1:
    pairs = ", ".join(f"{k} → {v}" for k, v in best.items())
    lines.append(f"- The best teacher context differs between students: {pairs}."
                 if f["best_spec_differs"] else
                 f"- The best teacher context is the same for every student: "
                 f"{next(iter(best.values()))} ({pairs}).")
  elif best:
    student, spec = next(iter(best.items()))
    lines.append(f"- The best teacher context for {student} is {spec} (highest mean alignment "
                 f"({d}) over all rollouts).")
  else:
    lines.append("- No teacher context has a scored rollout, so there is no best one.")
  return lines + [""]


def render(summary: dict, plots=()) -> str:
  """The markdown of ``report.md`` from a summary (as returned by summarize, or loaded back
  from summary.json with null for NaN). plots: png paths relative to the report, embedded in
  order."""
  dirs = summary["directions"]
  primary = dirs[0]
  students = summary["students"]
  specs = _ordered_unique(*(s["specs"] for s in students.values()))
  lines = ["# Alignment report", "",
           f"Students: {', '.join(students) or 'none'}  ", f"Teacher specs: {', '.join(specs)}  ",
           "Questions: " + ", ".join(f"{k}: {s['n_questions']}" for k, s in students.items())
           + "  ",
           "Directions: " + ", ".join([f"{primary} (primary)"] + dirs[1:]), ""]
  if summary["config"]:
    lines += _table(["setting", "value"],
                    [[str(k), _config_value(v)] for k, v in summary["config"].items()])

  for student, s in students.items():
    lines += [f"## {student}", "",
              f"Accuracy {_num(s['accuracy'])} over {s['n_questions']} questions. "
              f"Alignment ({primary}): mean cosine per rollout with 95% bootstrap CI; "
              f"difference = incorrect − correct; weighted and pooled cosines are over "
              f"(rollout, node) pairs, correct / incorrect.", ""]
    rows = []
    for spec, b in s["specs"].items():
      t = b["tests"][primary]
      c, i = b["correct"][primary], b["incorrect"][primary]
      rows.append([
          spec, _num(b["accuracy"]),
          f"{b['correct']['n_rollouts']} / {b['incorrect']['n_rollouts']}",
          f"{_num(c['mean'])} {_ci(c['mean_ci'])}", f"{_num(i['mean'])} {_ci(i['mean_ci'])}",
          f"{_num(t['difference'])} {_ci(t['difference_ci'])}", _p(t["mann_whitney"]["p_value"]),
          f"{_p(t['wilcoxon']['p_value'])} ({t['wilcoxon']['n_a']})",
          f"{_num(c['weighted'])} / {_num(i['weighted'])}",
          f"{_num(c['pooled'])} / {_num(i['pooled'])}"])
    lines += _table(["spec", "accuracy", "n correct / incorrect", "correct [CI]",
                     "incorrect [CI]", "difference [CI]", "Mann–Whitney p",
                     "Wilcoxon p (pairs)", "weighted", "pooled"], rows)

    unavailable = {spec: b["questions"]["context_unavailable"] for spec, b in s["specs"].items()
                   if b["questions"]["context_unavailable"]}
    for spec, reasons in unavailable.items():
      why = "; ".join(f"{n} × {r}" for r, n in reasons.items())
      lines.append(f"- {spec}: context unavailable for {sum(reasons.values())} of "
                   f"{s['specs'][spec]['questions']['n']} questions ({why}).")
    if unavailable:
      lines.append("")

    lines += ["Incorrect − correct mean cosine per direction (Mann–Whitney p):", ""]
    lines += _table(["spec"] + list(dirs), [
        [spec] + [_difference_cell(b["tests"][d]) for d in dirs] for spec, b in s["specs"].items()])

    names = _ordered_unique(*(b["covariates"] for b in s["specs"].values()))
    lines += [f"Spearman ρ of node alignment ({primary}) with covariates, informative nodes "
              f"(p in parentheses):", ""]
    lines += _table(["spec"] + names, [
        [spec] + [f"{_num(b['covariates'][n]['spearman'], 2)} ({_p(b['covariates'][n]['p'])})"
                  for n in names] for spec, b in s["specs"].items()])

    wins = ", ".join(f"{spec} {_num(w, 2)}" for spec, w in s["question_wins"].items())
    lines += [f"Best spec (highest mean over all rollouts): {s['best_spec'] or 'n/a'}. "
              f"Question wins over {s['n_common_questions']} questions every spec has: {wins}.",
              ""]

  lines += ["## Findings", ""] + _findings_text(summary)
  if plots:
    lines += ["## Plots", ""]
    lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})\n" for p in plots]
  return "\n".join(lines)
