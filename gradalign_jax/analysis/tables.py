"""The diagnostic's tables: their columns (one documented constant per table), the builders
that turn one question's final pass into rows, and the (sum, count) aggregates.

Three tables, one row each per:
  nodes      (student, spec, question, scored node)       NODE_COLUMNS, NODE_DIRECTION_COLUMNS
  rollouts   (student, spec, question, on-policy rollout) ROLLOUT_COLUMNS,
                                                          ROLLOUT_DIRECTION_COLUMNS
  questions  (student, spec, question)                    QUESTION_COLUMNS,
                                                          QUESTION_DIRECTION_COLUMNS
A ``*_DIRECTION_COLUMNS`` entry is a template with ``{d}`` for each reported direction
(``gradients.DIRECTIONS``). Builders, the report and the views use these names, so a renamed
column fails where it is used, not silently in a report.

A rollout's aggregates are over the informative nodes of its path (MATH.md "Alignment"): a
node belongs to every rollout whose path crosses it. ``AlignmentSums`` holds the sums behind
the mean, weighted and pooled cosines and the fraction positive; they combine by addition
(rollouts → splits → questions, shards and hosts), so every aggregate of the report is
computed from them in one place. Everything here is a pure function of arrays.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

import numpy as np

from gradalign_jax.gradients import COVARIATES, DIRECTIONS
from gradalign_jax.proxies import PROXIES

KEY_COLUMNS = {
    "student": "the student model as given (toy name, directory or hub id)",
    "spec": "the teacher spec (contexts.py), one column of results",
    "question_id": "the example's id in the task's data",
}

NODE_COLUMNS = {
    **KEY_COLUMNS,
    "kl_pq": "KL(p‖q) at the node (p student policy, q teacher)",
    "kl_qp": "KL(q‖p)",
    "l2_pq": "‖p − q‖₂",
    "cos_pq": "cos(p, q)",
    "entropy_p": "H(p)",
    "entropy_q": "H(q)",
    "norm_ideal": "‖ĝ*‖ (full-tree estimate: the node on its own, no rollout left out)",
    "node_id": "the node's id in its question's tree (creation order)",
    "depth": "generated tokens before the node",
    "informative": "|O| ≥ 2 observed children whose Q̂ are not all equal (MATH.md)",
    "num_observed": "|O|, children with trials",
    "min_trials": "min n_k over the observed children",
    "depth_norm": "depth / mean length of the rollouts through the node",
    "v_hat": "V̂ of ĝ*: π-weighted mean of Q̂ over the observed children (NaN with none)",
    "child_tokens": "list: token id of each child",
    "child_q": "list: Q̂ of each child (NaN without trials)",
    "child_n": "list: trials n_k of each child",
    "child_q_lo": "list: Wilson 95% lower bound of each child's Q̂",
    "child_q_hi": "list: Wilson 95% upper bound of each child's Q̂",
    "child_p": "list: π of each child's token (ĝ*_k = π_k (Q̂_k − V̂) on the observed ones)",
    "child_logq": "list: log q of each child's token (the teacher's q at its temperature T_τ, "
                  "the q of every direction)",
    "child_text": "list: each child's token decoded alone",
    "targeted": "targeted rollouts that reached the node at or below their branch point (they "
                "count in its children's Q̂)",
    "top_p_tokens": "list: the student's TOP_TOKENS most likely token ids (alignment.py), "
                    "descending",
    "top_p": "list: their π",
    "top_p_text": "list: each decoded alone",
    "top_q_tokens": "list: the teacher's TOP_TOKENS most likely token ids, descending",
    "top_q": "list: their q",
    "top_q_text": "list: each decoded alone",
    **{f"proxy_{name}": f"cheap filter {name} (proxies.py), its mean over the node's on-policy "
                        f"rollout tokens (visit-weighted over the children; NaN where none "
                        f"left the node): {p.doc}" for name, p in PROXIES.items()},
}
NODE_DIRECTION_COLUMNS = {
    "align_{d}": "cos(ĝ*, d), full-tree ĝ* (0 where either is 0; meaningful on informative "
                 "nodes)",
    "dot_{d}": "⟨ĝ*, d⟩",
    "norm_{d}": "‖d‖",
    "child_d_{d}": "list: d at each child's token (⟨ĝ*, d⟩ = Σ_k ĝ*_k d_k: ĝ* is 0 elsewhere)",
}

ROLLOUT_COLUMNS = {
    **KEY_COLUMNS,
    "rollout": "index of the on-policy rollout (0 … G−1)",
    "correct": "the verifier's reward > 0.5",
    "length": "generated tokens, EOS included",
    "n_nodes": "informative nodes on the rollout's path, the rollout left out of the counts",
    "tokens": "list: the generated token ids",
    "token_text": "list: each token decoded alone",
    "node_ids": "list: each token's decision node (the nodes table's node_id; the node at "
                "depth t for token t)",
    "sum_gg": "Σ ‖ĝ*‖² over the path's informative nodes",
    **{c: f"mean of {c} over the path's informative nodes" for c in COVARIATES},
    "depth_norm": "mean of depth / length over the path's informative nodes",
}
ROLLOUT_DIRECTION_COLUMNS = {
    "mean_{d}": "mean cosine over the path's informative nodes (NaN with none); every "
                "rollout number is leave-one-out: ĝ* from the counts without this rollout",
    "sum_dot_{d}": "Σ ⟨ĝ*, d⟩ over them",
    "sum_normprod_{d}": "Σ ‖ĝ*‖‖d‖ over them",
    "sum_dd_{d}": "Σ ‖d‖² over them",
    "n_pos_{d}": "informative nodes with cosine > 0",
    "path_{d}": "list: the cosine at each token's decision node (NaN where not informative)",
}

QUESTION_COLUMNS = {
    **KEY_COLUMNS,
    "question_index": "the question's index in the data (the sampler's question id)",
    "n_rollouts": "G, on-policy rollouts",
    "n_correct": "correct on-policy rollouts",
    "accuracy": "n_correct / n_rollouts",
    "context": "'ok', or why the question cannot carry the spec's context",
    "prompt_tokens": "tokens of the teacher's prompt (context + question; 0 without context)",
    "context_tokens": "what the context adds to the student's prompt",
    "targeted": "targeted rollouts added to the question's tree",
    "n_nodes": "scored nodes (root and nodes with a child)",
    "n_informative": "informative scored nodes",
}
QUESTION_DIRECTION_COLUMNS = {
    "mean_{d}": "mean cosine over the question's informative nodes (full-tree estimates)",
    "null_delta_{d}": "list: Δ_q (incorrect − correct mean rollout score) under each random "
                      "relabelling of the question's on-policy rewards, scores recomputed "
                      "(the permutation test's null; absent without a context)",
}


BASELINE = "student (no context)"
ACCURACY_COLUMNS = {
    **KEY_COLUMNS,
    "question_index": "the question's index in the data (the sampler's question id)",
    "answerer": "the model that answered: the student, or the spec's model",
    "context": "'ok', or why the question cannot carry the spec's context",
    "prompt_tokens": "tokens of the answerer's prompt (0 without context)",
    "context_tokens": "what the context adds to the answerer's plain prompt",
    "prompt_hash": "a fingerprint of the prompt's token ids",
    "n_samples": "samples drawn (0 without context)",
    "n_correct": "samples the verifier accepts",
    "accuracy": "n_correct / n_samples (NaN without context)",
    "mean_length": "mean generated tokens of the samples",
    "n_truncated": "samples stopped by the horizon",
}
"""The in-context accuracy table: one row per (student, spec, question); the student's plain
prompt is spec BASELINE."""


def direction_columns(templates: dict, directions: Sequence[str]) -> list[str]:
  """The per-direction column names of a table, direction by direction."""
  return [t.format(d=d) for d in directions for t in templates]


# ---------------------------------------------------------------------------------------
# (sum, count) aggregates


def _ratio(num, den) -> float:
  return float(num / den) if den > 0 else float("nan")


class AlignmentSums(NamedTuple):
  """Sums over a set of (rollout, node) pairs that combine by addition.

  count: nodes; positive: nodes with cos > 0; cos: Σ cos; dot: Σ⟨ĝ*, d⟩; norm_prod:
  Σ ‖ĝ*‖‖d‖; sq_g: Σ ‖ĝ*‖²; sq_d: Σ ‖d‖².
  """
  count: int
  positive: int
  cos: float
  dot: float
  norm_prod: float
  sq_g: float
  sq_d: float

  @classmethod
  def over(cls, cos, dot, norm_g, norm_d, where=None) -> "AlignmentSums":
    """Sums of per-node values (1-D arrays: cosine, ⟨ĝ*, d⟩, ‖ĝ*‖, ‖d‖) over the nodes
    selected by ``where`` (bool, default all). Summed in the arrays' own dtype."""
    if where is not None:
      cos, dot, norm_g, norm_d = (np.asarray(x)[np.asarray(where, bool)]
                                  for x in (cos, dot, norm_g, norm_d))
    cos, dot, norm_g, norm_d = map(np.asarray, (cos, dot, norm_g, norm_d))
    return cls(count=len(cos), positive=int(np.sum(cos > 0)), cos=np.sum(cos), dot=np.sum(dot),
               norm_prod=np.sum(norm_g * norm_d), sq_g=np.sum(norm_g ** 2),
               sq_d=np.sum(norm_d ** 2))

  def __add__(self, other):
    return AlignmentSums(*(a + b for a, b in zip(self, other)))

  def summary(self) -> dict[str, float]:
    """mean cosine Σcos/count, weighted cosine Σ⟨ĝ*,d⟩/Σ‖ĝ*‖‖d‖, pooled cosine
    Σ⟨ĝ*,d⟩/√(Σ‖ĝ*‖² Σ‖d‖²), fraction positive, count; NaN where the set is empty."""
    return {"mean_cos": _ratio(self.cos, self.count),
            "weighted_cos": _ratio(self.dot, self.norm_prod),
            "pooled_cos": _ratio(self.dot, np.sqrt(self.sq_g * self.sq_d)),
            "frac_positive": _ratio(self.positive, self.count),
            "count": self.count}


