"""analysis.report / markdown / plots against brute force over node vectors and scipy by hand."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as sps

from experiments import files
from gradalign_jax.analysis import markdown, plots, report
from gradalign_jax.proxies import PROXIES

DIRS = ("reverse_kl", "jsd")
COVARIATES = ("kl_pq", "kl_qp", "l2_pq", "cos_pq", "entropy_p", "entropy_q", "depth",
              "depth_norm", "norm_ideal", "norm_reverse_kl")
N_BOOT = 200


def _cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rollout_row(g, ds, **keys):
  """A rollouts-table row from its path's informative nodes: g f32[n, V], ds {dir: f32[n, V]}."""
  row = dict(keys, n_nodes=len(g), sum_gg=float((g * g).sum()))
  for d, dv in ds.items():
    cos = np.array([_cos(a, b) for a, b in zip(g, dv)])
    row.update({f"mean_{d}": cos.mean() if len(cos) else np.nan,
                f"sum_dot_{d}": float((g * dv).sum()),
                f"sum_normprod_{d}": float((np.linalg.norm(g, axis=1)
                                            * np.linalg.norm(dv, axis=1)).sum()),
                f"sum_dd_{d}": float((dv * dv).sum()), f"n_pos_{d}": int((cos > 0).sum())})
  return row


def sweep_tables(shifts, n_q=6, G=6, seed=0, V=4):
  """Synthetic rollouts/questions/nodes tables. shifts: {(student, spec): (correct, incorrect)}
  pulls d toward g by that much on rollouts of each kind; (None, None) gives a spec whose
  context is unavailable on its last question."""
  rng = np.random.default_rng(seed)
  rollouts, questions, nodes = [], [], []
  for (student, spec), (s_cor, s_inc) in shifts.items():
    for q in range(n_q):
      qid = f"q{q}"
      if s_cor is None and q == n_q - 1:
        questions.append(dict(student=student, spec=spec, question_id=qid, n_rollouts=G,
                              n_correct=G, accuracy=1.0, context="no incorrect rollout among 8 "
                              "demo samples", **{f"mean_{d}": np.nan for d in DIRS},
                              **{f"null_delta_{d}": [] for d in DIRS}))
        continue
      rows = []
      for r in range(G):
        correct = bool(rng.random() < 0.5)
        n = int(rng.integers(0, 5))
        g = rng.normal(size=(n, V))
        shift = (s_cor if correct else s_inc) or 0.0
        ds = {d: rng.normal(size=(n, V)) + shift * g for d in DIRS}
        rows.append(rollout_row(g, ds, student=student, spec=spec, question_id=qid, rollout=r,
                                correct=correct, length=n + 3))
      rollouts += rows
      n_cor = sum(r["correct"] for r in rows)
      questions.append(dict(student=student, spec=spec, question_id=qid, n_rollouts=G,
                            n_correct=n_cor, accuracy=n_cor / G, context="ok",
                            **{f"mean_{d}": rng.uniform(-1, 1) for d in DIRS},
                            **{f"null_delta_{d}": _null_draws(pd.DataFrame(rows), d, q)
                               for d in DIRS}))
    n = 40
    kl = rng.exponential(size=n)
    node = dict(student=student, spec=spec, question_id=[f"q{i % n_q}" for i in range(n)],
                node_id=np.arange(n),
                depth=rng.integers(0, 20, n), informative=rng.random(n) < 0.8,
                kl_pq=kl, **{c: rng.normal(size=n) for c in COVARIATES[1:] if c != "depth"})
    node["depth_norm"] = node["depth"] / 20
    for d in DIRS:
      node[f"align_{d}"] = np.tanh(kl - 1 + 0.5 * rng.normal(size=n))
    # filters: one tracking KL (so the alignment), the others noise; one node without a value
    for name in PROXIES:
      node[f"proxy_{name}"] = kl + rng.normal(size=n) if name == "kl_pq" else rng.normal(size=n)
      node[f"proxy_{name}"][n - 1] = np.nan
    nodes.append(pd.DataFrame(node))
  return pd.DataFrame(rollouts), pd.DataFrame(questions), pd.concat(nodes, ignore_index=True)


