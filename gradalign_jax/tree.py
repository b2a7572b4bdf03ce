"""The prefix tree over one question's rollouts, with MATH.md's bookkeeping.

A node is a prefix of generated tokens (the prompt is not part of the tree; the root is the
empty prefix). Node ids are assigned in creation order, so a parent's id is always smaller
than its children's. The statistics of the edge ``u → u·k`` (child ``k`` of ``u``) live on
the child node:

  successes, trials   outcome counts (s_k, n_k): every rollout that is on-policy from u·k on
                      (ordinary rollouts, and targeted rollouts at and below their branch point);
  visits              on-policy visits: ordinary rollouts, and targeted ones strictly below
                      the forced token (never at the node where the token was forced).

A targeted rollout with ``branch_depth=b`` forced its token ``y_b`` at ``u = y_<b``: it adds
to the outcomes of edges at depths ≥ b, to the visits of edges at depths ≥ b+1, and to
nothing at depths < b (the ancestors of u did not sample it).

Storage is a trie: per node one dict of children plus a handful of scalars, so memory and
``add`` are linear in the tokens added (a shared prefix is walked, never copied).
``arrays()`` exports everything the scoring pass needs as flat numpy arrays.

Shape letters: see gradalign_jax/__init__.py (U nodes, E edges, C nodes of a chunk).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

WILSON_Z = 1.959963984540054  # two-sided 95%


def wilson_interval(successes, trials, z: float = WILSON_Z):
  """Wilson score interval for a binomial proportion; (0, 1) where trials == 0.

  successes, trials: array-like of the same shape. Returns (lo, hi) float64 arrays.
  """
  s = np.asarray(successes, np.float64)
  n = np.asarray(trials, np.float64)
  safe = np.maximum(n, 1.0)
  p = s / safe
  den = 1.0 + z * z / safe
  center = (p + z * z / (2 * safe)) / den
  half = z / den * np.sqrt(np.maximum(p * (1 - p) / safe + z * z / (4 * safe * safe), 0.0))
  lo = np.where(n > 0, np.clip(center - half, 0.0, 1.0), 0.0)
  hi = np.where(n > 0, np.clip(center + half, 0.0, 1.0), 1.0)
  return lo, hi


@dataclasses.dataclass(frozen=True)
class TreeArrays:
  """Flat arrays over the U nodes of a tree (index = node id; node 0 is the root).

  Structure:
    parent   int32[U]  parent id (-1 for the root)
    token    int32[U]  the token that leads from the parent (-1 for the root)
    depth    int32[U]  number of generated tokens in the prefix
    child_start, child_count int32[U]: children of node i are
             ``children[child_start[i] : child_start[i] + child_count[i]]`` (sorted by token)
    children int32[U-1] child ids grouped by parent
    preorder int32[U]  node ids in depth-first preorder (children by token); ``subtree_size``
             int32[U] nodes in the subtree of each node (itself included), so v is in u's
             subtree iff pre(u) <= pre(v) < pre(u) + subtree_size(u)
  Edge statistics (of the edge parent → node; 0 for the root):
    successes float64[U], trials int64[U], visits int64[U], wilson_lo/hi float64[U] (of Q̂)
  Per-node children statistics (over the node's children):
    num_observed int32[U]  |O| = children with trials > 0
    min_trials   int64[U]  min n_k over O (0 when O is empty)
    total_visits int64[U]  Σ_k visits of the children (the denominator of w)
    informative  bool[U]   |O| ≥ 2 and the Q̂_k over O are not all equal
    targeted     int64[U]  targeted rollouts that reached the node at or below their branch
             point (so they count in its children's outcomes)
  """
  parent: np.ndarray
  token: np.ndarray
  depth: np.ndarray
  child_start: np.ndarray
  child_count: np.ndarray
  children: np.ndarray
  preorder: np.ndarray
  subtree_size: np.ndarray
  successes: np.ndarray
  trials: np.ndarray
  visits: np.ndarray
  wilson_lo: np.ndarray
  wilson_hi: np.ndarray
  num_observed: np.ndarray
  min_trials: np.ndarray
  total_visits: np.ndarray
  informative: np.ndarray
  targeted: np.ndarray

  @property
  def num_nodes(self) -> int:
    return len(self.parent)

  @property
  def q_hat(self) -> np.ndarray:
    """float64[U] Q̂ of the edge into each node (NaN where trials == 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.where(self.trials > 0, self.successes / np.maximum(self.trials, 1), np.nan)

  def child_stats(self, node_ids):
    """Sparse children statistics of a chunk of nodes, one entry per child edge.

    node_ids: int[C] (entries < 0 are padding: no children). Returns (rows int[E] index into
    node_ids, child ids int32[E] (their tokens: ``token[child]``), q_hat float32[E] (0 where
    unobserved), observed bool[E], visit_freq float32[E] = visits / Σ visits over the node's
    children, 0 if none).
    """
    rows, kids = self.child_edges(node_ids)
    n = self.trials[kids]
    q = np.where(n > 0, self.successes[kids] / np.maximum(n, 1), 0.0).astype(np.float32)
    tot = self.total_visits[np.asarray(node_ids)[rows]]
    w = np.where(tot > 0, self.visits[kids] / np.maximum(tot, 1), 0.0).astype(np.float32)
    return rows, kids, q, n > 0, w

  def children_dense(self, node_ids, vocab_size: int):
    """``child_stats`` scattered to dense f32[C, V] q_hat, bool[C, V] observed, f32[C, V]
    visit_freq (for tests and small vocabularies; scoring scatters on device instead)."""
    c = len(node_ids)
    rows, kids, q_e, obs_e, w_e = self.child_stats(node_ids)
    toks = self.token[kids]
    q = np.zeros((c, vocab_size), np.float32)
    obs = np.zeros((c, vocab_size), bool)
    w = np.zeros((c, vocab_size), np.float32)
    q[rows, toks], obs[rows, toks], w[rows, toks] = q_e, obs_e, w_e
    return q, obs, w

  def child_edges(self, node_ids):
    """Every child of a chunk of nodes: (rows int[E] index into node_ids, child ids int[E]).

    node_ids: int[C], entries < 0 (padding) have no children.
    """
    node_ids = np.asarray(node_ids)
    real = node_ids >= 0
    ids = node_ids[real]
    counts = self.child_count[ids]
    rows = np.repeat(np.flatnonzero(real), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, self.children[np.repeat(self.child_start[ids], counts) + offsets]

  def path(self, node: int) -> tuple[int, ...]:
    """The generated tokens of a node's prefix (walks to the root: O(depth))."""
    out = []
    while node > 0:
      out.append(int(self.token[node]))
      node = int(self.parent[node])
    return tuple(reversed(out))


class PrefixTree:
  """Prefix tree of one question's rollouts (generated tokens only, prompt excluded).

      t = PrefixTree()
      t.add(tokens, reward, branch_depth=None)
      t.outcomes(prefix) -> {token: (successes, trials)}
      t.visits(prefix)   -> {token: count}
  """

  def __init__(self):
    self._children: list[dict[int, int]] = [{}]
    self._parent = [-1]
    self._token = [-1]
    self._depth = [0]
    self._succ = [0.0]
    self._trials = [0]
    self._visits = [0]
    self._targeted = [0]
    self.rollouts: list[tuple[int, float, int | None]] = []  # (leaf id, reward, branch_depth)

  @property
  def num_nodes(self) -> int:
    return len(self._parent)

  def _child(self, node: int, tok: int) -> int:
    kids = self._children[node]
    child = kids.get(tok)
    if child is None:
      child = len(self._parent)
      kids[tok] = child
      self._children.append({})
      self._parent.append(node)
      self._token.append(tok)
      self._depth.append(self._depth[node] + 1)
      self._succ.append(0.0)
      self._trials.append(0)
      self._visits.append(0)
      self._targeted.append(0)
    return child

  def add(self, tokens: Sequence[int], reward: float, branch_depth: int | None = None) -> int:
    """Adds one rollout; returns the id of its last node.

    tokens: the generated ids (prompt excluded, EOS included when it ended the rollout).
    reward: 0 or 1 (any value in [0, 1] is summed as is).
    branch_depth: None for an ordinary on-policy rollout; b when token ``tokens[b]`` was
    forced at the node ``tokens[:b]`` and the rest sampled on-policy (MATH.md). Nodes of
    ``tokens[:b]`` that no rollout created yet are created with zero counts on their edges.
    """
    tokens = [int(t) for t in tokens]
    reward = float(reward)
    if not 0.0 <= reward <= 1.0:
      raise ValueError(f"reward {reward} is outside [0, 1]; the verifier must return 0 or 1")
    b = -1 if branch_depth is None else int(branch_depth)
    if branch_depth is not None and not 0 <= b < len(tokens):
      raise ValueError(f"branch_depth={branch_depth} is not a position of the {len(tokens)} "
                       "generated tokens (the forced token must be one of them)")
    node = 0
    for t, tok in enumerate(tokens):
      if branch_depth is not None and t >= b:
        self._targeted[node] += 1  # the decision node at depth t
      node = self._child(node, tok)
      if t >= b:  # ordinary rollouts: b = -1, every edge
        self._succ[node] += reward
        self._trials[node] += 1
      if t > b:
        self._visits[node] += 1
    self.rollouts.append((node, reward, branch_depth))
    return node

  def prefix_nodes(self, tokens: Sequence[int]) -> list[int]:
    """Node ids of ``tokens[:0]``, ``tokens[:1]``, … as far as some rollout passed them
    (one walk down the tree: O(len(tokens)))."""
    out = [0]
    for tok in tokens:
      node = self._children[out[-1]].get(int(tok))
      if node is None:
        break
      out.append(node)
    return out

  def find(self, prefix: Sequence[int]) -> int | None:
    """The node id of ``prefix`` (tuple of generated ids), or None if no rollout passed it."""
    nodes = self.prefix_nodes(prefix)
    return nodes[-1] if len(nodes) == len(prefix) + 1 else None

  def outcomes(self, prefix: Sequence[int]) -> dict[int, tuple[float, int]]:
    """{token: (successes, trials)} over the children of ``prefix`` with trials > 0."""
    node = self.find(prefix)
    if node is None:
      return {}
    return {tok: (self._succ[c], self._trials[c]) for tok, c in self._children[node].items()
            if self._trials[c] > 0}

  def visits(self, prefix: Sequence[int]) -> dict[int, int]:
    """{token: on-policy visit count} over the children of ``prefix`` with visits > 0."""
    node = self.find(prefix)
    if node is None:
      return {}
    return {tok: self._visits[c] for tok, c in self._children[node].items() if self._visits[c]}

  def arrays(self) -> TreeArrays:
    """Exports the tree as flat arrays (see TreeArrays). O(U log max_children)."""
    n = self.num_nodes
    parent = np.asarray(self._parent, np.int32)
    token = np.asarray(self._token, np.int32)
    succ = np.asarray(self._succ, np.float64)
    trials = np.asarray(self._trials, np.int64)
    visits = np.asarray(self._visits, np.int64)
    child_count = np.fromiter((len(c) for c in self._children), np.int32, n)
    child_start = np.zeros(n, np.int32)
    np.cumsum(child_count[:-1], out=child_start[1:])
    children = np.fromiter((c for kids in self._children for _, c in sorted(kids.items())),
                           np.int32, n - 1)
    # Children statistics by parent (np.add.at / minimum.at: one pass over the edges).
    edges = np.arange(1, n)
    par = parent[1:]
    observed = trials[1:] > 0
    num_observed = np.zeros(n, np.int32)
    np.add.at(num_observed, par, observed)
    total_visits = np.zeros(n, np.int64)
    np.add.at(total_visits, par, visits[1:])
    big = np.iinfo(np.int64).max
    min_trials = np.full(n, big, np.int64)
    np.minimum.at(min_trials, par[observed], trials[1:][observed])
    min_trials[min_trials == big] = 0
    q = np.where(trials > 0, succ / np.maximum(trials, 1), np.nan)
    q_max = np.full(n, -np.inf)
    q_min = np.full(n, np.inf)
    np.maximum.at(q_max, par[observed], q[edges][observed])
    np.minimum.at(q_min, par[observed], q[edges][observed])
    informative = (num_observed >= 2) & (q_max > q_min)
    # Preorder with an explicit stack (recursion depth would be the rollout length).
    preorder = np.empty(n, np.int32)
    stack, i = [0], 0
    while stack:
      node = stack.pop()
      preorder[i] = node
      i += 1
      s, c = child_start[node], child_count[node]
      stack.extend(children[s:s + c][::-1].tolist())
    subtree = np.ones(n, np.int32)
    for node in preorder[::-1][:-1]:  # children before parents
      subtree[parent[node]] += subtree[node]
    lo, hi = wilson_interval(succ, trials)
    return TreeArrays(parent=parent, token=token, depth=np.asarray(self._depth, np.int32),
                      child_start=child_start, child_count=child_count, children=children,
                      preorder=preorder, subtree_size=subtree, successes=succ, trials=trials,
                      visits=visits, wilson_lo=lo, wilson_hi=hi, num_observed=num_observed,
                      min_trials=min_trials, total_visits=total_visits, informative=informative,
                      targeted=np.asarray(self._targeted, np.int64))

  def path(self, node: int) -> tuple[int, ...]:
    """The generated tokens of a node's prefix (walks to the root: O(depth))."""
    out = []
    while node > 0:
      out.append(self._token[node])
      node = self._parent[node]
    return tuple(reversed(out))


def coverage(arrays: TreeArrays) -> float:
  """Informative nodes / nodes that have at least one child (MATH.md's coverage)."""
  internal = arrays.child_count > 0
  return float(arrays.informative.sum() / max(int(internal.sum()), 1))


__all__ = ["PrefixTree", "TreeArrays", "coverage", "wilson_interval", "WILSON_Z"]
