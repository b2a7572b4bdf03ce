"""Scoring: logits at every tree node equal a plain full forward of that node's path (student,
and teacher with its context), each node processed once; and the cache attend_mask it uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from gradalign_jax import alignment, gradients, models, scoring, tree
from gradalign_jax.models import qwen3

V = 61
STUDENT_CFG = models.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=8)
TEACHER_CFG = models.Qwen3Config(vocab_size=V, hidden_size=48, intermediate_size=64, num_layers=1,
                                 num_heads=6, num_kv_heads=3, head_dim=8, rope_theta=5e4)
S_PARAMS = models.init_params(STUDENT_CFG, seed=1)
T_PARAMS = models.init_params(TEACHER_CFG, seed=2)
QUESTION = [4, 8, 15, 16, 23, 42 % V, 7, 9]
CONTEXT = list(np.random.default_rng(9).integers(0, V, 40))


def _branching_rollouts(n, length, seed):
  """Rollouts that branch off earlier ones at random points (shared prefixes), as a sampler's."""
  rng = np.random.default_rng(seed)
  rollouts = [list(rng.integers(0, V, length))]
  for _ in range(n - 1):
    base = rollouts[rng.integers(len(rollouts))]
    cut = int(rng.integers(0, length))
    rollouts.append(base[:cut] + list(rng.integers(0, V, length - cut)))
  return rollouts


def _tree(n=10, length=12, seed=0):
  t = tree.PrefixTree()
  rollouts = _branching_rollouts(n, length, seed)
  for i, r in enumerate(rollouts):
    t.add(r, i % 3 == 0)
  t.add(rollouts[0][:3] + [5, 6], 1, branch_depth=3)  # a targeted rollout, shorter
  return t, rollouts + [rollouts[0][:3] + [5, 6]]


def _full_node_logits(cfg, params, prompt, t, rollouts, node_ids):
  """Reference: plain full forwards (no cache) of every rollout, right-padded into one batch
  (causal: padding changes nothing before it); node u's logits are those at the last token of
  prompt + path(u) in any rollout through u."""
  width = max(map(len, rollouts))
  toks = [list(prompt) + list(r) + [0] * (width - len(r)) for r in rollouts]
  logits = np.asarray(models.forward(cfg, params, jnp.asarray(toks, jnp.int32)))
  where = {}
  for j, r in enumerate(rollouts):
    for depth in range(len(r) + 1):
      where.setdefault(t.find(r[:depth]), (j, len(prompt) - 1 + depth))
  return np.stack([logits[where[i]] for i in node_ids])


@pytest.mark.parametrize("chunk_nodes,question", [(8, QUESTION), (64, QUESTION[:1])],
                         ids=["chunks8", "one_chunk_one_token_question"])