def rollouts_from_means(rows):
  """Rollouts with one unit-norm node each, so mean = weighted = pooled = the given cosine.
  rows: (student, spec, question_id, rollout, correct, cosine)."""
  out = []
  for student, spec, qid, r, correct, c in rows:
    out.append(dict(student=student, spec=spec, question_id=qid, rollout=r, correct=correct,
                    length=1, n_nodes=1, sum_gg=1.0,
                    **{k: v for d in DIRS for k, v in ((f"mean_{d}", c), (f"sum_dot_{d}", c),
                                                       (f"sum_normprod_{d}", 1.0),
                                                       (f"sum_dd_{d}", 1.0),
                                                       (f"n_pos_{d}", int(c > 0)))}))
  return pd.DataFrame(out)


N_NULL = 999


def _null_draws(r, d, seed):
  """Δ_q under N_NULL shuffles of one question's labels over its fixed scores: the synthetic
  scores here do not depend on the labels, so this is the relabelling null (the pipeline
  recomputes its scores instead)."""
  rng = np.random.default_rng(seed)
  y, c = r[f"mean_{d}"].to_numpy(float), r["correct"].to_numpy(bool)
  out = []
  for _ in range(N_NULL):
    p = rng.permutation(c)
    inc, cor = y[~p & np.isfinite(y)], y[p & np.isfinite(y)]
    out.append(inc.mean() - cor.mean() if len(inc) and len(cor) else np.nan)
  return out


def questions_for(rollouts):
  g = rollouts.groupby(["student", "spec", "question_id"], sort=False)
  q = g.agg(n_rollouts=("correct", "size"), n_correct=("correct", "sum")).reset_index()
  q["accuracy"] = q["n_correct"] / q["n_rollouts"]
  q["context"] = "ok"
  for d in DIRS:
    q[f"mean_{d}"] = g[f"mean_{d}"].mean().to_numpy()
    q[f"null_delta_{d}"] = [_null_draws(r, d, i) for i, (_, r) in enumerate(g)]
  return q


@pytest.fixture(scope="module")
def sweep():
  shifts = {("small", "self"): (0.0, 1.5), ("small", "teacher"): (0.5, 0.5),
            ("small", "self:correct_demo"): (None, None),
            ("large", "self"): (1.0, 0.0), ("large", "teacher"): (0.0, 0.0)}
  rollouts, questions, nodes = sweep_tables(shifts)
  # a spec with only correct rollouts: its incorrect split is empty
  solo = rollouts[(rollouts["student"] == "large") & (rollouts["spec"] == "teacher")].copy()
  solo["spec"], solo["correct"] = "all_correct", True
  rollouts = pd.concat([rollouts, solo], ignore_index=True)
  questions = pd.concat([questions, questions_for(solo)], ignore_index=True)
  config = {"task": "synthetic", "G": 6, "T": 32, "budget": 0, "seed": 0}
  summary = report.summarize(rollouts, questions, nodes, DIRS, config, n_boot=N_BOOT)
  return rollouts, questions, nodes, summary


# ---------------------------------------------------------------------------------------
# split_block


def test_split_block_matches_brute_force_over_node_vectors():
  rng = np.random.default_rng(1)
  V, n_pool = 6, 12
  g_pool = rng.normal(size=(n_pool, V))
  d_pool = {d: rng.normal(size=(n_pool, V)) + 0.7 * g_pool for d in DIRS}
  # overlapping paths (a node counts once per rollout crossing it) and an empty one
  paths = [[0, 1, 2], [0, 1, 3, 4], [0, 5], [], [6, 7, 8, 9, 10, 11], [0, 1, 2]]
  rows = [rollout_row(g_pool[p], {d: d_pool[d][p] for d in DIRS}, student="s", spec="self",
                      question_id=f"q{i % 2}", rollout=i, correct=True, length=5)
          for i, p in enumerate(paths)]
  block = report.split_block(pd.DataFrame(rows), DIRS, n_boot=N_BOOT)

  pairs = np.concatenate(paths).astype(int)
  assert block["n_rollouts"] == 6 and block["n_questions"] == 2
  assert block["n_nodes"] == len(pairs) and block["n_scored"] == 5
  for d in DIRS:
    g, dv = g_pool[pairs], d_pool[d][pairs]
    cos = np.array([_cos(a, b) for a, b in zip(g, dv)])
    b = block[d]
    assert b["pooled"] == pytest.approx(_cos(g.ravel(), dv.ravel()))
    assert b["weighted"] == pytest.approx(
        (g * dv).sum() / (np.linalg.norm(g, axis=1) * np.linalg.norm(dv, axis=1)).sum())
    assert b["frac_pos"] == pytest.approx((cos > 0).mean())
    per_rollout = [np.mean([_cos(g_pool[u], d_pool[d][u]) for u in p]) for p in paths if p]
    assert b["mean"] == pytest.approx(np.mean(per_rollout))
    assert b["mean_ci"][0] <= b["mean"] <= b["mean_ci"][1]