def rollout_sums(rollouts, direction: str) -> AlignmentSums:
  """The AlignmentSums of a set of rows of the rollouts table (any subset), for one
  direction: its rows' per-path sums added up (in float64)."""
  col = lambda name: float(rollouts[name].sum())
  return AlignmentSums(count=int(rollouts["n_nodes"].sum()),
                       positive=int(rollouts[f"n_pos_{direction}"].sum()),
                       cos=float(np.nansum(rollouts[f"mean_{direction}"].to_numpy(np.float64)
                                           * rollouts["n_nodes"].to_numpy(np.float64))),
                       dot=col(f"sum_dot_{direction}"), norm_prod=col(f"sum_normprod_{direction}"),
                       sq_g=col("sum_gg"), sq_d=col(f"sum_dd_{direction}"))


# ---------------------------------------------------------------------------------------
# Builders: one question's final pass → rows


def _py(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x.item() if isinstance(x, np.generic) else x


def node_rows(key: dict, cols: dict, terms, paths, directions: Sequence[str],
              token_text) -> list[dict]:
  """The node table's rows of one (student, spec, question).

  key: the KEY_COLUMNS values; cols: ``alignment.TreeTerms.node_columns()`` (full-tree
  estimates); terms: that ``alignment.TreeTerms`` (its tree and child entries);
  paths: ``alignment.rollout_paths`` of the tree; directions: those reported (the other
  directions' columns are dropped); token_text: ids → list of token strings.
  """
  arrays = terms.arrays
  ids = cols["node_id"]
  len_sum = np.zeros(arrays.num_nodes)
  len_cnt = np.zeros(arrays.num_nodes)
  for path in paths:
    decisions = arrays.parent[path]
    len_sum[decisions] += len(path)
    len_cnt[decisions] += 1
  mean_len = np.where(len_cnt > 0, len_sum / np.maximum(len_cnt, 1), np.nan)
  table = dict(cols)
  table["depth_norm"] = arrays.depth[ids] / mean_len[ids]
  q = arrays.q_hat
  kids = [arrays.children[arrays.child_start[u]:arrays.child_start[u] + arrays.child_count[u]]
          for u in ids]
  table["child_tokens"] = [arrays.token[k].tolist() for k in kids]
  table["child_q"] = [q[k].tolist() for k in kids]
  table["child_n"] = [arrays.trials[k].tolist() for k in kids]
  table["child_q_lo"] = [arrays.wilson_lo[k].tolist() for k in kids]
  table["child_q_hi"] = [arrays.wilson_hi[k].tolist() for k in kids]
  table["child_p"] = [terms.edge["p"][k].tolist() for k in kids]
  table["child_logq"] = [terms.edge["logq"][k].tolist() for k in kids]
  table["child_text"] = [token_text(arrays.token[k].tolist()) for k in kids]
  for d in directions:
    table[f"child_d_{d}"] = [terms.edge[f"d_{d}"][k].tolist() for k in kids]
  for who in ("p", "q"):
    table[f"top_{who}_text"] = [token_text(t) for t in cols[f"top_{who}_tokens"].tolist()]
  unreported = set(direction_columns(NODE_DIRECTION_COLUMNS,
                                     [d for d in DIRECTIONS if d not in directions]))
  keep = [c for c in table if c not in unreported]
  return [dict(key, **{c: _py(table[c][u]) for c in keep}) for u in range(len(ids))]


def rollout_rows(key: dict, terms, paths, rewards, num_onpolicy: int,
                 directions: Sequence[str], token_text) -> list[dict]:
  """The rollouts table's rows of one (student, spec, question): its first ``num_onpolicy``
  rollouts (the ordinary ones; targeted rollouts were forced somewhere), each scored with its
  own reward left out of the counts (``alignment.TreeTerms.leave_one_out``, MATH.md).

  terms: the final pass's ``alignment.TreeTerms``; paths: ``alignment.rollout_paths``;
  rewards: each rollout's reward; token_text: ids → list of token strings.
  """
  arrays = terms.arrays
  rows = []
  for r in range(num_onpolicy):
    path = paths[r]
    nodes = arrays.parent[path]
    loo = terms.leave_one_out(path, rewards[r])
    info = loo["informative"]
    tokens = [int(t) for t in arrays.token[path]]
    length = len(tokens)
    sel = nodes[info]
    norm_g = loo["norm_ideal"][info]
    row = dict(key, rollout=r, correct=bool(rewards[r] > 0.5), length=length,
               n_nodes=int(info.sum()), tokens=tokens, token_text=token_text(tokens),
               node_ids=nodes.tolist(),
               sum_gg=float(np.sum(norm_g ** 2)))
    for d in directions:
      a = loo[f"align_{d}"]
      sums = AlignmentSums.over(a[info], loo[f"dot_{d}"][info], norm_g,
                                terms.node[f"norm_{d}"][sel])
      row[f"mean_{d}"] = float(sums.cos / sums.count) if sums.count else float("nan")
      row[f"sum_dot_{d}"] = float(sums.dot)
      row[f"sum_normprod_{d}"] = float(sums.norm_prod)
      row[f"sum_dd_{d}"] = float(sums.sq_d)
      row[f"n_pos_{d}"] = sums.positive
      row[f"path_{d}"] = np.where(info, a, np.nan).tolist()
    for c in COVARIATES:
      row[c] = float(np.mean(terms.node[c][sel])) if len(sel) else float("nan")
    depth = np.arange(length)[info]
    row["depth_norm"] = float(np.mean(depth / length)) if len(sel) else float("nan")
    rows.append(row)
  return rows


def question_row(key: dict, cols: dict | None, directions: Sequence[str], **fields) -> dict:
  """The questions table's row of one (student, spec, question): ``fields`` (question_index,
  n_rollouts, n_correct, accuracy, context, prompt_tokens, context_tokens, targeted), then
  the node counts and per-direction means of the final pass (``cols``; None when the
  context was unavailable: zero nodes, NaN means)."""
  row = dict(key, **fields, n_nodes=0, n_informative=0)
  if cols is None:
    row.update({f"mean_{d}": float("nan") for d in directions})
    return row
  info = cols["informative"].astype(bool)
  row.update(n_nodes=len(info), n_informative=int(info.sum()))
  row.update({f"mean_{d}": float(np.mean(cols[f"align_{d}"][info])) if info.any()
              else float("nan") for d in directions})
  return row


class Outcome(NamedTuple):
  """The verified samples of one (model, prompt): counts, mean length, truncated samples."""
  n_samples: int
  n_correct: int
  mean_length: float
  n_truncated: int


def prompt_hash(ids) -> str:
  """A short fingerprint of a prompt's token ids (lets a reader check which context was read)."""
  return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


def accuracy_row(key: dict, question_index: int, answerer: str, status: str,
                 ids: Sequence[int] | None, plain_len: int, outcome: Outcome | None) -> dict:
  """The accuracy table's row of one (student, spec, question): ``ids`` the answerer's prompt
  (None when the context was unavailable, and then ``outcome`` is None too); ``plain_len``
  the length of its prompt without context."""
  row = dict(key, question_index=question_index, answerer=answerer, context=status,
             prompt_tokens=0 if ids is None else len(ids),
             context_tokens=0 if ids is None else len(ids) - plain_len,
             prompt_hash="" if ids is None else prompt_hash(ids))
  if outcome is None:
    return dict(row, n_samples=0, n_correct=0, accuracy=float("nan"),
                mean_length=float("nan"), n_truncated=0)
  return dict(row, n_samples=outcome.n_samples, n_correct=outcome.n_correct,
              accuracy=outcome.n_correct / outcome.n_samples, mean_length=outcome.mean_length,
              n_truncated=outcome.n_truncated)


__all__ = ["ACCURACY_COLUMNS", "AlignmentSums", "BASELINE", "Outcome", "KEY_COLUMNS",
           "NODE_COLUMNS", "NODE_DIRECTION_COLUMNS", "QUESTION_COLUMNS",
           "QUESTION_DIRECTION_COLUMNS", "ROLLOUT_COLUMNS", "ROLLOUT_DIRECTION_COLUMNS",
           "accuracy_row", "direction_columns", "node_rows", "prompt_hash", "question_row",
           "rollout_rows", "rollout_sums"]
