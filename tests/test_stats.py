"""analysis.stats against hand-worked cases and exact enumeration."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

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


# ---------------------------------------------------------------------------------------
# Within question


def _tiny_table():
  """Three questions with both kinds, one with only correct rollouts and a NaN score (both
  must be ignored). Columns: question, correct, score."""
  rows = [("a", True, 0.9), ("a", False, 0.1), ("a", True, 0.5),
          ("b", True, 0.2), ("b", False, 0.8), ("b", False, 0.6), ("b", True, 0.0),
          ("c", False, 0.3), ("c", True, 0.7), ("c", False, 0.9), ("c", False, np.nan),
          ("d", True, 0.4), ("d", True, -0.4)]
  q, c, y = zip(*rows)
  return np.array(q), np.array(c), np.array(y, float)


def _delta_by_hand(q, c, y):
  out = []
  for k in sorted(set(q)):
    m = (q == k) & np.isfinite(y)
    inc, cor = y[m & ~c], y[m & c]
    if len(inc) and len(cor):
      out.append(inc.mean() - cor.mean())
  return np.array(out)


def test_question_differences_hand_worked():
  q, c, y = _tiny_table()
  # a: 0.1 − 0.7; b: 0.7 − 0.1; c: 0.6 − 0.7 (the NaN rollout drops); d has no incorrect
  np.testing.assert_allclose(stats.question_differences(y, c, q), [-0.6, 0.6, -0.1])
  w = stats.within_question(y, c, q, n_boot=500)
  assert w.difference == pytest.approx(-0.1 / 3)
  assert (w.num_questions, w.num_rollouts) == (3, 10)
  assert w.ci_low <= w.difference <= w.ci_high
  assert w.sd == pytest.approx(np.std([-0.6, 0.6, -0.1], ddof=1))


def test_relabelling_test_hand_worked():
  """Two questions with both kinds, one without; null draws given by hand."""
  observed = {"a": 0.5, "b": 0.1}
  null = {"a": [0.0, 0.2, 0.4, 0.6], "b": [0.1, -0.1, np.nan, 0.3], "c": [np.nan] * 4}
  out = stats.relabelling_test(observed, null)
  draws = np.array([0.05, 0.05, 0.4, 0.45])  # per relabelling, mean over finite questions
  m = draws.mean()
  stat = 0.3
  assert out["null_mean"] == pytest.approx(m)
  assert out["p"] == pytest.approx((1 + np.sum(np.abs(draws - m) >= abs(stat - m))) / 5)
  assert out["centred"] == pytest.approx({"a": 0.5 - 0.3, "b": 0.1 - 0.1})
  assert out["num_relabellings"] == 4


def test_relabelling_test_finds_a_planted_effect_and_has_the_plus_one():
  rng = np.random.default_rng(0)
  null = {f"q{k}": 0.2 + 0.05 * rng.normal(size=999) for k in range(20)}
  observed = {f"q{k}": 0.9 for k in range(20)}
  out = stats.relabelling_test(observed, null)
  assert out["p"] == pytest.approx(1 / 1000)
  assert out["centred"]["q0"] == pytest.approx(0.7, abs=0.01)
  assert np.isnan(stats.relabelling_test(observed, {})["p"])


def test_min_detectable_difference_formula():
  # (z_0.975 + z_0.8) · sd / √n with sd = 0.2, n = 3
  want = (1.959964 + 0.841621) * 0.2 / np.sqrt(3)
  assert stats.min_detectable_difference([0.1, 0.3, 0.5]) == pytest.approx(want, rel=1e-5)
  assert np.isnan(stats.min_detectable_difference([0.4]))


def test_within_question_without_both_kinds_is_nan():
  w = stats.within_question([0.1, 0.2, np.nan], [True, True, False], ["a", "a", "a"])
  assert w.num_questions == 0 and np.isnan(w.difference) and np.isnan(w.p_permutation)
  assert np.isnan(w.ci_low) and np.isnan(w.p_wilcoxon)


def test_stratified_differences_hand_worked():
  #   question  stratum  correct  score
  rows = [("a", 0, True, 0.5), ("a", 0, False, 0.1),          # Δ_a,0 = −0.4
          ("a", 1, True, 0.2), ("a", 1, True, 0.4), ("a", 1, False, 0.9),  # Δ_a,1 = 0.6
          ("b", 0, True, 0.0), ("b", 0, False, 0.2), ("b", 0, False, 0.4),  # Δ_b,0 = 0.3
          ("b", 1, False, 0.7),                                # no correct: no cell
          ("c", 1, True, 0.6), ("c", 1, False, 0.0)]           # Δ_c,1 = −0.6
  q, s, c, y = (np.array(x) for x in zip(*rows))
  out = stats.stratified_differences(y.astype(float), c, q, s, n_boot=300)
  assert set(out) == {0, 1}
  assert out[0]["difference"] == pytest.approx((-0.4 + 0.3) / 2)
  assert out[1]["difference"] == pytest.approx((0.6 - 0.6) / 2)
  assert out[0]["num_questions"] == out[1]["num_questions"] == 2
  assert out[0]["ci_low"] <= out[0]["difference"] <= out[0]["ci_high"]


def _regression_table(seed=0, n_q=6):
  rng = np.random.default_rng(seed)
  q = np.repeat(np.arange(n_q), 5)
  c = rng.random(len(q)) < 0.5
  c[::5], c[1::5] = True, False  # every question has both kinds
  length = rng.integers(5, 60, len(q)).astype(float)
  y = 0.3 * ~c + 0.01 * length + rng.normal(size=n_q)[q] + 0.2 * rng.normal(size=len(q))
  return q, c, length, y


def test_fixed_effects_ols_matches_lstsq_with_dummies_and_a_hand_sandwich():
  """β from least squares with one dummy per question; its clustered variance from the
  sandwich over that full design (the code fits the within deviations)."""
  q, c, length, y = _regression_table()
  reg = stats.fixed_effects_ols(y, c, q, [length])
  X = np.column_stack([(~c).astype(float), length, (q[:, None] == np.unique(q)).astype(float)])
  beta = np.linalg.lstsq(X, y, rcond=None)[0]
  u = y - X @ beta
  bread = np.linalg.inv(X.T @ X)
  scores = [X[q == k].T @ u[q == k] for k in np.unique(q)]
  meat = sum(np.outer(s, s) for s in scores)
  # K counts the slopes only: the fixed effects are nested in the clusters
  n, k, g = X.shape[0], 2, len(scores)
  cov = bread @ meat @ bread * g / (g - 1) * (n - 1) / (n - k)
  se = np.sqrt(cov[0, 0])
  assert reg.coefficient == pytest.approx(beta[0])
  assert reg.se == pytest.approx(se)
  t_crit = sps.t.ppf(0.975, g - 1)
  assert (reg.ci_low, reg.ci_high) == pytest.approx((beta[0] - t_crit * se, beta[0] + t_crit * se))
  assert reg.p_value == pytest.approx(2 * sps.t.sf(abs(beta[0] / se), g - 1))
  assert (reg.num_questions, reg.num_rollouts) == (6, 30)


def test_fixed_effects_ols_drops_a_covariate_the_dummies_absorb_and_needs_two_questions():
  q, c, length, y = _regression_table()
  per_question = q * 10.0  # constant within each question
  with_it = stats.fixed_effects_ols(y, c, q, [length, per_question])
  assert with_it == stats.fixed_effects_ols(y, c, q, [length])
  one = q == 0
  assert np.isnan(stats.fixed_effects_ols(y[one], c[one], q[one], [length[one]]).coefficient)