def test_split_block_empty_is_nan_and_json_null():
  block = report.split_block(rollouts_from_means([]), DIRS, n_boot=N_BOOT)
  assert block["n_rollouts"] == block["n_nodes"] == block["n_questions"] == 0
  for d in DIRS:
    assert all(math.isnan(block[d][k]) for k in ("mean", "weighted", "pooled", "frac_pos"))
  back = json.loads(report.to_json(block))
  assert back[DIRS[0]]["pooled"] is None and back[DIRS[0]]["mean_ci"] == [None, None]


def test_missing_column_names_the_fix():
  rollouts = rollouts_from_means([("s", "self", "q0", 0, True, 0.5)]).drop(columns="sum_gg")
  with pytest.raises(ValueError, match=r"lacks columns \['sum_gg'\].*alignment_sweep"):
    report.split_block(rollouts, DIRS)


# ---------------------------------------------------------------------------------------
# summarize


@pytest.mark.parametrize("student,spec", [("small", "self"), ("small", "teacher"),
                                          ("large", "self")])
@pytest.mark.parametrize("d", DIRS)
def test_tests_match_scipy_by_hand(sweep, student, spec, d):
  rollouts, questions, nodes, summary = sweep
  r = rollouts[(rollouts.student == student) & (rollouts.spec == spec)]
  t = summary["students"][student]["specs"][spec]["tests"][d]
  inc = r[~r.correct][f"mean_{d}"].dropna().to_numpy()
  cor = r[r.correct][f"mean_{d}"].dropna().to_numpy()
  mw = sps.mannwhitneyu(inc, cor, alternative="two-sided")
  assert t["mann_whitney"]["p_value"] == pytest.approx(mw.pvalue)
  assert t["mann_whitney"]["statistic"] == pytest.approx(mw.statistic)
  assert (t["mann_whitney"]["n_a"], t["mann_whitney"]["n_b"]) == (len(inc), len(cor))
  assert t["difference"] == pytest.approx(inc.mean() - cor.mean())
  lo, hi = t["difference_ci"]
  assert lo < inc.mean() - cor.mean() < hi

  diffs = []
  for qid in r.question_id.unique():
    rq = r[r.question_id == qid]
    a = rq[~rq.correct][f"mean_{d}"].dropna()
    b = rq[rq.correct][f"mean_{d}"].dropna()
    if len(a) and len(b):
      diffs.append(a.mean() - b.mean())
  assert t["wilcoxon"]["n_a"] == len(diffs)
  assert t["wilcoxon"]["p_value"] == pytest.approx(sps.wilcoxon(diffs).pvalue)


def test_covariates_match_scipy_on_informative_nodes(sweep):
  _, _, nodes, summary = sweep
  n = nodes[(nodes.student == "small") & (nodes.spec == "teacher") & nodes.informative]
  cov = summary["students"]["small"]["specs"]["teacher"]["covariates"]
  assert set(cov) == set(COVARIATES)
  for name in COVARIATES:
    res = sps.spearmanr(n["align_reverse_kl"], n[name])
    assert cov[name]["spearman"] == pytest.approx(res.statistic)
    assert cov[name]["p"] == pytest.approx(res.pvalue)
  assert cov["kl_pq"]["spearman"] > 0.5  # align was built increasing in kl_pq


