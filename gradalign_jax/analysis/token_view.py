"""The token explorer: one self-contained HTML page (no server, no network) over a run's tables.

Selectors pick a student, a question (shown with its accuracy and each spec's Δ_q) and one or
two teacher specs, drawn side by side on the same on-policy rollouts; rollouts filter by
correct/incorrect and by length and sort by index, length or score. Each token is coloured by
its leave-one-out cosine (``path_<d>``, blue positive, red negative, opacity |cos|, grey where
the node is not informative). A click on a token shows its decision node: π's and each shown
spec's q top-k, Q̂ of the observed children with Wilson intervals and trials, ĝ*_k = π_k (Q̂_k −
V̂) and each spec's d_k over those children, the full-tree cosine, dot and norms, the
covariates, and how many targeted rollouts reached it.

The data travel once, as compact JSON inside the page (token strings interned, cosines as
integers in thousandths, other numbers to 4 significant digits, a node's spec-independent part
— π, the children — once per question); the page's script draws only what is selected.
Columns: ``analysis/tables.py``.
"""

from __future__ import annotations

import json
import math
import numpy as np
import pandas as pd

from gradalign_jax.analysis.token_page import PAGE
from gradalign_jax.gradients import COVARIATES

# Field order of the page's positional records (the script reads the same lists).
SHARED = ("depth", "informative", "targeted", "v_hat", "norm_ideal", "min_trials")
CHILD = ("child_tokens", "child_p", "child_q", "child_q_lo", "child_q_hi", "child_n")
PER_SPEC = COVARIATES + ("align", "dot", "norm")


def _num(x):
  """A float to 4 significant digits (None where not finite: JSON has no NaN)."""
  x = float(x)
  return float(f"{x:.4g}") if math.isfinite(x) else None


def _nums(xs) -> list:
  return [_num(x) for x in xs]


def _milli(xs) -> list:
  """Thousandths as ints; None for a missing or non-finite value (parquet may give None)."""
  return [int(round(float(x) * 1000)) if x is not None and math.isfinite(float(x)) else None
          for x in xs]


class _Strings:
  """Interns token strings: each distinct text is stored once, referred to by index."""

  def __init__(self):
    self.index: dict[str, int] = {}

  def __call__(self, texts) -> list[int]:
    return [self.index.setdefault(str(t), len(self.index)) for t in texts]

  def table(self) -> list[str]:
    return list(self.index)


def _delta(group: pd.DataFrame, direction: str) -> float:
  """Δ_q: mean incorrect − mean correct leave-one-out rollout score (NaN without both)."""
  mean = group[f"mean_{direction}"].to_numpy(np.float64)
  ok = np.isfinite(mean)
  correct = group["correct"].to_numpy(bool)
  if not (ok & correct).any() or not (ok & ~correct).any():
    return math.nan
  return float(mean[ok & ~correct].mean() - mean[ok & correct].mean())


def _check(df: pd.DataFrame, columns, table: str) -> None:
  missing = [c for c in columns if c not in df.columns]
  if missing and len(df):
    raise ValueError(f"{table} table lacks columns {missing}; the token explorer needs a run "
                     f"made with this version's schema (analysis/tables.py): rerun the sweep")


def _run_tests(summary: dict | None, student: str, direction: str) -> dict:
  """{spec: [Δ, ci_low, ci_high, p_permutation, questions]} from summary.json's within-question
  block of ``direction``."""
  out = {}
  specs = ((summary or {}).get("students", {}).get(student, {}).get("specs", {}))
  for spec, s in specs.items():
    w = s.get("tests", {}).get(direction, {}).get("within_question", {})
    out[spec] = [_num(w[k]) if w.get(k) is not None else None
                 for k in ("difference", "ci_low", "ci_high", "p_permutation")]
    out[spec].append(w.get("num_questions"))
  return out


