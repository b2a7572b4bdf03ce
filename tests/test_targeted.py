"""Targeted rollouts: depth windows and the budget split, the priority order (against numpy
from full forwards), branching that reaches the intended (node, token) and leaves ancestors
alone, Q̂ converging to the exact Q (exact.enumerate_tree) as M grows, and a smoke run of
experiments/validate_estimator.py."""

import dataclasses
import json
import os

import numpy as np
import pytest
import scipy.special

from gradalign_jax import alignment, exact, models, sampling, scoring, targeted, tree

V = 16
EOS = 1
VOCAB = [1, 4, 7, 9]
HORIZON = 5
CFG = models.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=32)
PROMPT = [3, 11, 5]
MASK = np.isin(np.arange(V), VOCAB)
SCFG = sampling.SamplingConfig(max_new_tokens=HORIZON, eos_ids=(EOS,), max_cache_len=16)


def _params(seed, scale=6.0):
  p = models.init_params(CFG, seed)
  p["lm_head"] = p["lm_head"].replace(p["lm_head"][...] * scale)
  return p


STUDENT, TEACHER = _params(0), _params(1)


def reward(y):
  return float(y.count(4) % 2 == 1)


# --------------------------------------------------------------------------- windows, split


@pytest.mark.parametrize("depth,window", [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3),
                                          (8, 4), (1023, 10), (1024, 11)])
def test_window_index(depth, window):
  assert targeted.window_index([depth])[0] == window
  lo, hi = targeted.window_bounds(window)
  assert lo <= depth < hi


@pytest.mark.parametrize("available,total,want", [
    ([5, 5, 5], 6, [2, 2, 2]),            # equal shares
    ([5, 5, 5], 7, [3, 2, 2]),            # remainder to the shallowest
    ([1, 10, 10], 9, [1, 4, 4]),          # a small window hands its share on
    ([1, 0, 2, 10], 12, [1, 0, 2, 9]),    # empty window gets nothing
    ([2, 3], 100, [2, 3]),                # more budget than candidates
    ([4, 4], 0, [0, 0]),
])
def test_split_budget(available, total, want):
  np.testing.assert_array_equal(targeted.split_budget(available, total), want)


def test_select_splits_windows_then_takes_best_priorities():
  # Hand-made candidates: window 0 (depth 0) has 3 pairs, window 1 (depth 1) 1, window 2
  # (depths 2-3) 4. Five pairs: shares 2/1/2 (window 1 can take only 1 → 2, 1, 2).
  c = targeted.Candidates(
      node=np.array([0, 0, 0, 1, 2, 3, 3, 4], np.int32),
      token=np.array([4, 7, 9, 4, 7, 4, 9, 4], np.int32),
      depth=np.array([0, 0, 0, 1, 2, 3, 3, 2], np.int32),
      priority=np.array([0.1, 0.5, 0.3, 0.01, 0.2, 0.9, 0.05, 0.2], np.float32),
      trials=np.array([0, 1, 0, 0, 0, 0, 0, 2]))
  idx = targeted.select(c, 5)
  # window 0: priorities 0.5 (i=1), 0.3 (i=2); window 1: i=3; window 2: 0.9 (i=5), then the
  # tie at 0.2 goes to fewer trials (i=4 has 0, i=7 has 2).
  assert idx.tolist() == [1, 2, 3, 5, 4]
  # Budget 2 → one pair each for windows 0 and 1 (shallowest get the remainder).
  assert targeted.select(c, 2).tolist() == [1, 3]
  idx, counts = targeted.plan_round(c, budget=10, m=4)  # ⌈10/4⌉ = 3 pairs, 10 dealt evenly
  assert idx.tolist() == [1, 3, 5] and counts.tolist() == [4, 3, 3]
  idx, counts = targeted.plan_round(c, budget=21, m=2)  # only 8 candidates: more each
  assert sorted(idx.tolist()) == list(range(8)) and counts.tolist() == [3] * 5 + [2] * 3
  # The surplus past M = 2 each (21 − 16 = 5) in proportion to priority (Σ = 2.26): shares
  # 5·p/2.26 floor to 1 for i=1 and i=5; the 3 left go to the largest remainders: i=5 (.99),
  # i=2 (.66), then the tie i=4 / i=7 (.44) to the earlier.
  idx, counts = targeted.plan_round(c, budget=21, m=2, surplus="priority")
  got = dict(zip(idx.tolist(), counts.tolist()))
  assert got == {0: 2, 1: 3, 2: 3, 3: 2, 4: 3, 5: 4, 6: 2, 7: 2}


# --------------------------------------------------------------------------- candidates