def test_summary_bookkeeping(sweep):
  rollouts, questions, _, summary = sweep
  small = summary["students"]["small"]
  q = questions[questions.student == "small"]
  assert small["accuracy"] == pytest.approx(q.n_correct.sum() / q.n_rollouts.sum())
  demo = small["specs"]["self:correct_demo"]
  assert demo["questions"] == {
      "n": 6, "context_unavailable": {"no incorrect rollout among 8 demo samples": 1}}
  r_demo = rollouts[(rollouts.student == "small") & (rollouts.spec == "self:correct_demo")]
  assert demo["accuracy"] == pytest.approx(r_demo.correct.mean())  # scored rollouts only
  r = rollouts[(rollouts.student == "small") & (rollouts.spec == "self")]
  block = small["specs"]["self"]
  assert block["correct"]["n_rollouts"] == r.correct.sum()
  assert block["incorrect"]["n_rollouts"] == (~r.correct).sum()
  assert block["all"]["n_nodes"] == r.n_nodes.sum()
  assert summary["config"]["task"] == "synthetic" and summary["directions"] == list(DIRS)


def test_empty_split_is_nan_and_summary_is_strict_json(sweep):
  *_, summary = sweep
  solo = summary["students"]["large"]["specs"]["all_correct"]
  assert solo["incorrect"]["n_rollouts"] == 0
  assert math.isnan(solo["incorrect"]["reverse_kl"]["mean"])
  assert math.isnan(solo["tests"]["reverse_kl"]["mann_whitney"]["p_value"])
  text = report.to_json(summary)
  json.loads(text)  # strict: to_json already refused NaN (allow_nan=False)
  back = json.loads(text)["students"]["large"]["specs"]["all_correct"]
  assert back["tests"]["reverse_kl"]["difference"] is None


def test_question_wins_and_best_spec_hand_worked():
  nan = np.nan
  # question means (one rollout each): q0 wins A; q1 wins B; q2 ties A and B; q3 lacks B's
  # context (B would win it by far: pooled over rollouts B is best); q4 has C unscored
  table = {"A": [0.5, 0.1, 0.4, 0.0, 0.2], "B": [0.2, 0.3, 0.4, 0.99, 0.1],
           "C": [0.1, 0.2, 0.0, 0.1, nan], "D": [nan] * 5}  # D has no scored rollout
  rows, contexts = [], []
  for spec, values in table.items():
    for i, v in enumerate(values):
      refused = (spec, i) == ("B", 3)
      contexts.append(dict(student="s", spec=spec, question_id=f"q{i}", n_rollouts=1,
                           n_correct=1, context="teacher refused" if refused else "ok",
                           **{f"mean_{d}": v for d in DIRS}))
      rows.append(("s", spec, f"q{i}", 0, True, v))
  rollouts = rollouts_from_means(rows)
  rollouts.loc[~np.isfinite(rollouts.mean_reverse_kl), "n_nodes"] = 0
  summary = report.summarize(rollouts, pd.DataFrame(contexts), pd.DataFrame(), DIRS,
                             n_boot=N_BOOT)
  s = summary["students"]["s"]
  assert s["n_common_questions"] == 3  # q0, q1, q2; D does not compete
  assert s["question_wins"] == pytest.approx({"A": 1.5 / 3, "B": 1.5 / 3, "C": 0.0, "D": nan},
                                             nan_ok=True)
  means = {k: np.mean(v[:3]) for k, v in table.items() if k != "D"}  # A 1/3, B 0.3, C 0.1
  assert {k: s["spec_means"][k]["mean"] for k in means} == pytest.approx(means)
  assert s["best_spec"] == "A"
  assert rollouts[rollouts.spec == "B"].mean_reverse_kl.mean() > rollouts[
      rollouts.spec == "A"].mean_reverse_kl.mean()  # pooled, B would have won
  m = s["best_spec_margin"]
  assert m["runner_up"] == "B" and m["difference"] == pytest.approx(means["A"] - means["B"])
  assert m["ci_low"] <= m["difference"] <= m["ci_high"] and m["num_questions"] == 3
  assert s["specs"]["B"]["questions"]["context_unavailable"] == {"teacher refused": 1}
  report.to_json(summary)


