"""From the sweep's tables to ``summary.json`` and ``report.md`` (MATH.md, "Alignment").

Inputs are the three tables of ``pipeline.diagnose`` (pandas DataFrames; every column is
documented in ``analysis/tables.py``), for the reported directions (the first is the primary
one):

- rollouts: one row per on-policy rollout; ``student, spec, question_id, rollout, correct,
  length, n_nodes``, per direction ``mean_<d>, sum_dot_<d>, sum_normprod_<d>, sum_dd_<d>,
  n_pos_<d>``, and ``sum_gg`` (sums over the informative nodes of the rollout's path).
- questions: one row per (student, spec, question_id); ``n_rollouts, n_correct, accuracy,
  context`` ("ok" or why the teacher context could not be built) and ``mean_<d>``.
- nodes: one row per scored node; ``student, spec, question_id, depth, depth_norm,
  informative``, ``align_<d>, norm_<d>``, the covariates (``kl_pq, kl_qp, l2_pq, cos_pq,
  entropy_p, entropy_q, norm_ideal``) and each cheap filter's ``proxy_<name>``
  (``analysis.filters``).

The headline is within question (MATH.md): per question with both correct and incorrect
rollouts (with a finite ``mean_<d>``), Δ_q = mean incorrect − mean correct rollout score, and
Δ = mean_q Δ_q with its interval over questions and tests (``analysis.stats``). The best spec
and question wins compare specs on the same questions. Rollouts pooled over questions
(Mann–Whitney) confound correctness with difficulty and are a secondary, labelled view.

Every function is pure (the sweep writes the files): ``summarize`` returns plain Python
values (NaN where a quantity is undefined) and ``to_json`` turns NaN into null.
``analysis.markdown.render`` gives report.md's text from the summary.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from gradalign_jax.analysis import filters, stats, tables
from gradalign_jax.gradients import COVARIATES
from gradalign_jax.proxies import PROXIES

ALPHA = 0.05
POWER = 0.8
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
  return (["student", "spec", "question_id", "rollout", "correct", "length", "n_nodes", "sum_gg"]
          + per_dir)


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


def _null(questions: pd.DataFrame, d: str) -> dict:
  """{question: Δ_q under each relabelling} from the questions table (empty without it)."""
  col = f"null_delta_{d}"
  if col not in questions.columns:
    return {}
  return {q: np.asarray(v, np.float64) for q, v in zip(questions["question_id"], questions[col])
          if isinstance(v, (list, tuple, np.ndarray)) and len(v)}


def _tests(rollouts: pd.DataFrame, questions: pd.DataFrame, d: str, n_boot: int,
           seed: int) -> dict:
  """Incorrect vs correct rollouts of one (student, spec) for direction d: the within-question
  block (_within), the paired Wilcoxon over Δ_q in full, and, secondary, the rollouts pooled
  over questions (Mann–Whitney, the difference of pooled means)."""
  col = f"mean_{d}"
  correct = rollouts["correct"].astype(bool)
  inc, cor = rollouts.loc[~correct, col].to_numpy(float), rollouts.loc[correct, col].to_numpy(float)
  deltas = stats.question_differences(rollouts[col].to_numpy(np.float64), correct.to_numpy(),
                                      pd.factorize(rollouts["question_id"])[0])
  return {
      "within_question": _within(rollouts, _null(questions, d), d, n_boot, seed),
      "mann_whitney": _comparison(stats.mann_whitney(inc, cor)),
      "wilcoxon": _comparison(stats.paired_wilcoxon(deltas, np.zeros_like(deltas))),
      "difference": _mean(inc) - _mean(cor),
      "difference_ci": [_float(v) for v in stats.bootstrap_difference_ci(
          inc, cor, n_boot=n_boot, seed=seed)],
  }


ACCURACY_STRATA = ("accuracy < 1/3", "1/3 ≤ accuracy < 2/3", "accuracy ≥ 2/3")
LENGTH_STRATA = ("short", "middle", "long")


def _strata(rollouts: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Per rollout: its question's accuracy bin (over all the question's rollouts in the table,
  fixed thirds) and its length tercile (edges over the rollouts with an informative node;
  ≤ e1, (e1, e2], > e2), and the three length ranges as text."""
  n_cor = rollouts.groupby("question_id")["correct"].transform("sum").to_numpy(int)
  n = rollouts.groupby("question_id")["correct"].transform("size").to_numpy(int)
  accuracy = np.minimum(3 * n_cor // np.maximum(n, 1), 2)  # integers: 2/3 lands in the top bin
  length = rollouts["length"].to_numpy(np.float64)
  scored = length[rollouts["n_nodes"].to_numpy() > 0]
  e1, e2 = np.quantile(scored, [1 / 3, 2 / 3]) if len(scored) else (np.nan, np.nan)
  ranges = [f"length ≤ {e1:.4g}", f"{e1:.4g} < length ≤ {e2:.4g}", f"length > {e2:.4g}"]
  return accuracy, (length > e1).astype(int) + (length > e2), ranges


def _within(rollouts: pd.DataFrame, null: dict, d: str, n_boot: int, seed: int) -> dict:
  """The within-question estimand of one (student, spec) for direction d (MATH.md):
  stats.WithinQuestion's fields, ``strata`` ({"question_accuracy", "length"}: lists of
  {"stratum", "difference", "ci_low", "ci_high", "num_questions"}, length ones with their
  "range") and ``regression`` (stats.Regression: mean_<d> ~ incorrect + length + question
  fixed effects, errors clustered by question)."""
  y = rollouts[f"mean_{d}"].to_numpy(np.float64)
  correct = rollouts["correct"].to_numpy(bool)
  qid = pd.factorize(rollouts["question_id"])[0]
  block = {k: _float(v) if isinstance(v, float) else v for k, v in stats.within_question(
      y, correct, rollouts["question_id"].to_numpy(), null, n_boot=n_boot, alpha=ALPHA,
      seed=seed).as_dict().items()}
  accuracy, length, ranges = _strata(rollouts)
  block["strata"] = {}
  for name, labels, names in (("question_accuracy", accuracy, ACCURACY_STRATA),
                              ("length", length, LENGTH_STRATA)):
    by = stats.stratified_differences(y, correct, qid, labels, n_boot=n_boot, alpha=ALPHA,
                                      seed=seed)
    empty = {"difference": math.nan, "ci_low": math.nan, "ci_high": math.nan, "num_questions": 0}
    block["strata"][name] = [dict({"stratum": label}, **by.get(i, empty))
                             for i, label in enumerate(names)]
  for row, text in zip(block["strata"]["length"], ranges):
    row["range"] = text
  block["regression"] = stats.fixed_effects_ols(
      y, correct, qid, [rollouts["length"].to_numpy(np.float64)], alpha=ALPHA).as_dict()
  return block


def _coverage(nodes: pd.DataFrame) -> dict:
  """Informative scored nodes over scored nodes (MATH.md's nodes with a child; the root is
  scored even when it has only one)."""
  informative = int(nodes["informative"].astype(bool).sum())
  return {"informative": informative, "nodes": int(len(nodes)),
          "fraction": _ratio(float(informative), float(len(nodes)))}


def _covariates(nodes: pd.DataFrame, primary: str) -> dict:
  """Spearman ρ of align_<primary> with each node covariate, over informative nodes."""
  informative = nodes[nodes["informative"].astype(bool)]
  align = informative[f"align_{primary}"].to_numpy(float)
  out = {}
  for name in NODE_COVARIATES + (f"norm_{primary}",):
    rho, p = stats.spearman(align, informative[name].to_numpy(float))
    out[name] = {"spearman": rho, "p": p}
  return out


def _question_wins(rollouts: pd.DataFrame, questions: pd.DataFrame, specs, primary: str, *,
                   n_boot: int, seed: int) -> dict:
  """Specs compared on the same questions, by each question's mean rollout score.

  The competing specs are those with a scored rollout; the common questions, those on which
  every competing spec has a usable context and a finite question mean. Returns
  ``question_wins`` ({spec: fraction of common questions on which its question mean is the
  highest}, a tie splitting the win, so they sum to 1; NaN for a spec that does not compete),
  ``n_common_questions``, ``spec_means`` ({spec: {"mean", "ci_low", "ci_high"}}: mean over
  the common questions, bootstrap over them), ``best_spec`` (the highest of those means, None
  without a common question) and ``best_spec_margin`` (best − runner-up over the common
  questions with its interval; NaN with one spec).
  """
  col = f"mean_{primary}"
  table = (rollouts[np.isfinite(rollouts[col].astype(float))]
           .groupby(["question_id", "spec"])[col].mean().unstack()
           .reindex(columns=specs))
  competing = [s_ for s_ in specs if table[s_].notna().any()]
  refused = questions.loc[questions["context"] != "ok", ["question_id", "spec"]]
  refused = refused[refused["spec"].isin(competing)]
  table = table[competing].drop(index=refused["question_id"].unique(), errors="ignore").dropna()
  nan_ci = {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan}
  out = {"question_wins": {s_: math.nan for s_ in specs}, "n_common_questions": int(len(table)),
         "spec_means": {s_: dict(nan_ci) for s_ in specs}, "best_spec": None,
         "best_spec_margin": {"runner_up": None, "difference": math.nan, "ci_low": math.nan,
                              "ci_high": math.nan, "num_questions": int(len(table))}}
  if table.empty:
    return out
  values = table.to_numpy(float)
  best = values == values.max(axis=1, keepdims=True)
  wins = (best / best.sum(axis=1, keepdims=True)).mean(axis=0)
  means = values.mean(axis=0)
  for j, spec in enumerate(competing):
    out["question_wins"][spec] = float(wins[j])
    lo, hi = stats.bootstrap_ci(values[:, j], n_boot=n_boot, alpha=ALPHA, seed=seed)
    out["spec_means"][spec] = {"mean": float(means[j]), "ci_low": lo, "ci_high": hi}
  order = np.argsort(-means, kind="stable")
  out["best_spec"] = competing[order[0]]
  if len(competing) > 1:
    gap = values[:, order[0]] - values[:, order[1]]
    lo, hi = stats.bootstrap_ci(gap, n_boot=n_boot, alpha=ALPHA, seed=seed)
    out["best_spec_margin"].update(runner_up=competing[order[1]], difference=float(gap.mean()),
                                   ci_low=lo, ci_high=hi)
  return out


def summarize(rollouts: pd.DataFrame, questions: pd.DataFrame, nodes: pd.DataFrame,
              directions=("reverse_kl",), config: dict | None = None, *, n_boot: int = 2000,
              seed: int = 0) -> dict:
  """The content of summary.json.

  directions: those to report, the first being the primary one (best spec, question wins,
  covariates and findings use it). config: the run's settings, copied verbatim. n_boot:
  bootstrap resamples. The permutation test reads the questions table's ``null_delta_<d>``
  (Δ_q under relabellings whose scores the pipeline recomputed).
  Per student: ``accuracy`` (Σ n_correct / Σ n_rollouts over all its question rows),
  ``n_questions`` and per spec ``{"accuracy"`` (over the spec's scored rollouts, so questions
  without a context drop out), ``"within_question"`` (the primary direction's _within block),
  ``"correct", "incorrect", "all"`` (split_block), ``"questions": {"n",
  "context_unavailable": {reason: count}}, "coverage": {"informative", "nodes", "fraction"},
  "tests": {d: {"within_question", "mann_whitney", "wilcoxon", "difference",
  "difference_ci"}}, "covariates": {name: {"spearman", "p"}}}``, then _question_wins' keys
  (``best_spec``, ``question_wins``, ``n_common_questions``, ``spec_means``,
  ``best_spec_margin``). ``proxies``: {student: {spec: {proxy: filters.calibrate's entry}}},
  each cheap filter of ``proxies.PROXIES`` against the primary direction's alignment over the
  informative nodes (AUC for align > 0, the alignment its top 10/25/50% keep vs the oracle's,
  intervals over questions). ``methods`` states the tests' settings; ``findings`` answers the
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
      nodes, ["student", "spec", "question_id", "informative", f"align_{primary}",
              f"norm_{primary}"] + list(NODE_COVARIATES) + [f"proxy_{p}" for p in PROXIES],
      "nodes")

  students, calibration = {}, {}
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
      tests = {d: _tests(r, q, d, n_boot, seed) for d in dirs}
      specs[spec] = {
          "accuracy": _ratio(float(correct.sum()), float(len(r))),
          "within_question": tests[primary]["within_question"],
          "correct": split_block(r[correct], dirs, n_boot=n_boot, seed=seed),
          "incorrect": split_block(r[~correct], dirs, n_boot=n_boot, seed=seed),
          "all": split_block(r, dirs, n_boot=n_boot, seed=seed),
          "questions": {"n": int(q["question_id"].nunique()),
                        "context_unavailable": {str(k): int(v) for k, v in unavailable.items()}},
          "coverage": _coverage(s_nodes[s_nodes["spec"] == spec]),
          "tests": tests,
          "covariates": _covariates(s_nodes[s_nodes["spec"] == spec], primary),
      }
      calibration.setdefault(student, {})[spec] = filters.calibrate(
          s_nodes[s_nodes["spec"] == spec], primary, n_boot=n_boot, alpha=ALPHA, seed=seed)
    students[student] = {
        "accuracy": _ratio(float(s_q["n_correct"].sum()), float(s_q["n_rollouts"].sum())),
        "n_questions": int(s_q["question_id"].nunique()),
        "specs": specs,
        **_question_wins(s_roll, s_q, list(specs), primary, n_boot=n_boot, seed=seed),
    }
  relabellings = [b["within_question"]["num_relabellings"] for s in students.values()
                  for b in s["specs"].values()]
  methods = {"alpha": ALPHA, "power": POWER, "n_boot": n_boot,
             "n_perm": max(relabellings, default=0), "seed": seed,
             "proxies": {"direction": primary, "keep_percents": list(filters.KEEP_PERCENTS),
                         "positive": f"align_{primary} > 0", "unit": "question"}}
  return {"config": dict(config or {}), "directions": dirs, "methods": methods,
          "students": students, "proxies": calibration,
          "findings": _findings(students, primary)}


def _findings(students: dict, primary: str) -> dict:
  """Per student, for the primary direction and within question: how many specs have Δ > 0
  (incorrect rollouts align better) or Δ < 0, how many of those significantly (within-question
  permutation test, p < ALPHA), each spec's Δ with its interval and questions, the specs the
  pooled Mann–Whitney calls significant (secondary), and the best spec with its margin."""
  per_student = {}
  for student, s in students.items():
    rows = {spec: b["tests"][primary]["within_question"] for spec, b in s["specs"].items()}
    # The sign the permutation test speaks to: Δ against its null mean (Δ itself without one).
    diff = {spec: t["difference_vs_null"] if np.isfinite(t["difference_vs_null"])
            else t["difference"] for spec, t in rows.items()}
    sig = {spec: bool(t["p_permutation"] < ALPHA) for spec, t in rows.items()}
    inc_higher = [spec for spec, v in diff.items() if np.isfinite(v) and v > 0]
    cor_higher = [spec for spec, v in diff.items() if np.isfinite(v) and v < 0]
    pooled = [spec for spec, b in s["specs"].items()
              if b["tests"][primary]["mann_whitney"]["p_value"] < ALPHA]
    per_student[student] = {
        "n_specs": len(rows),
        "n_compared": sum(bool(np.isfinite(v)) for v in diff.values()),
        "n_incorrect_higher": len(inc_higher),
        "n_incorrect_higher_significant": sum(sig[s_] for s_ in inc_higher),
        "n_correct_higher": len(cor_higher),
        "n_correct_higher_significant": sum(sig[s_] for s_ in cor_higher),
        "specs_incorrect_higher": inc_higher,
        "specs_significant": [s_ for s_ in rows if sig[s_]],
        "specs_pooled_significant": pooled,
        "within_question": {spec: {k: t[k] for k in ("difference", "ci_low", "ci_high",
                                                     "null_mean", "difference_vs_null",
                                                     "vs_null_ci_low", "vs_null_ci_high",
                                                     "p_permutation", "num_questions",
                                                     "min_detectable")}
                            for spec, t in rows.items()},
        "best_spec": s["best_spec"],
        "best_spec_margin": s["best_spec_margin"],
        "n_common_questions": s["n_common_questions"],
    }
  best = {k: v["best_spec"] for k, v in per_student.items() if v["best_spec"] is not None}
  return {"direction": primary, "alpha": ALPHA, "test": "within-question permutation",
          "students": per_student, "best_spec": best,
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
