"""PrefixTree bookkeeping on hand-worked cases (MATH.md "Tree bookkeeping") and its array export."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradalign_jax import tree


def _two_rollouts():
  t = tree.PrefixTree()
  t.add([1, 2, 3], 1)
  t.add([1, 4], 0)
  return t


def test_ordinary_rollouts_count_everywhere():
  t = _two_rollouts()
  assert t.outcomes(()) == {1: (1, 2)}
  assert t.visits(()) == {1: 2}
  assert t.outcomes((1,)) == {2: (1, 1), 4: (0, 1)}
  assert t.visits((1,)) == {2: 1, 4: 1}
  assert t.outcomes((1, 2)) == {3: (1, 1)}
  assert t.outcomes((1, 2, 3)) == {} and t.outcomes((9,)) == {}
  assert t.num_nodes == 5  # (), 1, 12, 123, 14


# (rollout, reward, branch_depth) added after _two_rollouts → expected stats at every prefix.
TARGETED = {
    "forced_at_depth1": (
        [1, 5, 6], 1, 1,
        {(): ({1: (1, 2)}, {1: 2}),                               # ancestors: untouched
         (1,): ({2: (1, 1), 4: (0, 1), 5: (1, 1)}, {2: 1, 4: 1}),  # outcome of forced 5, no visit
         (1, 5): ({6: (1, 1)}, {6: 1})}),                         # on-policy below the fork
    "forced_at_root": (
        [7, 8], 0, 0,
        {(): ({1: (1, 2), 7: (0, 1)}, {1: 2}),
         (7,): ({8: (0, 1)}, {8: 1})}),
    "forced_existing_token": (
        [1, 2, 9], 1, 1,
        {(): ({1: (1, 2)}, {1: 2}),
         (1,): ({2: (2, 2), 4: (0, 1)}, {2: 1, 4: 1}),
         (1, 2): ({3: (1, 1), 9: (1, 1)}, {3: 1, 9: 1})}),
    "forced_last_token": (
        [1, 4, 4], 1, 2,
        {(): ({1: (1, 2)}, {1: 2}),
         (1,): ({2: (1, 1), 4: (0, 1)}, {2: 1, 4: 1}),
         (1, 4): ({4: (1, 1)}, {})}),
}


@pytest.mark.parametrize("name", list(TARGETED))
def test_targeted_rollout_counts_only_at_and_below_its_branch(name):
  tokens, reward, b, expected = TARGETED[name]
  t = _two_rollouts()
  t.add(tokens, reward, branch_depth=b)
  for prefix, (outcomes, visits) in expected.items():
    assert t.outcomes(prefix) == outcomes, prefix
    assert t.visits(prefix) == visits, prefix
  # The targeted count: the decision nodes at depths ≥ b of its path (independent of Q̂).
  a = t.arrays()
  reached = {t.find(tokens[:d]) for d in range(b, len(tokens))}
  assert {i for i in range(a.num_nodes) if a.targeted[i]} == reached
  assert set(a.targeted[list(reached)]) == {1}


def _snapshot(t):
  a = t.arrays()
  return {t.path(i): (t.outcomes(t.path(i)), t.visits(t.path(i))) for i in range(a.num_nodes)}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=8),
       st.lists(st.integers(0, 3), min_size=1, max_size=6), st.integers(0, 5), st.booleans())
def test_targeted_rollout_never_changes_an_ancestor(rollouts, forced, b, reward):
  t = tree.PrefixTree()
  for i, r in enumerate(rollouts):
    t.add(r, i % 2)
  b = min(b, len(forced) - 1)
  before = _snapshot(t)
  t.add(forced, int(reward), branch_depth=b)
  after = _snapshot(t)
  for prefix in before:
    if len(prefix) < b:  # a strict ancestor of the branch node u (or off the path)
      assert after[prefix] == before[prefix]
  u = tuple(forced[:b])
  # at u: the forced child's outcome grows by one trial, visits unchanged
  assert after[u][1] == before.get(u, ({}, {}))[1]
  s0, n0 = before.get(u, ({}, {}))[0].get(forced[b], (0, 0))
  assert after[u][0][forced[b]] == (s0 + int(reward), n0 + 1)


def test_arrays_structure_and_children_stats():
  t = _two_rollouts()
  t.add([1, 2, 5], 0)
  t.add([6], 1)
  a = t.arrays()
  assert a.num_nodes == t.num_nodes == 7
  for i in range(a.num_nodes):
    path = a.path(i)
    assert len(path) == a.depth[i] and t.find(path) == i and t.path(i) == path
    if i:
      assert a.parent[i] < i and a.path(a.parent[i]) == path[:-1] and a.token[i] == path[-1]
    kids = a.children[a.child_start[i]:a.child_start[i] + a.child_count[i]]
    assert sorted(a.token[kids].tolist()) == sorted(t.outcomes(path))
  # preorder / subtree intervals: v in subtree(u) iff path(u) is a prefix of path(v)
  pre = np.empty(a.num_nodes, int)
  pre[a.preorder] = np.arange(a.num_nodes)
  for u in range(a.num_nodes):
    for v in range(a.num_nodes):
      inside = pre[u] <= pre[v] < pre[u] + a.subtree_size[u]
      assert inside == (a.path(v)[:a.depth[u]] == a.path(u))
  root, n12 = 0, t.find((1, 2))
  assert a.num_observed[root] == 2 and a.min_trials[root] == 1 and a.informative[root]
  assert a.num_observed[t.find((1,))] == 2 and a.informative[t.find((1,))]  # 2: 1/2, 4: 0/1
  assert a.num_observed[n12] == 2 and a.informative[n12]  # 3 → 1, 5 → 0
  assert not a.informative[t.find((6,))]  # leaf
  q, obs, w = a.children_dense([root, -1, n12], vocab_size=8)
  np.testing.assert_array_equal(np.flatnonzero(obs[0]), [1, 6])
  np.testing.assert_allclose(q[0, [1, 6]], [1 / 3, 1.0])
  np.testing.assert_allclose(w[0, [1, 6]], [3 / 4, 1 / 4])
  assert not obs[1].any() and not w[1].any()
  np.testing.assert_allclose(q[2, [3, 5]], [1.0, 0.0])


def test_equal_q_is_not_informative():
  t = tree.PrefixTree()
  t.add([1, 2], 1)
  t.add([3, 2], 1)
  a = t.arrays()
  assert a.num_observed[0] == 2 and not a.informative[0]
  assert tree.coverage(a) == 0.0


@pytest.mark.parametrize("s,n,lo,hi", [(0, 10, 0.0, 0.27753), (5, 10, 0.23659, 0.76341),
                                       (10, 10, 0.72247, 1.0), (0, 0, 0.0, 1.0),
                                       (1, 1, 0.20654, 1.0)])
def test_wilson_interval(s, n, lo, hi):
  got = tree.wilson_interval([s], [n])
  np.testing.assert_allclose([got[0][0], got[1][0]], [lo, hi], atol=1e-5)


def test_nodes_are_the_unique_prefixes():
  """Shared prefixes are walked, never copied: N nodes = unique prefixes (brute force)."""
  rng = np.random.default_rng(0)
  trunk = list(rng.integers(0, 50, 300))
  rollouts = [trunk[:rng.integers(0, 300)] + list(rng.integers(0, 3, 40)) for _ in range(20)]
  t = tree.PrefixTree()
  for i, r in enumerate(rollouts):
    t.add(r, i % 2)
  unique = {tuple(r[:i]) for r in rollouts for i in range(len(r) + 1)}
  assert t.num_nodes == len(unique)
  a = t.arrays()
  assert a.subtree_size[0] == t.num_nodes and sorted(a.preorder) == list(range(t.num_nodes))


@pytest.mark.parametrize("args,msg", [(([1, 2], 2), "outside"), (([1, 2], 1, 2), "branch_depth"),
                                      (([], 1, 0), "branch_depth")])
def test_errors_name_the_problem(args, msg):
  with pytest.raises(ValueError, match=msg):
    tree.PrefixTree().add(*args)