@pytest.mark.parametrize("best_large,differs", [("Y", True), ("X", False)])
def test_best_spec_differs_hand_worked(best_large, differs):
  rows = []
  means = {("small", "X"): 0.5, ("small", "Y"): 0.1,
           ("large", "X"): 0.4 if best_large == "X" else 0.1,
           ("large", "Y"): 0.4 if best_large == "Y" else 0.1}
  for (student, spec), m in means.items():
    for i in range(4):
      rows.append((student, spec, "q0", i, i % 2 == 0, m + 0.01 * i))
  rollouts = rollouts_from_means(rows)
  summary = report.summarize(rollouts, questions_for(rollouts), pd.DataFrame(),
                             directions=DIRS, n_boot=N_BOOT)
  f = summary["findings"]
  assert f["best_spec"] == {"small": "X", "large": best_large}
  assert f["best_spec_differs"] is differs


def _within_by_hand(r, d):
  """Δ_q from the rollouts table with pandas: {question: Δ_q} over questions with both kinds."""
  r = r[np.isfinite(r[f"mean_{d}"])]
  m = r.groupby(["question_id", "correct"])[f"mean_{d}"].mean().unstack()
  m = m.reindex(columns=[False, True]).dropna()
  return (m[False] - m[True]).to_dict()


def test_findings_count_specs_within_question(sweep):
  rollouts, _, _, summary = sweep
  for student, s in summary["findings"]["students"].items():
    higher, significant = 0, 0
    for spec in rollouts[rollouts.student == student].spec.unique():
      r = rollouts[(rollouts.student == student) & (rollouts.spec == spec)]
      deltas = list(_within_by_hand(r, "reverse_kl").values())
      w = summary["students"][student]["specs"][spec]["within_question"]
      if deltas and np.mean(deltas) > 0:
        higher += 1
        significant += w["p_permutation"] < 0.05
      assert s["within_question"][spec]["num_questions"] == len(deltas)
    assert (s["n_incorrect_higher"], s["n_incorrect_higher_significant"]) == (higher, significant)
  assert summary["findings"]["students"]["small"]["n_incorrect_higher_significant"] >= 1
  assert summary["findings"]["test"] == "within-question permutation"



# ---------------------------------------------------------------------------------------
# within question


@pytest.mark.parametrize("student,spec", [("small", "self"), ("small", "teacher"),
                                          ("small", "self:correct_demo"), ("large", "self")])
