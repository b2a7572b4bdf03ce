"""analysis.stats against hand-worked cases and exact enumeration."""

import itertools

import numpy as np
import pytest

from gradalign_jax.analysis import stats


def test_mann_whitney_hand_worked():
  # incorrect = [3, 4], correct = [1, 2]: every incorrect beats every correct, U = 4.
  r = stats.mann_whitney([3, 4], [1, 2])
  assert r.statistic == 4 and r.effect_size == 1.0 and (r.n_a, r.n_b) == (2, 2)
  # exact two-sided p: P(U = 4 or U = 0) over the C(4,2) = 6 equally likely splits = 2/6
  assert r.p_value == pytest.approx(1 / 3)
  assert stats.mann_whitney([1, 2], [3, 4]).effect_size == -1.0


def test_mann_whitney_ignores_nan_and_handles_empty():
  r = stats.mann_whitney([3, np.nan, 4], [1, 2])
  assert r.n_a == 2 and r.statistic == 4
  assert np.isnan(stats.mann_whitney([], [1.0]).p_value)


def test_paired_wilcoxon_exact_enumeration():
  inc = np.array([0.5, 0.3, 0.9, 0.2, 0.7])
  cor = np.array([0.1, 0.4, 0.2, 0.1, 0.0])
  d = inc - cor
  r = stats.paired_wilcoxon(inc, cor)
  # exact null distribution of W+ by enumerating all 2^5 sign flips of the ranks
  ranks = np.argsort(np.argsort(np.abs(d))) + 1
  w_plus = ranks[d > 0].sum()
  w_all = [sum(r_ for r_, s in zip(ranks, signs) if s) for signs in
           itertools.product([0, 1], repeat=5)]
  total = ranks.sum()
  extreme = min(w_plus, total - w_plus)
  p_exact = np.mean([min(w, total - w) <= extreme for w in w_all])
  assert r.p_value == pytest.approx(p_exact)
  assert r.effect_size == pytest.approx((w_plus - (total - w_plus)) / total)
  assert r.n_a == 5


def test_paired_wilcoxon_drops_unpaired_and_checks_shapes():
  r = stats.paired_wilcoxon([1.0, np.nan, 3.0, 5.0], [0.0, 1.0, 1.0, 1.0])
  assert r.n_a == 3
  with pytest.raises(ValueError, match="equal lengths"):
    stats.paired_wilcoxon([1.0, 2.0], [1.0])


def test_bootstrap_ci_covers_mean_and_is_seeded():
  x = np.random.default_rng(0).normal(1.0, 1.0, 400)
  lo, hi = stats.bootstrap_ci(x, seed=3)
  assert lo < x.mean() < hi and hi - lo < 0.3
  assert (lo, hi) == stats.bootstrap_ci(x, seed=3)
  # ~ 1.96 σ/√n for a mean
  assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.15)


def test_bootstrap_difference_ci():
  rng = np.random.default_rng(1)
  lo, hi = stats.bootstrap_difference_ci(rng.normal(1, 1, 300), rng.normal(0, 1, 300))
  assert 0.6 < lo < 1.0 < hi < 1.4


def test_spearman_monotone():
  rho, p = stats.spearman([1, 2, 3, 4, np.nan], [10, 20, 30, 45, 1])
  assert rho == pytest.approx(1.0) and p < 0.1