def _hand_tree():
  t = tree.PrefixTree()
  for seq, r in [((4, 7, 1), 1), ((4, 9, 1), 0), ((7, 4, 4, 1), 1), ((4, 7, 9, 1), 0),
                 ((4, 7, 1), 1), ((4, 7, 1), 0)]:
    t.add(seq, r)
  return t


def _numpy_logp(params, prefix):
  """log π restricted to VOCAB from a plain full forward (independent of scoring)."""
  z = np.asarray(models.forward(CFG, params, np.asarray([PROMPT + list(prefix)], np.int32)))
  z = z[0, -1].astype(np.float64)
  z = np.where(MASK, z, -np.inf)
  return z - scipy.special.logsumexp(z)


@pytest.mark.parametrize("priority", ["reverse_kl", "prob_gap"])
def test_candidates_priorities_and_eligibility(priority):
  t = _hand_tree()
  cfg = targeted.TargetedConfig(priority=priority, min_trials=2)
  c = targeted.candidates(t, scoring.PromptedModel(CFG, STUDENT, PROMPT),
                          scoring.PromptedModel(CFG, TEACHER, PROMPT), cfg, MASK, chunk_nodes=8)
  a = t.arrays()
  scored = {int(i) for i in np.flatnonzero(a.child_count > 0)}
  assert set(c.node.tolist()) <= scored and set(c.token.tolist()) <= set(VOCAB)
  for u in scored:
    path = t.path(u)
    trials = {k: n for k, (_, n) in t.outcomes(path).items()}
    lp, lq = _numpy_logp(STUDENT, path), _numpy_logp(TEACHER, path)
    p, q = np.exp(lp), np.exp(lq)
    with np.errstate(invalid="ignore"):  # −inf − −inf off the restricted vocab
      ell = np.where(MASK, lp - lq, 0.0)
    ref = (np.abs(p * (ell - np.sum(np.where(MASK, p * ell, 0.0)))) if priority == "reverse_kl"
           else np.abs(p - q))
    eligible = [k for k in VOCAB if trials.get(k, 0) < 2]
    got = {int(k): float(pr) for n, k, pr in zip(c.node, c.token, c.priority) if n == u}
    assert sorted(got) == sorted(eligible), path  # exactly the pairs with n_k < min_trials
    for k in eligible:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-4, atol=1e-6)
    assert all(c.depth[c.node == u] == len(path))


# --------------------------------------------------------------------------- branching


@pytest.fixture(scope="module")
def pool():
  ro = sampling.sample(CFG, STUDENT, [PROMPT], SCFG, num_samples=8, seed=3, vocab_mask=MASK)
  p = targeted.RolloutPool()
  p.add(ro, [reward(ro.sequence(b)) for b in range(len(ro))])
  return p


def _snapshot(t):
  a = t.arrays()
  return {t.path(i): (a.successes[i], a.trials[i], a.visits[i]) for i in range(a.num_nodes)}


def test_targeted_rollout_reaches_the_pair_and_leaves_ancestors_alone(pool):
  t = pool.tree
  a = t.arrays()
  # a node at depth ≥ 1 with a child, and a token none of the rollouts took there
  pairs = [(int(i), x) for i in np.flatnonzero((a.child_count > 0) & (a.depth >= 1))
           for x in VOCAB if x not in t.outcomes(t.path(int(i)))]
  u, k = pairs[0]
  path = t.path(u)
  before = _snapshot(t)
  c = targeted.Candidates(np.array([u], np.int32), np.array([k], np.int32),
                          np.array([len(path)], np.int32), np.ones(1, np.float32),
                          np.zeros(1, np.int64))
  n0 = pool.num_rollouts
  (log,) = targeted.run_round([pool], [c], budget=6, m=6, cfg_model=CFG, params=STUDENT,
                              reward_fn=reward, vocab_mask=MASK, seed=1)
  assert log.rollouts.tolist() == [6] and pool.num_rollouts == n0 + 6
  new = [pool.batches[b] for b, _ in pool.origin[n0:]]
  rows = [r for _, r in pool.origin[n0:]]
  for ro, r in zip(new, rows):
    seq = tuple(ro.sequence(r))
    assert seq[:len(path) + 1] == path + (k,) and ro.branch_depth[r] == len(path)
  after = _snapshot(t)
  wins = sum(reward(tuple(ro.sequence(r))) for ro, r in zip(new, rows))
  for prefix, stats in before.items():
    if len(prefix) <= len(path):  # u and its ancestors (edges into them) are untouched
      if path[:len(prefix)] == prefix:
        assert after[prefix] == stats, prefix
  # u's own children: only the forced edge moved, by (wins, 6) outcomes and no visit
  assert after[path + (k,)] == (wins, 6, 0)
  for x, (s, n) in t.outcomes(path).items():
    if x != k:
      assert (s, n) == before[path + (x,)][:2]