@pytest.mark.parametrize("d", DIRS)
def test_within_question_recomputed_from_the_rollouts_table(sweep, student, spec, d):
  rollouts, questions, _, summary = sweep
  r = rollouts[(rollouts.student == student) & (rollouts.spec == spec)]
  block = summary["students"][student]["specs"][spec]
  w = block["tests"][d]["within_question"]
  deltas = np.array(list(_within_by_hand(r, d).values()))
  assert w["num_questions"] == len(deltas) >= 3
  assert w["difference"] == pytest.approx(deltas.mean())
  assert w["ci_low"] <= w["difference"] <= w["ci_high"]
  q = questions[(questions.student == student) & (questions.spec == spec)].set_index(
      "question_id")[f"null_delta_{d}"]
  centred = np.array([v - np.nanmean(q[k]) for k, v in _within_by_hand(r, d).items()])
  assert w["null_mean"] == pytest.approx(
      np.nanmean(np.stack([v for v in q if len(v)]), axis=0).mean())
  assert w["difference_vs_null"] == pytest.approx(centred.mean())
  assert w["p_wilcoxon"] == pytest.approx(sps.wilcoxon(centred).pvalue)
  assert w["min_detectable"] == pytest.approx(
      (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * deltas.std(ddof=1) / np.sqrt(len(deltas)))
  scored = r[np.isfinite(r[f"mean_{d}"])]
  both = scored.groupby("question_id").correct.nunique() == 2
  assert w["num_rollouts"] == scored.question_id.map(both).sum()
  assert 1 / (1 + N_NULL) <= w["p_permutation"] <= 1
  reg = w["regression"]
  assert reg["num_questions"] == scored.question_id.nunique()
  assert reg["num_rollouts"] == len(scored)
  assert reg["ci_low"] <= reg["coefficient"] <= reg["ci_high"]
  if d == DIRS[0]:
    assert block["within_question"] == w


def test_summary_from_rollouts_parquet(sweep, tmp_path):
  """summary.json's within_question blocks, recomputed from rollouts.parquet as written."""
  rollouts, questions, nodes, _ = sweep
  files.save_table(rollouts, str(tmp_path / "rollouts.parquet"))
  back = pd.read_parquet(tmp_path / "rollouts.parquet")
  summary = json.loads(report.to_json(report.summarize(back, questions, nodes, DIRS,
                                                       n_boot=N_BOOT)))
  for student, s in summary["students"].items():
    for spec, b in s["specs"].items():
      r = back[(back.student == student) & (back.spec == spec)]
      deltas = list(_within_by_hand(r, DIRS[0]).values())
      w = b["within_question"]
      assert w["num_questions"] == len(deltas)
      assert (w["difference"] is None) if not deltas else w["difference"] == pytest.approx(
          np.mean(deltas))
      assert set(w) >= {"difference", "ci_low", "ci_high", "p_permutation", "p_wilcoxon",
                        "num_questions"}


@pytest.mark.parametrize("student,spec", [("small", "self"), ("large", "teacher")])
def test_strata_recomputed_from_the_rollouts_table(sweep, student, spec):
  rollouts, _, _, summary = sweep
  r = rollouts[(rollouts.student == student) & (rollouts.spec == spec)].copy()
  strata = summary["students"][student]["specs"][spec]["within_question"]["strata"]
  accuracy = r.groupby("question_id").correct.transform("mean")
  r["acc_bin"] = np.where(accuracy < 1 / 3 - 1e-9, 0, np.where(accuracy < 2 / 3 - 1e-9, 1, 2))
  lengths = r[r.n_nodes > 0].length
  e1, e2 = np.quantile(lengths, [1 / 3, 2 / 3])
  r["len_bin"] = np.select([r.length <= e1, r.length <= e2], [0, 1], 2)
  for name, col in (("question_accuracy", "acc_bin"), ("length", "len_bin")):
    assert len(strata[name]) == 3
    for k, row in enumerate(strata[name]):
      deltas = []
      for _, g in r[r[col] == k].groupby("question_id"):
        g = g[np.isfinite(g.mean_reverse_kl)]
        if g.correct.nunique() == 2:
          deltas.append(g[~g.correct].mean_reverse_kl.mean() - g[g.correct].mean_reverse_kl.mean())
      assert row["num_questions"] == len(deltas)
      if deltas:
        assert row["difference"] == pytest.approx(np.mean(deltas))
      else:
        assert math.isnan(row["difference"])
  assert strata["length"][0]["range"] == f"length ≤ {e1:.4g}"


def test_simpsons_paradox_pooled_and_within_disagree():
  """Easy questions: mostly correct and high alignment; hard: mostly incorrect and low. Within
  each question incorrect rollouts align better by 0.1, yet pooled they look far worse."""
  rows = []
  for q in range(12):
    easy = q % 2 == 0
    base = 0.6 if easy else -0.2
    labels = [True] * 5 + [False] if easy else [True] + [False] * 5
    for i, correct in enumerate(labels):
      rows.append(("s", "self", f"q{q}", i, correct, base + (0.0 if correct else 0.1)
                   + 0.01 * (i % 3)))
  rollouts = rollouts_from_means(rows)
  summary = report.summarize(rollouts, questions_for(rollouts), pd.DataFrame(), DIRS,
                             n_boot=N_BOOT)
  spec = summary["students"]["s"]["specs"]["self"]
  w = spec["within_question"]
  assert w["difference"] == pytest.approx(np.mean(list(_within_by_hand(rollouts, "reverse_kl")
                                                       .values())))
  assert w["difference"] > 0.05 and w["ci_low"] > 0 and w["p_permutation"] < 0.01
  assert w["regression"]["coefficient"] > 0 and w["regression"]["p_value"] < 0.01
  assert spec["tests"]["reverse_kl"]["difference"] < -0.3  # pooled: the opposite sign
  assert spec["tests"]["reverse_kl"]["mann_whitney"]["p_value"] < 0.01
  assert summary["findings"]["students"]["s"]["n_incorrect_higher_significant"] == 1


def test_within_question_block_is_strict_json_when_undefined(sweep):
  *_, summary = sweep
  solo = summary["students"]["large"]["specs"]["all_correct"]["within_question"]
  assert solo["num_questions"] == 0 and math.isnan(solo["difference"])
  back = json.loads(report.to_json(summary))
  spec = back["students"]["large"]["specs"]["all_correct"]
  for key in ("difference", "ci_low", "ci_high", "p_permutation", "p_wilcoxon"):
    assert spec["within_question"][key] is None
  assert spec["within_question"]["regression"]["coefficient"] is None
  assert back["methods"] == {"alpha": 0.05, "power": 0.8, "n_boot": N_BOOT, "n_perm": N_NULL,
                             "seed": 0, "proxies": {"direction": "reverse_kl",
                                                    "keep_percents": [10, 25, 50],
                                                    "positive": "align_reverse_kl > 0",
                                                    "unit": "question"}}


def test_coverage_is_informative_over_scored_nodes(sweep):
  _, _, nodes, summary = sweep
  n = nodes[(nodes.student == "small") & (nodes.spec == "self")]
  cov = summary["students"]["small"]["specs"]["self"]["coverage"]
  assert cov == {"informative": int(n.informative.sum()), "nodes": len(n),
                 "fraction": pytest.approx(n.informative.mean())}


# ---------------------------------------------------------------------------------------
# report.md


def test_filters_block_and_section(sweep):
  """summary["proxies"]: per student and spec, each filter's AUC over the informative nodes
  with a value (pairwise count by hand) and the top-x% alignment; report.md's section shows
  them."""
  _, _, nodes, summary = sweep
  n = nodes[(nodes.student == "small") & (nodes.spec == "teacher") & nodes.informative]
  n = n[np.isfinite(n.proxy_kl_pq)]
  e = summary["proxies"]["small"]["teacher"]["kl_pq"]
  s, y = n.proxy_kl_pq.to_numpy(), n.align_reverse_kl.to_numpy() > 0
  wins = sum((a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y])
  assert e["auc"] == pytest.approx(wins / (y.sum() * (~y).sum()))
  assert e["auc"] > 0.6 and e["ci_low"] < e["auc"] < e["ci_high"]
  assert (e["num_nodes"], e["num_questions"]) == (len(n), n.question_id.nunique())
  top = n.sort_values("proxy_kl_pq", ascending=False, kind="stable").align_reverse_kl
  assert e["kept_align"]["25"]["value"] == pytest.approx(top[:round(len(n) / 4)].mean())
  assert set(summary["proxies"]["large"]) == {"self", "teacher", "all_correct"}
  assert summary["methods"]["proxies"]["direction"] == "reverse_kl"
  text = markdown.render(json.loads(report.to_json(summary)))
  assert "## Cheap token filters vs alignment" in text
  assert text.index("## Cheap token filters vs alignment") > text.index("## large")
  row = (f"| teacher | kl_pq | {e['auc']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}] | "
         f"{e['num_nodes']} ({e['num_questions']}) | {e['kept_align']['10']['value']:.2f} [")
  assert row in text
  assert "| teacher | oracle (top by alignment) |" in text and "| self | all nodes |" in text


def _p_text(p):
  return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def test_render_numbers_and_findings():
  rng = np.random.default_rng(3)
  rows = []
  # "strong": incorrect rollouts align far better on both specs; "flat": correct do
  for student, sign in (("strong", 1.0), ("flat", -1.0)):
    for spec in ("self", "teacher"):
      for q in range(8):
        for i in range(6):
          correct = i < 3
          c = (-0.4 if correct else 0.4) * sign + 0.1 * rng.normal()
          rows.append((student, spec, f"q{q}", i, correct, c))
  rollouts = rollouts_from_means(rows)
  summary = report.summarize(rollouts, questions_for(rollouts), pd.DataFrame(), DIRS,
                             {"task": "synthetic", "G": 6}, n_boot=N_BOOT)
  # summary.json round trip: render reads null as n/a
  summary = json.loads(report.to_json(summary))
  text = markdown.render(summary, ["correct_vs_incorrect.png"], explorer="tokens.html")
  assert "Token explorer: [tokens.html](tokens.html)" in text

  for spec in ("self", "teacher"):
    assert f"| {spec} |" in text
    r = rollouts[(rollouts.student == "strong") & (rollouts.spec == spec)]
    p = sps.mannwhitneyu(r[~r.correct].mean_reverse_kl, r[r.correct].mean_reverse_kl).pvalue
    assert _p_text(p) in text and "e-" in _p_text(p)  # the pooled row stays
    delta = np.mean(list(_within_by_hand(r, "reverse_kl").values()))
    assert f"| {spec} | 8 (48) | {delta:+.3f} [" in text
  assert ("strong, within question (reverse_kl): Δ = incorrect − correct, against its "
          "relabelling null, is positive (incorrect "
          "rollouts align better) for 2 of 2 teacher specs (2 significant at p<0.05, "
          "within-question permutation test)" in text)
  assert ("flat, within question (reverse_kl): Δ = incorrect − correct, against its "
          "relabelling null, is positive" in text)
  assert "for 0 of 2 teacher specs" in text and "negative for 2 (2 significant)" in text
  assert "p 0.001, 8 questions" in text  # 1/(1 + 999): no permutation is as extreme
  assert "Best teacher context for strong, within question" in text
  assert "over the 8 questions every spec has" in text
  assert "### Pooled over questions (secondary: confounded by difficulty)" in text
  assert text.index("## Findings") < text.index("### Within question") < text.index(
      "### Pooled over questions")
  assert "![correct_vs_incorrect](correct_vs_incorrect.png)" in text
  assert "correct_vs_incorrect.png: rollouts pooled over questions (secondary)" in text
  assert "| task | synthetic |" in text and "## Methods" in text


@pytest.mark.parametrize("p,text", [(0.0034, "0.003"), (0.5, "0.500"), (2.1e-5, "2e-05"),
                                    (math.nan, "n/a"), (None, "n/a")])
def test_p_value_format(p, text):
  assert markdown._p(p) == text


def test_render_empty():
  summary = report.summarize(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), DIRS)
  text = markdown.render(summary)
  assert "## Findings" in text and "no best one" in text and "## Plots" not in text


