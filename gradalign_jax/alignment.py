"""The final pass (MATH.md "Alignment"): ĝ*, every distillation direction, their cosines and
the covariates at every scored node of a tree, and the leave-one-out scores of each rollout.

Shape letters (gradalign_jax/__init__.py): U tree nodes, C nodes per chunk, E child edges of a
chunk, V vocab.

Two halves:
  * on device, chunk by chunk (``scoring.padded_chunks``): every direction of the registry
    ``gradients.DIRECTIONS`` over the vocabulary, reduced at once to what the rest needs —
    its norm per node and its entries at the node's children (the only places ĝ* is
    nonzero), the covariates, the student's logits at the children and its log-normaliser.
    Nothing of size U × V is kept.
  * on the host, in float64 over each node's observed children: ĝ* in MATH.md's stable form
    (around the mode of π over O), its norm and its dot with every direction. So the same
    few lines serve the full tree (``TreeTerms.node_columns``) and, with one edge's (s, n)
    changed, the leave-one-out score of every node on a rollout's path
    (``TreeTerms.leave_one_out``): a closed-form update, not a re-scoring.
MiniLLM's long-term term needs R̄ (the teacher along every rollout's future), known only once
every node is scored; its entries at the children and its norm are finished on the host from
sums the device keeps (over the unvisited vocabulary, where the term is −p H).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse

from gradalign_jax import gradients, proxies, sampling
from gradalign_jax.scoring import PromptedModel, ScoringStats, Shapes, padded_chunks, row_blocks
from gradalign_jax.tree import PrefixTree, TreeArrays

_ON_DEVICE = [name for name, d in gradients.DIRECTIONS.items() if d.at_node is not None]
TOP_TOKENS = 5  # k of the per-node top-k of π and q kept for the token explorer


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """What the final pass computes and how it chunks.

  directions: the directions to report (names of ``gradients.DIRECTIONS``); the first is the
    headline of the report. Every direction is computed; this selects the table columns.
  chunk_nodes: C, nodes per chunk (memory: C × V logits per model).
  jsd_beta: β of the JSD direction, in [0, 1]. topk: k of the top-k reverse-KL directions.
  teacher_temperature: T_τ, the teacher's q = softmax(z_τ / T_τ) (MATH.md). Default 1.0: the
    teacher model as it is; the student's sampling temperature never touches the teacher.
  permutations: relabellings of each question's on-policy rewards whose leave-one-out
    scores are recomputed (``TreeTerms.relabelled_means``) for the within-question
    permutation test and its null mean (0: no test). Cost: host float64 work ∝ this × the
    children of every node on the question's paths.
  """
  directions: tuple[str, ...] = tuple(gradients.DIRECTIONS)
  chunk_nodes: int = 256
  jsd_beta: float = 0.5
  topk: int = 20
  permutations: int = 500
  teacher_temperature: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "directions", tuple(self.directions))
    bad = [d for d in self.directions if d not in gradients.DIRECTIONS]
    if bad or not self.directions:
      raise ValueError(f"unknown directions {bad}; choose from {list(gradients.DIRECTIONS)}")
    if self.chunk_nodes < 1 or self.topk < 1 or self.permutations < 0:
      raise ValueError(f"need chunk_nodes ≥ 1, topk ≥ 1 and permutations ≥ 0 (got "
                       f"{self.chunk_nodes}, {self.topk}, {self.permutations})")
    if not self.teacher_temperature > 0:
      raise ValueError(f"teacher_temperature={self.teacher_temperature} must be > 0")
    if not 0.0 <= self.jsd_beta <= 1.0:
      raise ValueError(f"jsd_beta={self.jsd_beta} must be in [0, 1]")


class NonFiniteError(ValueError):
  """NaN or Inf where the diagnostic needs numbers (logits, directions): results would be
  garbage, so the group is not written."""


@functools.partial(jax.jit, static_argnames=("topk", "policy"))
def _chunk_terms(student_logits, teacher_logits, teacher_temperature, vocab_mask, rows, toks,
                 visit_edge, jsd_beta, topk, policy):
  """One chunk of the device half (``_block_terms``, ``scoring.row_blocks`` of its rows)."""
  def block(s, t, local_rows):
    node, edge, finite = _block_terms(s, t, teacher_temperature, vocab_mask, local_rows, toks,
                                      visit_edge, jsd_beta, topk, policy)
    return (node, finite.T), edge
  (node, finite), edge = row_blocks(block, (student_logits, teacher_logits), rows)
  return node, edge, finite.T


def _block_terms(student_logits, teacher_logits, teacher_temperature, vocab_mask, rows, toks,
                 visit_edge, jsd_beta, topk, policy):
  """One chunk (or block of a chunk's rows) of the device half.

  student_logits, teacher_logits: f32[C, V] raw; the student's become its sampling policy's
  ``sampling.policy_logits`` (``policy``: temperature, top-p, top-k; π exactly 0 off the
  support S_u), the teacher's are divided by ``teacher_temperature`` (never truncated);
  vocab_mask: bool[V]; rows, toks: int32[E]
  child edges (rows ≥ C are padding, dropped); visit_edge: f32[E] visit frequencies w.
  Returns (node, edge, finite): {name: f32[C]} per node: the covariates, ``norm_<d>``,
  ``lse`` (log Σ exp z/T over the vocabulary), the MiniLLM sums ``unvisited_dd``,
  ``unvisited_dp``, ``unvisited_pp``
  (Σ d_rkl², Σ d_rkl p, Σ p² over the unvisited vocabulary), ``off_mode`` (1 − p at the
  mode, summed over the other rows), ``mode`` (int32, argmax p), and [C, TOP_TOKENS]
  ``top_p``/``top_q`` with their token ids ``top_p_tokens``/``top_q_tokens`` (int32; the
  largest p and q, descending); {name: f32[E]} per edge:
  ``z`` (log π, −1e30 off the support), ``p``, ``ell`` (ℓ = log p − log q), ``logq`` (log q
  of the child's token), ``d_<d>``, ``support`` (1 where the child's token is in S_u, else 0)
  and ``proxy_<name>`` (every ``proxies.PROXIES`` at the child's token);
  ``finite``: bool[3, C], whether the student's logits, the teacher's logits and every
  direction's norm are finite at each node.
  """
  c, v = student_logits.shape
  zs = sampling.policy_logits(student_logits, policy, vocab_mask)
  zt = teacher_logits / teacher_temperature
  mask = jnp.broadcast_to(vocab_mask, (c, v))
  w = jnp.zeros((c, v), jnp.float32).at[rows, toks].set(visit_edge, mode="drop")
  at = lambda x: x[jnp.minimum(rows, c - 1), toks]
  node = dict(gradients.node_covariates(zs, zt, vocab_mask))
  edge = {}
  for name in _ON_DEVICE:
    d = gradients.DIRECTIONS[name].at_node(zs, zt, w, vocab_mask, jsd_beta, topk)
    node[f"norm_{name}"] = jnp.linalg.norm(d, axis=-1)
    edge[f"d_{name}"] = at(d)
    if name == "reverse_kl":
      d_rkl = d
  logp = gradients.masked_log_softmax(zs, vocab_mask)
  logq = gradients.masked_log_softmax(zt, vocab_mask)
  p = gradients.masked_softmax(zs, vocab_mask)
  mode = gradients.mode_index(p)[:, 0]
  unvisited = mask & (w <= 0)
  node.update(
      lse=jax.nn.logsumexp(jnp.where(mask, zs, gradients.MASKED_LOGIT), axis=-1),
      unvisited_dd=jnp.sum(jnp.where(unvisited, d_rkl * d_rkl, 0.0), -1),
      unvisited_dp=jnp.sum(jnp.where(unvisited, d_rkl * p, 0.0), -1),
      unvisited_pp=jnp.sum(jnp.where(unvisited, p * p, 0.0), -1),
      off_mode=jnp.sum(jnp.where(jnp.arange(v) == mode[:, None], 0.0, p), -1),
      mode=mode.astype(jnp.int32))
  edge.update(z=at(zs), p=at(p), ell=at(logp) - at(logq), logq=at(logq),
              support=sampling.in_support(at(zs)).astype(jnp.float32))
  # Position-level proxies are node covariates; token-level ones read log p(t), log q(t).
  at_row = lambda x: x[jnp.minimum(rows, c - 1)]
  edge.update({f"proxy_{name}": x for name, x in proxies.from_terms(
      {k: at_row(node[k]) for k in gradients.COVARIATES}, at(logp), at(logq)).items()})
  k = min(TOP_TOKENS, v)
  for name, probs in (("p", p), ("q", gradients.masked_softmax(zt, vocab_mask))):
    node[f"top_{name}"], ids = jax.lax.top_k(probs, k)
    node[f"top_{name}_tokens"] = ids.astype(jnp.int32)
  norms = jnp.stack([node[f"norm_{name}"] for name in _ON_DEVICE])
  finite = jnp.stack([jnp.all(jnp.isfinite(student_logits), -1), jnp.all(jnp.isfinite(zt), -1),
                      jnp.all(jnp.isfinite(norms), 0)])
  return node, edge, finite


def rollout_paths(tree: PrefixTree, arrays: TreeArrays) -> list[np.ndarray]:
  """For each rollout of the tree (``tree.rollouts`` order), its path's child nodes:
  int64[L] with entry t the node reached by token y_t (so entry t's parent is the decision
  node at depth t). O(total tokens)."""
  out = []
  for leaf, _, _ in tree.rollouts:
    path = []
    node = leaf
    while node > 0:
      path.append(node)
      node = arrays.parent[node]
    out.append(np.asarray(path[::-1], np.int64))
  return out


def _future_rewards(tree: PrefixTree, arrays: TreeArrays, paths, ell: np.ndarray) -> np.ndarray:
  """R̄ per edge (float64[U], indexed by child id): mean over the rollouts that visit the edge
  on-policy of Σ_{t'>t} (−ℓ_{y_t'}) / (L − t − 1) (0 for a rollout's last token). ell:
  float64[U], ℓ of the edge into each node. O(total tokens)."""
  total = np.zeros(arrays.num_nodes)
  for path, (_, _, branch_depth) in zip(paths, tree.rollouts):
    n = len(path)  # path[t] = the child at depth t + 1 (token y_t)
    if not n:
      continue
    neg = -ell[path]
    after = np.concatenate([np.cumsum(neg[::-1])[::-1][1:], [0.0]])  # Σ_{t' > t}
    future = after / np.maximum(n - np.arange(n) - 1, 1)
    b = -1 if branch_depth is None else branch_depth
    total[path[b + 1:]] += future[b + 1:]  # on-policy edges only, as visits
  return np.where(arrays.visits > 0, total / np.maximum(arrays.visits, 1), 0.0)


def _segment_max(values, groups, num_groups):
  out = np.full(num_groups, -np.inf)
  np.maximum.at(out, groups, values)
  return out


def ideal_scores(groups: np.ndarray, num_groups: int, z: np.ndarray, log_norm: np.ndarray,
                 successes: np.ndarray, trials: np.ndarray,
                 directions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ĝ* and its dot with each direction, per group of child edges, in float64.

  A group is one decision node's children (with its own counts: the full tree, or the tree
  less one rollout). Per edge (all [N]): groups (int, the group), z (the student's logit / T
  of the child's token), log_norm (that node's log Σ exp z/T, so π = exp(z − log_norm)),
  successes, trials (s, n of the edge; [N] or [N, P] for P relabellings at once),
  directions {name: d at the child's token}. Over the observed edges O (n > 0): π̃ = π
  renormalised on O, m the mode of π̃,
  Q̂_k − V̂ = (Q̂_k − Q̂_m) − Σ_{i∈O} π̃_i (Q̂_i − Q̂_m)  (MATH.md's stable form),
  ĝ*_k = π_k (Q̂_k − V̂). Returns per group ([num_groups] or [num_groups, P]):
  ``norm_ideal``, ``dot_<name>``, ``v_hat``, ``num_observed`` and ``informative`` (|O| ≥ 2,
  Q̂ over O not all equal).
  """
  g_ = np.asarray(groups, np.int64)
  n = np.asarray(trials, np.float64)
  extra = n.shape[1:]
  col = (slice(None),) + (None,) * len(extra)  # a per-edge [N] array against [N, P]
  # Group sums as one sparse product: works for [N] and [N, P] alike.
  sum_of = sparse.csr_matrix((np.ones(len(g_)), (g_, np.arange(len(g_)))),
                             shape=(num_groups, len(g_)))
  total = lambda x: np.asarray(sum_of @ x)
  obs = n > 0
  q = np.where(obs, np.asarray(successes, np.float64) / np.maximum(n, 1), 0.0)
  z = np.asarray(z, np.float64)
  # Which edges are observed depends on the trials only, the same in every relabelling.
  obs0 = obs if not extra else obs.reshape(len(g_), -1)[:, 0]
  zo = np.where(obs0, z, -np.inf)
  zmax = _segment_max(zo, g_, num_groups)
  has = np.isfinite(zmax)
  weight = np.where(obs0, np.exp(zo - np.where(has, zmax, 0.0)[g_]), 0.0)
  pi_o = weight / np.maximum(total(weight), 1e-300)[g_]
  # The mode: the first observed edge of the group at its largest logit.
  first = np.full(num_groups, len(g_))
  at_max = obs0 & (zo == zmax[g_])
  np.minimum.at(first, g_[at_max], np.arange(len(g_))[at_max])
  q_mode = q[np.minimum(first, max(len(g_) - 1, 0))] if len(g_) else np.zeros((0,) + extra)
  diff = np.where(obs, q - q_mode[g_], 0.0)
  shift = total(pi_o[col] * diff)
  pi = np.exp(z - np.asarray(log_norm, np.float64))
  g = np.where(obs, pi[col] * (diff - shift[g_]), 0.0)
  out = {"norm_ideal": np.sqrt(total(g * g)),
         "v_hat": np.where(has[col], q_mode + shift, np.nan),
         "num_observed": total(obs.astype(np.float64)).astype(np.int64)}
  for name, d in directions.items():
    out[f"dot_{name}"] = total(g * np.asarray(d, np.float64)[col])
  differs = total((obs & (q != q_mode[g_])).astype(np.float64))
  out["informative"] = (out["num_observed"] >= 2) & (differs > 0)
  return out


def cosine(dot, norm_a, norm_b):
  """dot / (‖a‖‖b‖); 0 where a norm is 0, NaN where anything is not finite."""
  den = np.asarray(norm_a, np.float64) * np.asarray(norm_b, np.float64)
  ok = den > 0
  out = np.where(ok, np.asarray(dot, np.float64) / np.where(ok, den, 1.0), 0.0)
  return np.where(np.isfinite(dot) & np.isfinite(den), out, np.nan)


@dataclasses.dataclass
class TreeTerms:
  """What the device half leaves of one (student, teacher) pass over a tree.

  arrays: the tree's TreeArrays; scored: int[U'] the scored nodes (root and nodes with a
  child) in the pass's order; node: {name: float[U]} per node (indexed by node id; rows of
  unscored nodes are 0): the covariates, ``norm_<d>`` for every direction, ``lse``, and
  [U, TOP_TOKENS] ``top_p``, ``top_q``, ``top_p_tokens``, ``top_q_tokens``;
  edge: {name: float[U]} per edge, indexed by child id: ``z``, ``p``, ``ell``, ``logq``,
  ``d_<d>``, ``proxy_<name>``.
  """
  arrays: TreeArrays
  scored: np.ndarray
  node: dict[str, np.ndarray]
  edge: dict[str, np.ndarray]

  def _in_support(self, kids, trials):
    """trials with the children outside the sampling support zeroed: O ⊆ S_u (MATH.md), even
    where a rollout forced such a token."""
    ok = self.edge["support"][kids] > 0
    trials = np.asarray(trials)
    return np.where(ok.reshape((-1,) + (1,) * (trials.ndim - 1)), trials, 0)

  def _scores(self, nodes, groups, kids, successes, trials, directions=gradients.DIRECTIONS):
    """ideal_scores over the children of ``nodes`` and each direction's cosine; successes,
    trials: [E] or [E, P] (P relabellings)."""
    d = {name: self.edge[f"d_{name}"][kids] for name in directions}
    out = ideal_scores(groups, len(nodes), self.edge["z"][kids], self.node["lse"][nodes][groups],
                       successes, self._in_support(kids, trials), d)
    extra = (None,) * (np.ndim(successes) - 1)
    for name in directions:
      norm = self.node[f"norm_{name}"][nodes][(slice(None),) + extra]
      out[f"align_{name}"] = cosine(out[f"dot_{name}"], out["norm_ideal"], norm)
    return out

  def node_columns(self) -> dict[str, np.ndarray]:
    """Per scored node (the full tree's estimate): the covariates, ``norm_ideal``,
    ``align_/dot_/norm_<d>`` of every direction, ``node_id``, ``depth``, ``informative``,
    ``num_observed``, ``min_trials``, ``v_hat`` (the V̂ of ĝ*), ``targeted`` (targeted
    rollouts that reached the node), ``proxy_<name>`` of every ``proxies.PROXIES``
    (``proxies.node_proxies``: its mean over the node's on-policy rollout tokens), and
    [U', TOP_TOKENS] ``top_p``, ``top_q``, ``top_p_tokens``, ``top_q_tokens``."""
    a, ids = self.arrays, self.scored
    groups, kids = self.arrays.child_edges(ids)
    s = self._scores(ids, groups, kids, a.successes[kids], a.trials[kids])
    cols = {c: self.node[c][ids] for c in gradients.COVARIATES}
    cols["norm_ideal"] = s["norm_ideal"]
    for name in gradients.DIRECTIONS:
      cols[f"align_{name}"] = s[f"align_{name}"]
      cols[f"dot_{name}"] = s[f"dot_{name}"]
      cols[f"norm_{name}"] = self.node[f"norm_{name}"][ids]
    # O is the observed children in the support: informative and |O| from those counts.
    trials = self._in_support(kids, a.trials[kids])
    low = np.full(len(ids), np.iinfo(np.int64).max)
    np.minimum.at(low, groups[trials > 0], trials[trials > 0])
    cols.update(node_id=ids, depth=a.depth[ids], informative=s["informative"],
                num_observed=s["num_observed"],
                min_trials=np.where(s["num_observed"] > 0, low, 0), v_hat=s["v_hat"],
                targeted=a.targeted[ids])
    cols.update({c: self.node[c][ids] for c in ("top_p", "top_q", "top_p_tokens",
                                                 "top_q_tokens")})
    cols.update(proxies.node_proxies({n: self.edge[f"proxy_{n}"][kids] for n in proxies.PROXIES},
                                     a.visits[kids], groups, len(ids)))
    return cols

  def leave_one_out(self, path: np.ndarray, reward: float) -> dict[str, np.ndarray]:
    """The scores at each decision node of one rollout's path with that rollout left out of
    the counts (MATH.md): at depth t the edge ``path[t]`` loses (R, 1) from (s, n), the
    node's informative flag is re-decided on those counts. path: ``rollout_paths``' entry
    (int[L]); reward: the rollout's R. Returns per depth t (float64[L] / bool[L]):
    ``norm_ideal``, ``informative``, ``align_/dot_<d>`` of every direction."""
    a = self.arrays
    nodes = a.parent[path]
    groups, kids = self.arrays.child_edges(nodes)
    mine = kids == path[groups]
    successes = a.successes[kids] - np.where(mine, reward, 0.0)
    trials = a.trials[kids] - mine
    return self._scores(nodes, groups, kids, successes, trials)


  def relabelled_means(self, paths: Sequence[np.ndarray], rewards: np.ndarray,
                       labels: np.ndarray, directions: Sequence[str]) -> dict[str, np.ndarray]:
    """Each on-policy rollout's leave-one-out mean cosine when its question's on-policy
    rewards are replaced by each row of ``labels``: the scores are functions of every
    rollout's reward (through the shared counts), so a permutation test must recompute them.

    paths: ``rollout_paths`` of the G on-policy rollouts; rewards: their rewards float[G]
    (targeted rollouts keep theirs); labels: float[P, G] relabellings (row p is rollout r's
    reward under relabelling p). Returns {direction: float64[P, G]} (NaN where a rollout has
    no informative node under that relabelling). Vectorised over P; memory ~ P × (the children
    of every node on the paths).
    """
    a = self.arrays
    g = len(paths)
    labels = np.asarray(labels, np.float64).reshape(-1, g)
    lengths = np.asarray([len(p) for p in paths])
    path_edges = np.concatenate(paths)
    owner = np.repeat(np.arange(g), lengths)
    nodes = a.parent[path_edges]
    groups, kids = self.arrays.child_edges(nodes)
    # Each edge's successes as a function of the labels: the targeted rollouts' part is fixed;
    # an on-policy rollout adds its label to every edge of its path.
    incidence = np.zeros((a.num_nodes, g))
    np.add.at(incidence, (path_edges, owner), 1.0)
    fixed = a.successes - incidence @ np.asarray(rewards, np.float64)
    own = (kids == path_edges[groups]).astype(np.float64)
    succ = (fixed[kids][:, None] + incidence[kids] @ labels.T
            - own[:, None] * labels.T[owner[groups]])
    trials = np.broadcast_to((a.trials[kids] - own)[:, None], succ.shape)
    s = self._scores(nodes, groups, kids, succ, trials, directions)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    info = s["informative"].astype(np.float64)
    count = np.add.reduceat(info, starts, axis=0)
    out = {}
    for name in directions:
      total = np.add.reduceat(np.where(info > 0, s[f"align_{name}"], 0.0), starts, axis=0)
      out[name] = np.where(count > 0, total / np.maximum(count, 1), np.nan).T
    return out


def tree_terms(tree: PrefixTree, student: PromptedModel, teacher: PromptedModel,
               chunk_nodes: int = 256, vocab_mask=None, jsd_beta: float = 0.5, topk: int = 20,
               policy: sampling.SamplingConfig | float = 1.0, shapes: Shapes = Shapes(),
               teacher_temperature: float = 1.0, arrays: TreeArrays | None = None,
               paths: Sequence[np.ndarray] | None = None) -> tuple[TreeTerms, ScoringStats]:
  """The device half of the final pass over every scored node of ``tree``, and MiniLLM
  finished from it. The student's π is its sampling policy (``policy``: the rollouts'
  SamplingConfig, or a bare temperature; with top-p/top-k the truncated, renormalised
  distribution, MATH.md); the teacher's q = softmax(z_τ / ``teacher_temperature``).
  arrays, paths: the tree's ``arrays()`` and ``rollout_paths`` when the caller has them (one
  tree scored against several teachers computes them once)."""
  arrays = tree.arrays() if arrays is None else arrays
  paths = rollout_paths(tree, arrays) if paths is None else paths
  v = student.cfg.vocab_size
  mask = jnp.ones(v, bool) if vocab_mask is None else jnp.asarray(vocab_mask, bool)
  u = arrays.num_nodes
  node: dict[str, np.ndarray] = {}
  edge: dict[str, np.ndarray] = {}
  stats: list = []
  scored = []

  def gather(ids, keep, kids, n_out, e_out, finite):
    """Brings one chunk's results to the host (waits for its final pass)."""
    bad = ~np.asarray(finite)[:, keep]
    if bad.any():
      what = [w for w, b in zip(("student logits", "teacher logits", "directions"),
                                bad.any(axis=1)) if b]
      raise NonFiniteError(f"non-finite {' and '.join(what)} at tree node(s) "
                           f"{ids[bad.any(axis=0)][:5].tolist()}")
    scored.append(ids)
    for k, x in n_out.items():
      x = np.asarray(x)
      node.setdefault(k, np.zeros((u,) + x.shape[1:], x.dtype))[ids] = x[keep]
    for k, x in e_out.items():
      edge.setdefault(k, np.zeros(u, np.float32))[kids] = np.asarray(x)[:len(kids)]

  # One chunk in flight: chunk i's results are read while chunk i + 1's logits and final
  # pass run (dispatch is asynchronous), so the device does not wait on the host's
  # bookkeeping between chunks.
  pending = None
  for chunk in padded_chunks(arrays, student, teacher, chunk_nodes, stats, shapes):
    rows, kids, _, _, w_e = arrays.child_stats(chunk.node_ids)
    out = _chunk_terms(
        chunk.student, chunk.teacher, teacher_temperature, mask,
        chunk.pad_edges(rows.astype(np.int32), chunk_nodes),
        chunk.pad_edges(arrays.token[kids], 0), chunk.pad_edges(w_e, 0), jsd_beta, topk=topk,
        policy=sampling.as_policy(policy))
    keep = chunk.node_ids >= 0
    if pending is not None:
      gather(*pending)
    pending = (chunk.node_ids[keep], keep, kids) + tuple(out)
  if pending is not None:
    gather(*pending)
  _finish_minillm(tree, arrays, paths, node, edge)
  return TreeTerms(arrays, np.concatenate(scored), node, edge), stats[0]


def _finish_minillm(tree, arrays, paths, node, edge) -> None:
  """MiniLLM's entries at the children (``d_minillm``) and norm (``norm_minillm``), float64.

  d_minillm = d_rkl + h − p H with h_k = w_k R̄_k on visited children and H = Σ_k h_k.
  Off the visited children it is d_rkl − p H, whose squared norm is Σ d² − 2H Σ d p + H² Σ p²
  over the unvisited vocabulary (the device's sums); at the mode m of p the term
  h_m − p_m H is taken as h_m (1 − p_m) − p_m (H − h_m), 1 − p_m summed over the other rows.
  """
  kids = np.arange(1, arrays.num_nodes)
  par = arrays.parent[kids]
  tot = arrays.total_visits[par]
  w = np.where(tot > 0, arrays.visits[kids] / np.maximum(tot, 1), 0.0)
  ell = edge["ell"].astype(np.float64)
  h = w * _future_rewards(tree, arrays, paths, ell)[kids]
  big_h = np.bincount(par, weights=h, minlength=arrays.num_nodes)
  p = edge["p"][kids].astype(np.float64)
  is_mode = arrays.token[kids] == node["mode"][par]
  long_term = np.where(is_mode, h * node["off_mode"][par] - p * (big_h[par] - h),
                       h - p * big_h[par])
  d = edge["d_reverse_kl"][kids].astype(np.float64) + long_term
  edge["d_minillm"] = np.zeros(arrays.num_nodes)
  edge["d_minillm"][kids] = d
  f = lambda name: node[name].astype(np.float64)
  visited_sq = np.bincount(par, weights=np.where(w > 0, d * d, 0.0), minlength=arrays.num_nodes)
  sq = (f("unvisited_dd") - 2 * big_h * f("unvisited_dp") + big_h ** 2 * f("unvisited_pp")
        + visited_sq)
  node["norm_minillm"] = np.sqrt(np.maximum(sq, 0.0))


def score_tree(tree: PrefixTree, student: PromptedModel, teacher: PromptedModel,
               chunk_nodes: int = 256, vocab_mask=None, jsd_beta: float = 0.5, topk: int = 20,
               policy: sampling.SamplingConfig | float = 1.0, shapes: Shapes = Shapes(),
               teacher_temperature: float = 1.0
               ) -> tuple[dict[str, np.ndarray], ScoringStats]:
  """Per scored node, every direction's alignment with ĝ* (full-tree estimate) and the
  covariates: ``tree_terms(...)`` then ``TreeTerms.node_columns()``. Returns (columns, stats)."""
  terms, stats = tree_terms(tree, student, teacher, chunk_nodes, vocab_mask, jsd_beta, topk,
                            policy, shapes, teacher_temperature)
  return terms.node_columns(), stats


__all__ = ["NonFiniteError", "ScoringConfig", "TOP_TOKENS", "TreeTerms", "cosine", "ideal_scores",
           "rollout_paths", "score_tree", "tree_terms"]
