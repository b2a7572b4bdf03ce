"""Cheap token filters vs alignment: does a proxy of ``proxies.PROXIES`` pick the tokens whose
distillation direction points the ideal way?

Over the informative nodes of one (student, spec) (MATH.md; the nodes table), for each proxy
(its node value ``proxy_<name>``: the mean over the node's on-policy rollout tokens,
``proxies.node_proxies``):
  * AUC: P(proxy of a node with align_d > 0 > proxy of a node with align_d ≤ 0), ties 1/2,
    i.e. Mann–Whitney U / (n₁ n₀). 0.5 = no better than chance; above 0.5 the proxy's kept
    end (higher) holds the aligned nodes.
  * kept alignment: keep the top x% of the nodes by the proxy (x = KEEP_PERCENTS; ties broken
    by row order, as ``proxies.top_fraction`` gates tokens) and report the mean align_d of the
    kept nodes and their share of Σ max(align_d, 0) over all the nodes; the oracle keeps the
    top x% by align_d itself, the all-nodes mean is the reference.
The nodes of a question share its tree and rollouts, so they are not independent draws: every
interval is a 95% percentile bootstrap over questions, whole questions resampled (a question
drawn k times counts each of its nodes k times). The resamples are the same for every proxy of
a (student, spec) (one seed), so the proxies are compared on the same draws. Pure functions.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import sparse
from scipy import stats as sps

from gradalign_jax.proxies import PROXIES

KEEP_PERCENTS = (10, 25, 50)


def auc(scores, positive) -> float:
  """P(score of a positive > score of a negative), ties counting 1/2: the Mann–Whitney U of
  the positives (scipy.stats.mannwhitneyu) over n₁ n₀. scores f64[n], positive bool[n].
  NaN when either class is empty."""
  x, y = np.asarray(scores, np.float64), np.asarray(positive, bool)
  n1, n0 = int(y.sum()), int((~y).sum())
  if n1 == 0 or n0 == 0:
    return math.nan
  u = sps.mannwhitneyu(x[y], x[~y], method="asymptotic").statistic
  return float(u / (n1 * n0))


def weighted_auc(scores, positive, weights) -> np.ndarray:
  """``auc`` of each row of ``weights`` f[B, n] (node i counted weights[b, i] times), i.e.
  of the nodes repeated by their weights: f64[B], NaN where a class has no weight. The
  bootstrap's replicates at once (a scipy call per resample, ~0.5 ms, would add ~40 s to the
  default sweep)."""
  x, y = np.asarray(scores, np.float64), np.asarray(positive, bool)
  w = np.atleast_2d(np.asarray(weights, np.float64))
  _, level = np.unique(x, return_inverse=True)  # equal scores share a level: ties
  onehot = sparse.csr_matrix((np.ones(len(x)), (np.arange(len(x)), level.ravel())),
                             shape=(len(x), int(level.max(initial=-1)) + 1))
  pos = np.asarray((onehot.T @ (w * y).T).T)  # [B, levels], weight of the positives per level
  neg = np.asarray((onehot.T @ (w * ~y).T).T)
  below = np.cumsum(neg, axis=1) - neg
  u = np.sum(pos * (below + 0.5 * neg), axis=1)
  n1, n0 = pos.sum(axis=1), neg.sum(axis=1)
  ok = (n1 > 0) & (n0 > 0)
  return np.where(ok, u / np.where(ok, n1 * n0, 1.0), np.nan)


def kept_alignment(scores, align, fraction: float, weights=None) -> tuple[np.ndarray, np.ndarray]:
  """Keep the round(fraction · N) nodes with the highest ``scores`` (N = the weight of a row;
  equal scores: the earlier node first, as ``proxies.top_fraction``). scores, align f64[n];
  weights f[B, n] node multiplicities (None: each node once, B = 1). Returns (mean align of
  the kept nodes, their share of Σ max(align, 0)), each f64[B] (NaN where nothing is kept /
  no alignment is positive)."""
  x, a = np.asarray(scores, np.float64), np.asarray(align, np.float64)
  w = np.ones((1, len(x))) if weights is None else np.atleast_2d(
      np.asarray(weights, np.float64))
  order = np.argsort(-x, kind="stable")
  w, a = w[:, order], a[order]
  k = np.round(fraction * w.sum(axis=1))
  # A node's copies are kept while the count before them is under k (the last one in part).
  kept = np.clip(k[:, None] - (np.cumsum(w, axis=1) - w), 0.0, w)
  positive = np.maximum(a, 0.0)
  total = w @ positive
  mean = np.where(k > 0, kept @ a / np.maximum(k, 1.0), np.nan)
  share = np.where(total > 0, kept @ positive / np.where(total > 0, total, 1.0), np.nan)
  return mean, share


def question_weights(questions, n_boot: int, seed: int = 0) -> np.ndarray:
  """f64[n_boot, n]: per resample of the questions (Q drawn with replacement), how many times
  each node is counted (its question's draws). questions: [n] each node's question label."""
  codes = pd.factorize(np.asarray(questions))[0]
  q = int(codes.max(initial=-1)) + 1
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, max(q, 1), size=(n_boot, q)) + q * np.arange(n_boot)[:, None]
  counts = np.bincount(draws.ravel(), minlength=n_boot * q).reshape(n_boot, q)
  return counts[:, codes].astype(np.float64)


def _interval(boots, alpha: float) -> tuple[float, float]:
  b = np.asarray(boots, np.float64)
  b = b[np.isfinite(b)]
  if not len(b):
    return (math.nan, math.nan)
  return (float(np.quantile(b, alpha / 2)), float(np.quantile(b, 1 - alpha / 2)))


def _value(point, boots, alpha) -> dict:
  lo, hi = _interval(boots, alpha)
  v = float(np.asarray(point).ravel()[0]) if np.size(point) else math.nan
  return {"value": v, "ci_low": lo, "ci_high": hi}


def _kept(scores, align, weights, alpha) -> tuple[dict, dict]:
  """{"10": {"value", "ci_low", "ci_high"}, …} of the kept mean and of the positive share."""
  mean, share = {}, {}
  for x in KEEP_PERCENTS:
    m, s = kept_alignment(scores, align, x / 100)
    mb, sb = kept_alignment(scores, align, x / 100, weights)
    mean[str(x)], share[str(x)] = _value(m, mb, alpha), _value(s, sb, alpha)
  return mean, share


def calibrate(nodes: pd.DataFrame, direction: str, *, n_boot: int = 2000, alpha: float = 0.05,
              seed: int = 0) -> dict:
  """Every proxy against align_<direction> over the informative nodes of ``nodes`` (rows of
  one (student, spec); columns ``question_id, informative, align_<direction>, proxy_<name>``).

  Returns {proxy: {"auc", "ci_low", "ci_high" (of the AUC), "num_nodes", "num_questions",
  "num_positive" (nodes with align > 0), "all_align" (mean align_d of the nodes), "kept_align"
  and "oracle_kept_align" ({"10", "25", "50"}: mean align_d of the nodes kept by the proxy /
  by align_d itself), "kept_positive" and "oracle_kept_positive" (their share of Σ max(align_d,
  0))}}; each kept / all entry is {"value", "ci_low", "ci_high"}. The nodes are those with a
  finite proxy and alignment (a node no on-policy rollout left has no proxy value).
  """
  info = nodes[nodes["informative"].astype(bool)] if len(nodes) else nodes
  align_all = (info[f"align_{direction}"].to_numpy(np.float64) if len(info)
               else np.zeros(0))
  out = {}
  for name in PROXIES:
    col = f"proxy_{name}"
    score = info[col].to_numpy(np.float64) if len(info) else np.zeros(0)
    ok = np.isfinite(score) & np.isfinite(align_all)
    x, a = score[ok], align_all[ok]
    qs = info["question_id"].to_numpy()[ok] if len(info) else np.zeros(0)
    w = question_weights(qs, n_boot, seed)
    lo, hi = _interval(weighted_auc(x, a > 0, w), alpha) if len(x) else (math.nan, math.nan)
    kept, kept_pos = _kept(x, a, w, alpha)
    oracle, oracle_pos = _kept(a, a, w, alpha)
    out[name] = {"auc": auc(x, a > 0), "ci_low": lo, "ci_high": hi, "num_nodes": int(len(x)),
                 "num_questions": int(len(pd.unique(qs))), "num_positive": int(np.sum(a > 0)),
                 "all_align": _value(np.mean(a) if len(a) else math.nan, w @ a / np.where(
                     w.sum(1) > 0, w.sum(1), np.nan), alpha),
                 "kept_align": kept, "oracle_kept_align": oracle,
                 "kept_positive": kept_pos, "oracle_kept_positive": oracle_pos}
  return out


__all__ = ["KEEP_PERCENTS", "auc", "calibrate", "kept_alignment", "question_weights",
           "weighted_auc"]