def test_write_text_replaces_whole_file(tmp_path):
  path = str(tmp_path / "report.md")
  files.write_text(path, "old, longer text")
  assert files.write_text(path, "ρ – new") == path
  assert open(path, encoding="utf-8").read() == "ρ – new"
  assert os.listdir(tmp_path) == ["report.md"]  # no .tmp left behind


# ---------------------------------------------------------------------------------------
# plots


def _assert_png(fig, path):
  """fig is an Agg Figure (no pyplot) and saving it writes a PNG."""
  assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
  assert files.save_figure(fig, str(path)) == str(path)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not os.path.exists(str(path) + ".tmp")


@pytest.mark.parametrize("empty", [False, True], ids=["data", "empty"])
def test_plots_return_figures(sweep, tmp_path, empty):
  _, _, nodes, summary = sweep
  if empty:
    nodes = pd.DataFrame()
    summary = report.summarize(pd.DataFrame(), pd.DataFrame(), nodes, DIRS)
  made = {"a.png": plots.plot_correct_vs_incorrect(summary),
          "b.png": plots.plot_alignment_by_depth(nodes, "reverse_kl"),
          "c.png": plots.plot_directions(summary),
          "d.png": plots.plot_covariates(nodes, "jsd")}
  assert not os.listdir(tmp_path)  # building a figure writes nothing
  for name, fig in made.items():
    _assert_png(fig, tmp_path / name)


def test_plots_survive_null_summary_and_uninformative_nodes(sweep, tmp_path):
  _, _, nodes, summary = sweep
  summary = json.loads(report.to_json(summary))  # NaN → None, as read back from disk
  _assert_png(plots.plot_correct_vs_incorrect(summary), tmp_path / "a.png")
  _assert_png(plots.plot_directions(summary), tmp_path / "c.png")
  dull = nodes.assign(informative=False)
  _assert_png(plots.plot_alignment_by_depth(dull), tmp_path / "b.png")
  _assert_png(plots.plot_covariates(dull), tmp_path / "d.png")
