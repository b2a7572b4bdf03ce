"""analysis.filters: AUC against a brute-force pairwise count, kept alignment against a hand
computation and proxies.top_fraction, the bootstrap resampling whole questions."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from gradalign_jax import proxies
from gradalign_jax.analysis import filters


def _pairwise_auc(scores, positive):
  """Every (positive, negative) pair: 1 when the positive scores higher, ½ on a tie."""
  pos = [s for s, y in zip(scores, positive) if y]
  neg = [s for s, y in zip(scores, positive) if not y]
  wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
  return wins / (len(pos) * len(neg))


CASES = {
    "hand, with ties": ([0.3, 0.1, 0.3, 0.7, 0.1, 0.5, 0.3], [1, 0, 0, 1, 1, 0, 0]),
    "all tied": ([1.0, 1.0, 1.0, 1.0], [1, 0, 1, 0]),
    "separated": ([5.0, 4.0, 1.0, 0.0], [1, 1, 0, 0]),
    "random integers": (list(np.random.default_rng(0).integers(0, 5, 40).astype(float)),
                        list(np.random.default_rng(1).random(40) < 0.4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auc_equals_pairwise_count(case):
  scores, positive = CASES[case]
  want = _pairwise_auc(scores, positive)
  assert filters.auc(scores, positive) == pytest.approx(want, abs=1e-12)
  got = filters.weighted_auc(scores, np.asarray(positive, bool), np.ones((1, len(scores))))
  assert got[0] == pytest.approx(want, abs=1e-12)


def test_hand_auc_value():
  # positives 0.3, 0.7, 0.1 vs negatives 0.1, 0.3, 0.5, 0.3:
  # 0.3: ½ + ½ + 1 + 0 = 2; 0.7: 4; 0.1: ½ → 6.5 / 12
  assert filters.auc(*CASES["hand, with ties"]) == pytest.approx(6.5 / 12)


def test_auc_undefined_with_one_class():
  assert math.isnan(filters.auc([1.0, 2.0], [True, True]))
  assert np.isnan(filters.weighted_auc([1.0, 2.0], np.array([True, False]),
                                       np.array([[0.0, 3.0]])))[0]


def test_weighted_auc_equals_auc_of_the_repeated_nodes():
  rng = np.random.default_rng(2)
  scores = rng.integers(0, 6, 30).astype(float)  # ties across classes
  positive = rng.random(30) < 0.5
  weights = rng.integers(0, 4, (20, 30)).astype(float)
  got = filters.weighted_auc(scores, positive, weights)
  for b in range(20):
    rep = weights[b].astype(int)
    want = filters.auc(np.repeat(scores, rep), np.repeat(positive, rep))
    assert got[b] == pytest.approx(want, abs=1e-12) or (np.isnan(want) and np.isnan(got[b]))


def test_kept_alignment_hand_worked():
  scores = [0.9, 0.1, 0.5, 0.5, 0.8, 0.2, 0.3, 0.7, 0.4, 0.6]
  align = [0.5, -0.2, 0.1, -0.4, 0.3, 0.2, -0.1, 0.0, 0.6, -0.3]
  positive_total = 0.5 + 0.1 + 0.3 + 0.2 + 0.6
  # top 10%: round(1) node, score 0.9 → align 0.5
  mean, share = filters.kept_alignment(scores, align, 0.10)
  assert mean[0] == pytest.approx(0.5) and share[0] == pytest.approx(0.5 / positive_total)
  # top 25%: round(2.5) = 2 nodes (0.9, 0.8) → (0.5 + 0.3) / 2
  mean, share = filters.kept_alignment(scores, align, 0.25)
  assert mean[0] == pytest.approx(0.4) and share[0] == pytest.approx(0.8 / positive_total)
  # top 50%: 0.9, 0.8, 0.7, 0.6, then the tie at 0.5: the earlier row (align 0.1) is kept
  mean, share = filters.kept_alignment(scores, align, 0.50)
  assert mean[0] == pytest.approx((0.5 + 0.3 + 0.0 - 0.3 + 0.1) / 5)
  assert share[0] == pytest.approx(0.9 / positive_total)
  # the library's gate keeps the same rows
  gate = np.asarray(proxies.top_fraction(np.asarray(scores, np.float32), np.ones(10, bool), 0.5))
  assert np.flatnonzero(gate).tolist() == [0, 2, 4, 7, 9]


def test_kept_alignment_with_weights_equals_the_repeated_nodes():
  rng = np.random.default_rng(3)
  scores, align = rng.random(12), rng.uniform(-1, 1, 12)
  weights = rng.integers(0, 3, (15, 12)).astype(float)
  for fraction in (0.1, 0.25, 0.5):
    mean, share = filters.kept_alignment(scores, align, fraction, weights)
    for b in range(15):
      rep = weights[b].astype(int)
      s, a = np.repeat(scores, rep), np.repeat(align, rep)
      k = int(np.round(fraction * len(s)))
      top = a[np.argsort(-s, kind="stable")[:k]]
      assert mean[b] == pytest.approx(top.mean()) if k else np.isnan(mean[b])
      assert share[b] == pytest.approx(np.maximum(top, 0).sum() / np.maximum(a, 0).sum())


def test_question_weights_resample_whole_questions():
  questions = np.array(["a", "b", "a", "c", "b", "a", "d"])
  w = filters.question_weights(questions, 500, seed=1)
  for q in "abcd":
    col = w[:, questions == q]
    assert (col == col[:, :1]).all()  # a question's nodes move together
  per_question = np.stack([w[:, np.flatnonzero(questions == q)[0]] for q in "abcd"], axis=1)
  assert (per_question.sum(axis=1) == 4).all()  # 4 questions drawn per resample
  assert np.mean(per_question[:, 0] == 0) == pytest.approx((3 / 4) ** 4, abs=0.06)


def _dominated_table():
  """Question A: 60 nodes, the filter separates them perfectly; five small questions of 4
  nodes whose filter ranks them backwards. Pooled AUC (30·40 + 10·30) / 1600 = 0.9375."""
  rows = []
  for i in range(60):
    pos = i % 2 == 0
    rows.append(("A", 10 + i / 60 if pos else i / 60, 0.5 if pos else -0.5))
  for q in range(5):
    for j in range(4):
      pos = j < 2
      rows.append((f"s{q}", 4 + j / 10 if pos else 6 + j / 10, 0.5 if pos else -0.5))
  nodes = pd.DataFrame(rows, columns=["question_id", "score", "align_reverse_kl"])
  nodes["informative"] = True
  for name in proxies.PROXIES:
    nodes[f"proxy_{name}"] = nodes["score"]
  return nodes


def test_interval_resamples_questions_not_nodes():
  nodes = _dominated_table()
  out = filters.calibrate(nodes, "reverse_kl", n_boot=1000, seed=0)["kl_pq"]
  assert out["auc"] == pytest.approx(0.9375)
  assert (out["num_nodes"], out["num_questions"], out["num_positive"]) == (80, 6, 40)
  # A is absent from a third of the resamples, and then the filter is exactly backwards.
  assert out["ci_low"] == pytest.approx(0.0) and out["ci_high"] >= 0.9375
  # Resampling nodes as if independent would give a narrow interval around 0.94.
  rng = np.random.default_rng(0)
  s, y = nodes["score"].to_numpy(), nodes["align_reverse_kl"].to_numpy() > 0
  boots = []
  for _ in range(300):
    i = rng.integers(0, len(s), len(s))
    u = sps.mannwhitneyu(s[i][y[i]], s[i][~y[i]]).statistic
    boots.append(u / (y[i].sum() * (~y[i]).sum()))
  assert np.quantile(boots, 0.025) > 0.85


def test_calibrate_hand_table():
  """Non-informative nodes and nodes without a filter value drop out; the oracle keeps the
  most aligned nodes; every number equals its direct computation."""
  nodes = pd.DataFrame({
      "question_id": ["q0", "q0", "q1", "q1", "q2", "q2", "q2", "q3"],
      "informative": [True, True, True, False, True, True, True, True],
      "align_jsd": [0.4, -0.2, 0.1, 0.9, -0.5, 0.3, 0.0, 0.2],
  })
  score = np.array([2.0, 1.0, 3.0, 9.0, 0.5, np.nan, 1.0, 4.0])
  for name in proxies.PROXIES:
    nodes[f"proxy_{name}"] = score
  out = filters.calibrate(nodes, "jsd", n_boot=200, seed=0)["abs_p_minus_q"]
  # kept: q0 (2.0, 0.4), (1.0, -0.2); q1 (3.0, 0.1); q2 (0.5, -0.5), (1.0, 0.0); q3 (4.0, 0.2)
  s = np.array([2.0, 1.0, 3.0, 0.5, 1.0, 4.0])
  a = np.array([0.4, -0.2, 0.1, -0.5, 0.0, 0.2])
  assert (out["num_nodes"], out["num_questions"], out["num_positive"]) == (6, 4, 3)
  assert out["auc"] == pytest.approx(_pairwise_auc(s, a > 0))
  assert out["all_align"]["value"] == pytest.approx(a.mean())
  assert out["kept_align"]["25"]["value"] == pytest.approx((0.2 + 0.1) / 2)  # round(1.5) = 2
  assert out["oracle_kept_align"]["25"]["value"] == pytest.approx((0.4 + 0.2) / 2)
  assert out["kept_positive"]["50"]["value"] == pytest.approx((0.2 + 0.1 + 0.4) / 0.7)
  assert out["oracle_kept_positive"]["10"]["value"] == pytest.approx(0.4 / 0.7)
  for block in (out["kept_align"]["50"], out["oracle_kept_align"]["10"], out["all_align"]):
    assert block["ci_low"] <= block["value"] <= block["ci_high"]
  assert out["ci_low"] <= out["auc"] <= out["ci_high"]


def test_calibrate_empty():
  out = filters.calibrate(pd.DataFrame(), "reverse_kl", n_boot=50)
  assert set(out) == set(proxies.PROXIES)
  e = out["student_entropy"]
  assert e["num_nodes"] == 0 and math.isnan(e["auc"]) and math.isnan(e["ci_low"])
  assert math.isnan(e["kept_align"]["10"]["value"])