def test_node_logits_equal_full_forward(chunk_nodes, question):
  t, rollouts = _tree()
  student = scoring.PromptedModel(STUDENT_CFG, S_PARAMS, question)
  teacher = scoring.PromptedModel(TEACHER_CFG, T_PARAMS, CONTEXT + question)
  ids, s, te, stats = scoring.node_logits(t, student, teacher, chunk_nodes)
  a = t.arrays()
  want_ids = np.flatnonzero((a.child_count > 0) | (np.arange(a.num_nodes) == 0))
  assert sorted(ids.tolist()) == want_ids.tolist()  # every scored node exactly once
  np.testing.assert_allclose(
      s, _full_node_logits(STUDENT_CFG, S_PARAMS, question, t, rollouts, ids), rtol=1e-5,
      atol=1e-5)
  np.testing.assert_allclose(
      te, _full_node_logits(TEACHER_CFG, T_PARAMS, CONTEXT + question, t, rollouts, ids),
      rtol=1e-5, atol=1e-5)
  assert stats.unique_nodes == len(ids)
  assert stats.student_positions == (len(question) - 1 + len(ids) + stats.padding
                                     + stats.student_prompt_padding)
  assert stats.padding < (8 if chunk_nodes == 8 else chunk_nodes // 2 + 8)


@pytest.mark.parametrize("n,chunk", [(1, 256), (7, 4), (8, 8), (100, 7), (439, 64), (1000, 256),
                                     (65, 64)])
def test_plan_chunks_cover_the_preorder_with_little_padding(n, chunk):
  t = tree.PrefixTree()
  for r in _branching_rollouts(max(n // 6, 1), 7, seed=n):
    t.add(r, 1)
  a = t.arrays()
  plan = scoring.plan_tree(a, chunk)
  starts = [s for s, _ in plan.chunks]
  sizes = [c for _, c in plan.chunks]
  assert starts == list(np.cumsum([0] + sizes[:-1])) and sum(sizes) == len(plan.node_ids)
  assert len(plan.node_ids) - plan.num_nodes < (8 if chunk == 8 else chunk // 2 + 8)
  assert max(sizes) <= chunk
  assert all(c == chunk for c in sizes[:-1])  # full chunks, then one power of two
  assert sizes[-1] == chunk or sizes[-1] & (sizes[-1] - 1) == 0
  order = {int(u): j for j, u in enumerate(plan.node_ids[:plan.num_nodes])}
  for u, j in order.items():  # lo/hi: exactly the scored descendants, ancestors come first
    below = {order[v] for v in order if a.path(v)[:a.depth[u]] == a.path(u)}
    assert below == set(range(plan.lo[j], plan.hi[j])) and plan.lo[j] == j


def test_positions_processed():
  """Token positions processed vs unique nodes + context on a sampler-like tree (the measurement
  quoted in scoring.py's docstring)."""
  t = tree.PrefixTree()
  for i, r in enumerate(_branching_rollouts(16, 48, seed=3)):
    t.add(r, i % 2)
  student = scoring.PromptedModel(STUDENT_CFG, S_PARAMS, QUESTION)
  teacher = scoring.PromptedModel(TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION)
  chunks = list(scoring.node_logit_chunks(t, student, teacher, 8, stats := []))
  st = stats[0]
  print(f"\nscoring: unique nodes {st.unique_nodes}, student positions {st.student_positions} "
        f"(context {st.student_context}), teacher positions {st.teacher_positions} (context "
        f"{st.teacher_context}), padding {st.padding}; per-rollout forwards would process "
        f"{st.per_rollout_student} / {st.per_rollout_teacher}")
  assert sum(len(c.node_ids) for c in chunks) == st.unique_nodes + st.padding
  for positions, context, prompt_pad in [
      (st.student_positions, st.student_context, st.student_prompt_padding),
      (st.teacher_positions, st.teacher_context, st.teacher_prompt_padding)]:
    assert positions - st.padding - prompt_pad == st.unique_nodes + context - 1
    assert positions <= 1.05 * st.unique_nodes + context + prompt_pad
  assert st.per_rollout_student > 1.5 * st.student_positions


@pytest.mark.parametrize("t_student,t_teacher", [(0.7, 1.0), (0.7, 0.7), (1.0, 1.6)],
                         ids=["teacher_as_is", "gkd_convention", "hot_teacher"])
def test_score_tree_matches_per_node_gradients(t_student, t_teacher):
  """The student's T reaches π only, the teacher's T_τ reaches q only (MATH.md)."""
  t, rollouts = _tree()
  student = scoring.PromptedModel(STUDENT_CFG, S_PARAMS, QUESTION)
  teacher = scoring.PromptedModel(TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION)
  mask = np.arange(V) < V - 5
  cols, stats = alignment.score_tree(t, student, teacher, chunk_nodes=8, vocab_mask=mask, topk=5,
                                     policy=t_student, teacher_temperature=t_teacher)
  a = t.arrays()
  assert stats.unique_nodes == len(cols["node_id"])
  i = int(np.flatnonzero(cols["informative"])[0])
  node = cols["node_id"][i]
  path = t.path(node)
  z = _full_node_logits(STUDENT_CFG, S_PARAMS, QUESTION, t, rollouts, [node])[0] / t_student
  zt = (_full_node_logits(TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION, t, rollouts, [node])[0]
        / t_teacher)
  lp, lq = _log_softmax(z, mask), _log_softmax(zt, mask)
  p, pq = np.exp(lp), np.exp(lq)
  lp, lq = np.where(mask, lp, 0.0), np.where(mask, lq, 0.0)  # −inf off the mask
  np.testing.assert_allclose(cols["entropy_q"][i], -np.sum(np.where(mask, pq * lq, 0.0)),
                             rtol=1e-4)
  np.testing.assert_allclose(cols["kl_pq"][i], np.sum(np.where(mask, p * (lp - lq), 0.0)),
                             rtol=1e-3, atol=1e-6)
  q = np.zeros(V)
  obs = np.zeros(V, bool)
  for tok, (s, n) in t.outcomes(path).items():
    q[tok], obs[tok] = s / n, True
  g = gradients.ideal_direction(z, q, obs, mask)
  d = gradients.reverse_kl_direction(z, zt, mask)
  np.testing.assert_allclose(cols["align_reverse_kl"][i], float(gradients.alignment(g, d)),
                             atol=1e-5)
  assert cols["depth"][i] == len(path) and cols["num_observed"][i] == a.num_observed[node]


def test_tree_without_rollouts_scores_the_root():
  student = scoring.PromptedModel(STUDENT_CFG, S_PARAMS, QUESTION)
  ids, s, _, stats = scoring.node_logits(tree.PrefixTree(), student, student, 8)
  want = np.asarray(models.forward(STUDENT_CFG, S_PARAMS, jnp.asarray([QUESTION], jnp.int32)))
  assert ids.tolist() == [0] and stats.unique_nodes == 1
  np.testing.assert_allclose(s[0], want[0, -1], rtol=1e-5, atol=1e-5)


def test_vocab_mismatch_is_a_clear_error():
  other = models.Qwen3Config(vocab_size=V + 1, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
  with pytest.raises(ValueError, match="vocab_size=61 differs from teacher vocab_size=62"):
    list(scoring.node_logit_chunks(_tree()[0], scoring.PromptedModel(STUDENT_CFG, S_PARAMS, QUESTION),
                                   scoring.PromptedModel(other, S_PARAMS, QUESTION)))


def test_attend_mask_hides_cache_slots():
  """qwen3's optional attend_mask: a chunk sees only the cache slots it allows."""
  rng = np.random.default_rng(5)
  ctx, a, b = (list(rng.integers(0, V, n)) for n in (5, 3, 2))
  cache = models.init_cache(STUDENT_CFG, 1, 16)
  _, cache = models.forward_cached(STUDENT_CFG, S_PARAMS, jnp.asarray([ctx + a], jnp.int32),
                                   jnp.arange(8)[None], jnp.ones((1, 8), bool), cache)
  attend = np.zeros((1, 2, 16), bool)
  attend[:, :, :5] = True  # the context, not branch a
  call = jax.jit(lambda params, cache: qwen3.bind(STUDENT_CFG, params)(
      jnp.asarray([b], jnp.int32), jnp.asarray([[5, 6]]), None, cache, None,
      attend_mask=jnp.asarray(attend)))
  got, _ = call(S_PARAMS, cache)
  want = np.asarray(models.forward(STUDENT_CFG, S_PARAMS, jnp.asarray([ctx + b], jnp.int32)))
  np.testing.assert_allclose(np.asarray(got[0]), want[0, 5:], rtol=1e-5, atol=1e-5)


def _log_softmax(z, mask):
  return scipy.special.log_softmax(np.where(mask, z, -np.inf), axis=-1)


def test_score_tree_minillm_matches_dense_direction():
  """MiniLLM finished from sparse parts equals minillm_direction with R̄ computed here by brute
  force (ℓ along every rollout from full forwards; targeted rollouts only below their branch)."""
  t, rollouts = _tree()
  branch = [None] * (len(rollouts) - 1) + [3]  # _tree's last rollout is targeted at depth 3
  temp = 0.7
  mask = np.ones(V, bool)  # padded rows: only ids no rollout sampled (a policy never samples them)
  mask[sorted(set(range(V)) - {y for r in rollouts for y in r})[:5]] = False
  assert mask.sum() == V - 5
  student = scoring.PromptedModel(STUDENT_CFG, S_PARAMS, QUESTION)
  teacher = scoring.PromptedModel(TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION)
  cols, _ = alignment.score_tree(t, student, teacher, chunk_nodes=8, vocab_mask=mask, topk=5,
                                 policy=temp, teacher_temperature=temp)
  ids = cols["node_id"]
  zs = _full_node_logits(STUDENT_CFG, S_PARAMS, QUESTION, t, rollouts, ids) / temp
  zt = _full_node_logits(TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION, t, rollouts, ids) / temp
  row = {int(i): j for j, i in enumerate(ids)}
  future = {}  # (node id, token) → future rewards of the on-policy rollouts through that edge
  for r, b in zip(rollouts, branch):
    nodes = [t.find(r[:d]) for d in range(len(r))]
    ell = [_log_softmax(zs[row[u]], mask)[y] - _log_softmax(zt[row[u]], mask)[y]
           for u, y in zip(nodes, r)]
    for d in range(len(r)):
      if b is None or d > b:
        rest = len(r) - d - 1
        future.setdefault((nodes[d], r[d]), []).append(-sum(ell[d + 1:]) / max(rest, 1))
  checked = 0
  for j, u in enumerate(ids):
    visits = t.visits(t.path(u))
    if not visits:
      continue
    w, rbar = np.zeros(V), np.zeros(V)
    for k, c in visits.items():
      w[k] = c / sum(visits.values())
      rbar[k] = np.mean(future[(u, k)])
    q, obs = np.zeros(V), np.zeros(V, bool)
    for k, (s, n) in t.outcomes(t.path(u)).items():
      q[k], obs[k] = s / n, True
    g = gradients.ideal_direction(zs[j], q, obs, mask)
    d = gradients.minillm_direction(zs[j], zt[j], w, rbar, mask)
    np.testing.assert_allclose(cols["align_minillm"][j], float(gradients.alignment(g, d)),
                               atol=2e-4, err_msg=str(t.path(u)))
    np.testing.assert_allclose(cols["norm_minillm"][j], float(np.linalg.norm(d)), rtol=1e-3)
    checked += cols["informative"][j]
  assert checked >= 3


def _ragged_rollouts(n, max_len, seed):
  """Rollouts of random lengths 1 … max_len, each branching off an earlier one."""
  rng = np.random.default_rng(seed)
  rollouts = [list(rng.integers(0, V, max_len))]
  for _ in range(n - 1):
    base = rollouts[rng.integers(len(rollouts))]
    cut = int(rng.integers(0, len(base)))
    rollouts.append(base[:cut] + list(rng.integers(0, V, int(rng.integers(1, max_len + 1)))))
  return rollouts


def _comb(length, seed):
  """A chain with a one-token side branch at every depth (every chunk straddles branches)."""
  rng = np.random.default_rng(seed)
  spine = list(rng.integers(0, V - 1, length))
  return [spine] + [spine[:d] + [V - 1] for d in range(length)]


TREES = {  # name → (rollouts, chunk_nodes)
    "deep_chain": ([list(np.random.default_rng(1).integers(0, V, 150))], 16),
    "wide_fan": ([[k, (3 * k) % V, 7] for k in range(V)], 8),
    "fan_of_chains": ([[5] + list(np.random.default_rng(k).integers(0, V, 40)) for k in range(12)],
                      32),
    "ragged_depths": (_ragged_rollouts(30, 60, seed=4), 16),
    "comb": (_comb(45, seed=2), 8),
}


@pytest.mark.parametrize("min_window", [64, 8, None],
                         ids=["window>=64", "window>=8", "whole stack"])
@pytest.mark.parametrize("name", list(TREES))
def test_tree_logits_equal_forward_of_each_path(name, min_window):
  """Every scored node's logits equal a plain forward of its path, whatever the tree's shape:
  each node sees exactly its ancestors (through the stack of ancestor slots) and nothing else,
  whichever window of the stack a chunk attends (``Shapes.min_window``)."""
  rollouts, chunk = TREES[name]
  t = tree.PrefixTree()
  for r in rollouts:
    t.add(r, 1)
  student = scoring.PromptedModel(STUDENT_CFG, S_PARAMS, QUESTION)
  teacher = scoring.PromptedModel(TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION)
  ids, s, te, stats = scoring.node_logits(t, student, teacher, chunk,
                                          scoring.Shapes(min_window=min_window))
  a = t.arrays()
  assert sorted(ids.tolist()) == np.flatnonzero((a.child_count > 0) | (np.arange(a.num_nodes) == 0)
                                                ).tolist()
  for cfg, params, prompt, got in [(STUDENT_CFG, S_PARAMS, QUESTION, s),
                                   (TEACHER_CFG, T_PARAMS, CONTEXT + QUESTION, te)]:
    np.testing.assert_allclose(got, _full_node_logits(cfg, params, prompt, t, rollouts, ids),
                               rtol=1e-5, atol=1e-5)


def _blocked(fn, logits, rows, block):
  """fn(*logits, rows) → outputs, run by ``scoring.row_blocks`` (every output per row)."""
  return scoring.row_blocks(lambda *a: (fn(*a), ()), logits, rows, block)[0]


@pytest.mark.parametrize("c,block", [(12, 4), (12, 1), (12, 5), (8, None)],
                         ids=["3 blocks", "a block a row", "not a multiple: one call", "default"])
def test_row_blocks_give_the_whole_chunk_outputs(c, block):
  """The final pass and the targeted candidates, run over blocks of a chunk's rows, equal one
  call on the whole chunk (the reference), including padding edges (rows ≥ C) and edges of
  rows in different blocks."""
  from gradalign_jax import sampling, targeted
  rng = np.random.default_rng(c)
  s, t = (jnp.asarray(rng.normal(0, 3, (c, V)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(np.arange(V) < V - 5)
  e = 2 * c
  rows = jnp.asarray(np.sort(rng.integers(0, c + 3, e)), jnp.int32)
  toks = jnp.asarray(rng.permutation(V - 5)[:e], jnp.int32)  # (row, token) pairs distinct
  visits = jnp.asarray(rng.random(e), jnp.float32)
  trials = jnp.asarray(rng.integers(0, 5, e), jnp.int32)
  policy = sampling.SamplingConfig(temperature=0.8, top_k=20)

  def terms(s_, t_, r):
    node, edge, finite = alignment._block_terms(s_, t_, 1.3, mask, r, toks, visits, 0.5, 3,
                                                policy)
    return (node, finite.T), edge

  def cands(kind):
    return lambda s_, t_, r: targeted._block_candidates(
        s_, t_, 1.3, mask, r, toks, visits, trials, 4, 0.0, 4, 0.5, kind, 6, policy)

  close = lambda w, g, atol=1e-7: np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                                                             rtol=1e-5, atol=atol)
  jax.tree.map(close, terms(s, t, rows), scoring.row_blocks(terms, (s, t), rows, block))
  for kind in ("ideal_error", "prob_gap"):
    want, got = cands(kind)(s, t, rows), _blocked(cands(kind), (s, t), rows, block)
    # ideal_error's priorities of unobserved tokens at a node whose observed children hold
    # nearly all of π (~1e-9 here) differ by ~1% between two compiled programs (a difference
    # of nearly equal terms): priorities are compared, and ranked, on the chunk's scale.
    val = np.asarray(want[0])
    scale = 1e-5 * np.abs(val).max()
    close(want[0], got[0], scale)
    gap = np.abs(np.diff(val, axis=1)) > scale
    separated = np.pad(gap, ((0, 0), (1, 0)), constant_values=True) & np.pad(
        gap, ((0, 0), (0, 1)), constant_values=True)
    assert separated.sum() >= 10  # not vacuous (ties: rows of no eligible or observed token)
    for w, g in zip(want[1:], got[1:]):
      np.testing.assert_array_equal(np.asarray(g)[separated], np.asarray(w)[separated])