def _question(strings: _Strings, qrows: pd.DataFrame, rows: pd.DataFrame, nodes: pd.DataFrame,
              direction: str) -> dict:
  """One (student, question): its rollouts once, and per spec the scores and its nodes."""
  first = qrows.iloc[0]
  out = {"id": str(first["question_id"]), "accuracy": _num(first["accuracy"]),
         "n": int(first["n_rollouts"]), "context": {}, "delta": {}, "specs": {}, "rollouts": [],
         "nodes": {}}
  for _, q in qrows.iterrows():
    out["context"][q["spec"]] = str(q["context"])
  if not len(rows):
    return out
  base = rows[rows["spec"] == rows["spec"].iloc[0]].sort_values("rollout")
  for _, r in base.iterrows():
    if not len(r["tokens"]) == len(r["token_text"]) == len(r["node_ids"]):
      raise ValueError(f"rollout {r['rollout']} of {r['question_id']} has {len(r['tokens'])} "
                       f"tokens, {len(r['token_text'])} token_text and {len(r['node_ids'])} "
                       "node_ids entries; the sweep must record one of each per token")
    out["rollouts"].append([int(r["rollout"]), int(bool(r["correct"])),
                            strings(r["token_text"]), [int(t) for t in r["tokens"]],
                            [int(u) for u in r["node_ids"]]])
  wanted = {u for r in out["rollouts"] for u in r[4]}
  for spec, group in rows.groupby("spec", sort=False):
    group = group.set_index("rollout").reindex([r[0] for r in out["rollouts"]])
    spec_nodes = nodes[(nodes["spec"] == spec) & nodes["node_id"].isin(wanted)]
    out["delta"][spec] = _num(_delta(group.reset_index(), direction))
    out["specs"][spec] = {
        "mean": _nums(group[f"mean_{direction}"]),
        "cos": [_milli(c) for c in group[f"path_{direction}"]],
        "nodes": {str(int(n["node_id"])): [_num(n[c]) for c in COVARIATES]
                  + [_num(n[f"align_{direction}"]), _num(n[f"dot_{direction}"]),
                     _num(n[f"norm_{direction}"]), strings(n["top_q_text"]), _nums(n["top_q"]),
                     _nums(n[f"child_d_{direction}"])]
                  for _, n in spec_nodes.iterrows()}}
    for _, n in spec_nodes.iterrows():  # π and the children: the same tree for every spec
      key = str(int(n["node_id"]))
      if key not in out["nodes"]:
        out["nodes"][key] = ([_num(n[c]) for c in SHARED] + [strings(n["top_p_text"]),
                             _nums(n["top_p"]), strings(n["child_text"])]
                             + [_nums(n[c]) for c in CHILD])
  return out


def page_data(nodes: pd.DataFrame, rollouts: pd.DataFrame, questions: pd.DataFrame,
              summary: dict | None = None, direction: str = "reverse_kl") -> dict:
  """The explorer's data (what ``render`` embeds): {"direction", "strings" (interned token
  texts), "fields", "students": {student: {"specs", "tests", "questions": [...]}}}."""
  _check(rollouts, ["student", "spec", "question_id", "rollout", "correct", "tokens",
                    "token_text", "node_ids", f"mean_{direction}", f"path_{direction}"],
         "rollouts")
  _check(nodes, ["student", "spec", "question_id", "node_id", *SHARED, *CHILD, "child_text",
                 "top_p_text", "top_p", "top_q_text", "top_q", f"child_d_{direction}",
                 *COVARIATES, f"align_{direction}", f"dot_{direction}",
                 f"norm_{direction}"], "nodes")
  _check(questions, ["student", "spec", "question_id", "accuracy", "n_rollouts", "context"],
         "questions")
  strings = _Strings()
  out = {"direction": direction, "students": {},
         "fields": {"shared": list(SHARED) + ["top_p_text", "top_p", "child_text"] + list(CHILD),
                    "spec": list(PER_SPEC) + ["top_q_text", "top_q", "child_d"]}}
  if not len(questions):
    out["strings"] = []
    return out
  by_q = {k: g for k, g in rollouts.groupby(["student", "question_id"], sort=False)}
  nodes_by_q = {k: g for k, g in nodes.groupby(["student", "question_id"], sort=False)}
  for student, sq in questions.groupby("student", sort=False):
    qs = []
    for qid, qrows in sq.groupby("question_id", sort=False):
      qs.append(_question(strings, qrows, by_q.get((student, qid), rollouts.iloc[:0]),
                          nodes_by_q.get((student, qid), nodes.iloc[:0]), direction))
    out["students"][str(student)] = {"specs": [str(s) for s in sq["spec"].unique()],
                                     "tests": _run_tests(summary, student, direction),
                                     "questions": qs}
  out["strings"] = strings.table()
  return out


def render(nodes: pd.DataFrame, rollouts: pd.DataFrame, questions: pd.DataFrame,
           summary: dict | None = None, direction: str = "reverse_kl") -> str:
  """The explorer page (HTML text) of a run's tables for one direction (its ``path_<d>``
  colours the tokens); ``summary`` (summary.json's content) adds each spec's run-level Δ."""
  data = json.dumps(page_data(nodes, rollouts, questions, summary, direction),
                    separators=(",", ":"), ensure_ascii=False, allow_nan=False)
  # Inside <script> only "<" could end the element early; JSON has it only in strings.
  return PAGE.replace("__DATA__", data.replace("<", "\\u003c")).replace(
      "__DIRECTION__", direction)