def test_find_sources_passes_through_the_node(pool):
  a = pool.tree.arrays()
  nodes = np.flatnonzero(a.child_count > 0)
  for u, (b, r) in zip(nodes, targeted.find_sources(pool, nodes, a)):
    path = pool.tree.path(int(u))
    seq = pool.batches[b].sequence(r)
    assert tuple(seq[:len(path)]) == path and len(seq) > len(path)
  leaf = int(np.flatnonzero(a.child_count == 0)[0])
  with pytest.raises(ValueError, match="only nodes with a child"):
    targeted.find_sources(pool, [leaf], a)


def test_q_hat_converges_to_exact_q():
  """Q̂(u, k) from the first M of 256 forced continuations (one branch call; the estimate a
  budget of M would give): the exact Q lies in its Wilson interval for every M, the interval
  narrows as M grows, and the tree's (s, n) of u·k count exactly the forced rollouts."""
  ex = exact.enumerate_tree(CFG, STUDENT, PROMPT, VOCAB, HORIZON, reward, EOS)
  ro = sampling.sample(CFG, STUDENT, [PROMPT], SCFG, num_samples=2, seed=0, vocab_mask=MASK)
  seq = ro.sequence(int(np.argmax(ro.lengths)))
  path = tuple(seq[:1])  # a depth-1 node; every non-EOS token of it
  p = targeted.RolloutPool()
  p.add(ro, [reward(tuple(ro.sequence(r))) for r in range(2)])
  before = p.tree.outcomes(path)
  u = p.tree.find(path)
  toks = [x for x in VOCAB if x != EOS]
  c = targeted.Candidates(np.full(len(toks), u, np.int32), np.asarray(toks, np.int32),
                          np.ones(len(toks), np.int32), np.ones(len(toks), np.float32),
                          np.zeros(len(toks), np.int64))
  m = 256
  targeted.run_round([p], [c], budget=m * len(toks), m=m, cfg_model=CFG, params=STUDENT,
                     reward_fn=reward, vocab_mask=MASK, seed=7)
  widths = []
  for i, x in enumerate(toks):
    forced = p.tree.rollouts[2 + i * m: 2 + (i + 1) * m]  # request i's rows, in order
    rewards = np.asarray([r for _, r, _ in forced])
    assert all(bd == len(path) for _, _, bd in forced)
    s0, n0 = before.get(x, (0.0, 0))
    assert p.tree.outcomes(path)[x] == (s0 + rewards.sum(), n0 + m)
    q = ex.values[path + (x,)]
    for n in (16, 64, 256):
      lo, hi = tree.wilson_interval(rewards[:n].sum(), n, z=3.29)  # 99.9%: 9 checks at once
      assert lo <= q <= hi, (n, x, rewards[:n].sum(), q)
      widths.append(hi - lo)
  w = np.asarray(widths).reshape(len(toks), 3)
  assert np.all(w[:, 1] < w[:, 0]) and np.all(w[:, 2] < w[:, 1])


def _numpy_top_p(lp, top_p):
  """Support of nucleus sampling from log π over VOCAB (independent of sampler.py): tokens by
  descending probability while the mass before them is short of top_p."""
  p = np.exp(lp)
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros(len(p), bool)
  keep[order[before < top_p]] = True
  return keep & MASK


