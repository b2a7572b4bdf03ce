"""analysis/tables.py: the (sum, count) aggregates against direct computations, and the
rollout-table sums the report combines."""

import numpy as np
import pandas as pd

from gradalign_jax import gradients as G
from gradalign_jax.analysis import tables


def test_aggregates_are_exact_across_chunks():
  rng = np.random.default_rng(6)
  g, d = rng.normal(size=(50, 9)), rng.normal(size=(50, 9))
  keep = rng.random(50) < 0.7
  cos = np.asarray(G.alignment(g, d))
  dot = (g * d).sum(-1)
  ng, nd = np.linalg.norm(g, axis=-1), np.linalg.norm(d, axis=-1)
  parts = [tables.AlignmentSums.over(cos[s], dot[s], ng[s], nd[s], where=keep[s])
           for s in (slice(0, 13), slice(13, 40), slice(40, 50))]
  total = parts[0] + parts[1] + parts[2]
  got = {k: float(v) for k, v in total.summary().items()}
  k = keep
  assert got["count"] == k.sum()
  np.testing.assert_allclose(got["mean_cos"], cos[k].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["weighted_cos"], dot[k].sum() / (ng[k] * nd[k]).sum(), rtol=1e-5)
  np.testing.assert_allclose(got["pooled_cos"],
                             (g[k] * d[k]).sum() / np.linalg.norm(g[k]) / np.linalg.norm(d[k]),
                             rtol=1e-5)
  np.testing.assert_allclose(got["frac_positive"], (cos[k] > 0).mean(), rtol=1e-6)
  empty = tables.AlignmentSums.over(cos, dot, ng, nd, where=np.zeros(50, bool)).summary()
  assert np.isnan(float(empty["mean_cos"])) and float(empty["count"]) == 0


def test_rollout_sums_combine_rows_exactly():
  """Splitting a set of nodes into rollouts and adding the rows' sums gives the set's
  weighted and pooled cosines and fraction positive (computed here from the nodes)."""
  rng = np.random.default_rng(7)
  g, d = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
  cos = np.asarray(G.alignment(g, d), np.float64)
  dot = (g * d).sum(-1)
  ng, nd = np.linalg.norm(g, axis=-1), np.linalg.norm(d, axis=-1)
  rows = []
  for s in (slice(0, 5), slice(5, 5), slice(5, 29), slice(29, 40)):
    part = tables.AlignmentSums.over(cos[s], dot[s], ng[s], nd[s])
    rows.append({"n_nodes": part.count, "n_pos_x": part.positive,
                 "mean_x": part.cos / part.count if part.count else np.nan,
                 "sum_dot_x": part.dot, "sum_normprod_x": part.norm_prod, "sum_gg": part.sq_g,
                 "sum_dd_x": part.sq_d})
  got = tables.rollout_sums(pd.DataFrame(rows), "x").summary()
  assert got["count"] == 40
  np.testing.assert_allclose(got["mean_cos"], cos.mean(), rtol=1e-12)
  np.testing.assert_allclose(got["weighted_cos"], dot.sum() / (ng * nd).sum(), rtol=1e-12)
  np.testing.assert_allclose(got["pooled_cos"], (g * d).sum() / np.linalg.norm(g)
                             / np.linalg.norm(d), rtol=1e-12)
  np.testing.assert_allclose(got["frac_positive"], (cos > 0).mean(), rtol=1e-12)
