"""alignment.py: leave-one-out scores against a brute-force re-scoring of the tree rebuilt
without the rollout, and the float64 ĝ* against a direct computation."""

import numpy as np
import pytest

from gradalign_jax import alignment, models, proxies, scoring, tree

V = 40
CFG = models.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16)
STUDENT = models.init_params(CFG, seed=3)
TEACHER = models.init_params(CFG, seed=4)
PROMPT = [5, 9, 2, 7]
# Directions that read only the logits (single_sample and MiniLLM also read the visit counts,
# which leaving a rollout out of Q̂ does not change: MATH.md).
LOGIT_ONLY = ("reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "topk_reverse_kl_sg")


def _rollouts(seed, n=14, length=6):
  """Rollouts over a 3-token alphabet (many shared prefixes, nodes with several observed
  children), a reward each, and two targeted rollouts."""
  rng = np.random.default_rng(seed)
  ro = [([int(x) for x in rng.choice([1, 2, 3], size=length)], float(rng.random() < 0.5), None)
        for _ in range(n)]
  base = ro[0][0]
  ro += [(base[:2] + [3, 1, 1], 1.0, 2), (base[:1] + [2, 2], 0.0, 1)]
  return ro


def _build(rollouts):
  t = tree.PrefixTree()
  for tokens, reward, branch in rollouts:
    t.add(tokens, reward, branch_depth=branch)
  return t


def _score(t):
  student = scoring.PromptedModel(CFG, STUDENT, PROMPT)
  teacher = scoring.PromptedModel(CFG, TEACHER, PROMPT)
  return alignment.tree_terms(t, student, teacher, chunk_nodes=8, topk=3)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_equals_rescoring_without_the_rollout(seed):
  rollouts = _rollouts(seed)
  full = _build(rollouts)
  terms = _score(full)
  paths = alignment.rollout_paths(full, terms.arrays)
  checked = 0
  for r in range(4):
    tokens, reward, _ = rollouts[r]
    loo = terms.leave_one_out(paths[r], reward)
    rest = _build(rollouts[:r] + rollouts[r + 1:])
    cols = _score(rest).node_columns()
    row = {int(u): i for i, u in enumerate(cols["node_id"])}
    for depth in range(len(tokens)):
      node = rest.find(tokens[:depth])
      if node is None or node not in row:  # only this rollout reached the node, or its leaf
        assert not loo["informative"][depth]
        continue
      i = row[node]
      assert loo["informative"][depth] == cols["informative"][i], (r, depth)
      np.testing.assert_allclose(loo["norm_ideal"][depth], cols["norm_ideal"][i], rtol=1e-9,
                                 atol=1e-15)
      for d in LOGIT_ONLY:
        np.testing.assert_allclose(loo[f"align_{d}"][depth], cols[f"align_{d}"][i], rtol=1e-6,
                                   atol=1e-9, err_msg=f"{d} rollout {r} depth {depth}")
      checked += cols["informative"][i]
  assert checked >= 5  # enough informative nodes for the comparison to mean something


def test_leave_one_out_differs_from_the_full_tree():
  """The rollout's own reward moves ĝ* toward its token when it is correct (the bias that
  leave-one-out removes): on a node where two children were tried, leaving a correct rollout
  out lowers the Q̂ of its own child."""
  t = tree.PrefixTree()
  t.add([1, 1], 1.0)
  t.add([1, 2], 0.0)
  t.add([2, 1], 1.0)
  t.add([2, 2], 1.0)
  t.add([1, 1], 0.0)
  terms = _score(t)
  path = alignment.rollout_paths(t, terms.arrays)[0]
  loo = terms.leave_one_out(path, 1.0)
  full = terms.node_columns()
  root = int(np.flatnonzero(full["node_id"] == 0)[0])
  # Root: children 1 (Q̂ 1/3, n 3) and 2 (Q̂ 1). Without rollout 0, child 1 has Q̂ 0/2.
  assert full["v_hat"][root] != pytest.approx(0.0)
  z = np.asarray(models.forward(CFG, STUDENT, np.asarray([PROMPT])))[0, -1].astype(np.float64)
  pi = np.exp(z - z.max())
  pi /= pi.sum()
  for q1, got in ((1 / 3, full["norm_ideal"][root]), (0.0, loo["norm_ideal"][0])):
    v_hat = (pi[1] * q1 + pi[2] * 1.0) / (pi[1] + pi[2])
    g = np.array([pi[1] * (q1 - v_hat), pi[2] * (1.0 - v_hat)])
    np.testing.assert_allclose(got, np.linalg.norm(g), rtol=1e-5)


def _loo_means(terms, paths, rewards, g, name):
  """Each on-policy rollout's mean leave-one-out cosine, one rollout at a time."""
  out = []
  for r in range(g):
    loo = terms.leave_one_out(paths[r], rewards[r])
    inf = loo["informative"]
    out.append(loo[f"align_{name}"][inf].mean() if inf.any() else np.nan)
  return np.asarray(out)


def test_relabelled_means_equal_rescoring_with_the_labels_swapped():
  """A relabelling of the on-policy rewards gives the scores of a tree built with those
  rewards (targeted rollouts keep theirs); the identity gives the rollouts' own scores."""
  rollouts = _rollouts(2)
  g = len(rollouts) - 2  # the last two are targeted
  t = _build(rollouts)
  terms = _score(t)
  paths = alignment.rollout_paths(t, terms.arrays)[:g]
  rewards = np.asarray([r for _, r, _ in rollouts[:g]])
  rng = np.random.default_rng(0)
  labels = np.stack([rewards] + [rng.permutation(rewards) for _ in range(3)])
  got = terms.relabelled_means(paths, rewards, labels, ["reverse_kl", "jsd"])
  for p, row in enumerate(labels):
    swapped = [(tok, float(row[i]) if i < g else rew, b)
               for i, (tok, rew, b) in enumerate(rollouts)]
    ref_terms = terms if p == 0 else _score(_build(swapped))
    for name in ("reverse_kl", "jsd"):
      want = _loo_means(ref_terms, paths, row, g, name)
      np.testing.assert_allclose(got[name][p], want, rtol=1e-6, atol=1e-9, err_msg=f"{name} {p}")
  assert not np.allclose(np.nan_to_num(got["reverse_kl"][0]), np.nan_to_num(got["reverse_kl"][1]))


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def test_node_proxies_equal_the_proxies_at_the_rollout_tokens():
  """Each node's proxy_<name> is the mean over the rollouts that leave it on-policy of the
  proxy at their token: checked against the models' logits from an independent forward at
  the node's prefix (π at the sampling temperature, q at the teacher's), both through
  proxies.proxy_scores and through numpy's formulas; child_logq is log q of each child."""
  temperature, teacher_temperature = 0.7, 1.5
  rollouts = _rollouts(3) + [([4], 1.0, None), ([4, 5], 0.0, 1)]
  t = _build(rollouts)
  student = scoring.PromptedModel(CFG, STUDENT, PROMPT)
  teacher = scoring.PromptedModel(CFG, TEACHER, PROMPT)
  terms, _ = alignment.tree_terms(t, student, teacher, chunk_nodes=8, topk=3,
                                  policy=temperature, teacher_temperature=teacher_temperature)
  cols = terms.node_columns()
  names = list(proxies.PROXIES)
  checked = nan_nodes = 0
  for i, u in enumerate(cols["node_id"]):
    prefix = list(t.path(int(u)))
    ids = np.asarray([PROMPT + prefix])
    zs = np.asarray(models.forward(CFG, STUDENT, ids))[0, -1] / temperature
    zt = np.asarray(models.forward(CFG, TEACHER, ids))[0, -1] / teacher_temperature
    visits = t.visits(prefix)
    kids = sorted(t.outcomes(prefix))
    p, q = _softmax64(zs), _softmax64(zt)
    logq_kids = terms.edge["logq"][[t.find(prefix + [k]) for k in kids]]
    np.testing.assert_allclose(logq_kids, np.log(q[kids]), rtol=1e-4, atol=1e-5)
    total = sum(visits.values())
    if total == 0:  # only forced tokens left the node
      assert all(np.isnan(cols[f"proxy_{n}"][i]) for n in names)
      nan_nodes += 1
      continue
    toks = np.asarray(sorted(visits))
    w = np.asarray([visits[k] for k in toks], np.float64) / total
    lib = proxies.proxy_scores(np.broadcast_to(zs, (len(toks), V)),
                               np.broadcast_to(zt, (len(toks), V)), toks)
    by_hand = {"student_entropy": np.full(len(toks), -np.sum(p * np.log(p))),
               "kl_pq": np.full(len(toks), np.sum(p * (np.log(p) - np.log(q)))),
               "abs_p_minus_q": np.abs(p[toks] - q[toks]),
               "teacher_logprob": np.log(q[toks])}
    for n in names:
      np.testing.assert_allclose(cols[f"proxy_{n}"][i], np.sum(w * np.asarray(lib[n])),
                                 rtol=1e-4, atol=1e-6, err_msg=f"{n} node {u}")
      np.testing.assert_allclose(cols[f"proxy_{n}"][i], np.sum(w * by_hand[n]), rtol=1e-4,
                                 atol=1e-6, err_msg=f"{n} node {u} (by hand)")
    checked += len(toks) > 1
  assert checked >= 5 and nan_nodes == 1