def test_truncated_policy_end_to_end():
  """With top-p sampling: every targeted rollout forces a token of the truncated support, and
  the final pass's cosines equal numpy's with the truncated, renormalised π (O = observed
  children in the support) and the untruncated teacher q."""
  top_p = 0.8
  scfg = dataclasses.replace(SCFG, top_p=top_p)
  ro = sampling.sample(CFG, STUDENT, [PROMPT], scfg, num_samples=16, seed=5, vocab_mask=MASK)
  pool = targeted.RolloutPool()
  pool.add(ro, [reward(ro.sequence(b)) for b in range(len(ro))])
  cfg = targeted.TargetedConfig(budget=48, num_continuations=4, rounds=2, tolerance=0.0)
  targeted.targeted_rollouts([pool], [scoring.PromptedModel(CFG, STUDENT, PROMPT)], None, cfg,
                             reward, MASK, policy=scfg, seed=2, chunk_nodes=8)
  t = pool.tree
  forced = [(seq, b) for seq, b in ((t.path(leaf), b) for leaf, _, b in t.rollouts)
            if b is not None]
  assert len(forced) == 48
  for seq, b in forced:
    lp = _numpy_logp(STUDENT, seq[:b])
    assert _numpy_top_p(lp, top_p)[seq[b]], (seq, b)
  cols, _ = alignment.score_tree(t, scoring.PromptedModel(CFG, STUDENT, PROMPT),
                                 scoring.PromptedModel(CFG, TEACHER, PROMPT), chunk_nodes=8,
                                 vocab_mask=MASK, topk=3, policy=scfg)
  checked = truncated = 0
  for i, u in enumerate(cols["node_id"]):
    path = t.path(int(u))
    lp = _numpy_logp(STUDENT, path)
    keep = _numpy_top_p(lp, top_p)
    truncated += keep.sum() < MASK.sum()
    pi = np.where(keep, np.exp(lp), 0.0)
    pi /= pi.sum()
    q = np.exp(_numpy_logp(TEACHER, path))
    obs = {k: s_ / n for k, (s_, n) in t.outcomes(path).items() if keep[k]}
    informative = len(obs) >= 2 and len(set(obs.values())) > 1
    assert cols["informative"][i] == informative and cols["num_observed"][i] == len(obs)
    if not informative:
      continue
    v_hat = sum(pi[k] * x for k, x in obs.items()) / sum(pi[k] for k in obs)
    g = np.zeros(V)
    for k, x in obs.items():
      g[k] = pi[k] * (x - v_hat)
    with np.errstate(divide="ignore"):
      ell = np.where(keep, np.log(np.where(keep, pi, 1.0)) - np.log(np.where(MASK, q, 1.0)), 0.0)
    d = -pi * (ell - np.sum(pi * ell))
    want = g @ d / (np.linalg.norm(g) * np.linalg.norm(d))
    np.testing.assert_allclose(cols["align_reverse_kl"][i], want, atol=2e-4, err_msg=str(path))
    fwd = np.where(MASK, q, 0.0) - pi
    np.testing.assert_allclose(cols["align_forward_kl"][i],
                               g @ fwd / (np.linalg.norm(g) * np.linalg.norm(fwd)), atol=2e-4)
    checked += 1
  assert checked >= 2 and truncated >= 3  # the truncation matters at several nodes


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match="priority='kl' is not one of"):
    targeted.TargetedConfig(priority="kl")
  assert targeted.TargetedConfig(budget=10, rounds=3).round_budgets() == [4, 3, 3]


# --------------------------------------------------------------------------- experiment


def test_validate_estimator_smoke(tmp_path):
  # A subprocess: absl flags are process-global, and other experiment modules imported by
  # the test session define flags of the same names (--out, --seed).
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run(
      [sys.executable, "-m", "experiments.validate_estimator", f"--out={tmp_path}",
       "--budgets=8", "--seeds=1", "--questions=1", "--horizon=3", "--initial_rollouts=4",
       "--bootstrap=50"], cwd=root, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=root))
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  recs = summary["records"]
  assert {(r["method"], r["budget"]) for r in recs} == {(m, b) for m in ("uniform", "targeted")
                                                        for b in (8,)}
  for r in recs:
    for k in ("mean_cos_to_exact", "mean_abs_align_error", "coverage"):
      assert k in r and k + "_lo" in r and k + "_hi" in r
    assert r["rollouts_used"] <= r["budget"]
  report = (tmp_path / "report.md").read_text()
  assert "Budget reaching mean cos" in report and (tmp_path / "error_vs_budget.png").exists()
  assert summary["meta"]["policy_check"] < 1e-4


VALIDATE_BAD_FLAGS = [
    ("vocab_out_of_range", ["--vocab=1,4,99"], r"--vocab=\[1, 4, 99\] must be ≥ 2 distinct ids"),
    ("budget_below_initial", ["--budgets=4,8", "--initial_rollouts=8"],
     r"every budget must be ≥ --initial_rollouts=8"),
    ("no_seeds", ["--seeds=0"], r"--seeds=0, .* must each be ≥ 1"),
    ("reward_token_outside_vocab", ["--reward_token=5"],
     r"--reward_token=5 must be one of --vocab"),
    ("eos_outside_vocab", ["--eos=2"], r"--eos=2 must be one of --vocab"),
    ("horizon_past_cache", ["--horizon=14"], r"--horizon=14 must be in \[1, 13\]"),
    ("no_out", [], r"--out is required"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in VALIDATE_BAD_FLAGS],
                         ids=[c[0] for c in VALIDATE_BAD_FLAGS])
def test_validate_estimator_checks_flags_first(tmp_path, args, message):
  """Refused before any model or file: exit 1, a short message naming the flag, no --out."""
  import re
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "out"
  run = subprocess.run(
      [sys.executable, "-m", "experiments.validate_estimator"]
      + ([] if args == [] else [f"--out={out}"]) + args, cwd=root, capture_output=True,
      text=True, env=dict(os.environ, PYTHONPATH=root))
  assert run.returncode == 1, run.stderr[-2000:]
  assert run.stderr.startswith("error: ") and len(run.stderr.splitlines()) <= 3, run.stderr
  assert re.search(message, run.stderr), run.stderr
  assert not out.exists()
