"""The final pass (MATH.md "Alignment"): ĝ*, every distillation direction, their cosines and
the covariates at every scored node of a tree.

Shape letters (gradalign_jax/__init__.py): U tree nodes, C nodes per chunk, E child edges of a
chunk, V vocab.

``score_tree`` streams student and teacher logits chunk by chunk (``scoring.padded_chunks``),
scatters the tree's statistics to [C, V] on device and reduces each chunk to per-node scalars
(``gradients.node_scores``), so nothing of size U × V is kept. Every direction of the registry
``gradients.DIRECTIONS`` is scored; MiniLLM's R̄ needs ℓ along every rollout's future, known
only once all nodes are scored, so each chunk keeps ĝ*, d_rkl, p at the (few) children of its
nodes and ``gradients.minillm_from_terms`` finishes it exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import gradients
from gradalign_jax.scoring import PromptedModel, ScoringStats, Shapes, padded_chunks
from gradalign_jax.tree import PrefixTree, TreeArrays


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """What the final pass computes and how it chunks.

  directions: the directions to report (names of ``gradients.DIRECTIONS``); the first is the
    headline of the report. Every direction is computed; this selects the table columns.
  chunk_nodes: C, nodes per chunk (memory: C × V logits per model).
  jsd_beta: β of the JSD direction, in [0, 1]. topk: k of the top-k reverse-KL directions.
  """
  directions: tuple[str, ...] = tuple(gradients.DIRECTIONS)
  chunk_nodes: int = 256
  jsd_beta: float = 0.5
  topk: int = 20

  def __post_init__(self):
    object.__setattr__(self, "directions", tuple(self.directions))
    bad = [d for d in self.directions if d not in gradients.DIRECTIONS]
    if bad or not self.directions:
      raise ValueError(f"unknown directions {bad}; choose from {list(gradients.DIRECTIONS)}")
    if self.chunk_nodes < 1 or self.topk < 1:
      raise ValueError(f"need chunk_nodes ≥ 1 and topk ≥ 1 (got {self.chunk_nodes}, "
                       f"{self.topk})")
    if not 0.0 <= self.jsd_beta <= 1.0:
      raise ValueError(f"jsd_beta={self.jsd_beta} must be in [0, 1]")


class NonFiniteError(ValueError):
  """NaN or Inf where the diagnostic needs numbers (logits, directions): results would be
  garbage, so the group is not written."""


@functools.partial(jax.jit, static_argnames=("topk",))
def _chunk_scores(student_logits, teacher_logits, temperature, vocab_mask, rows, toks, q_edge,
                  observed_edge, visit_edge, jsd_beta, topk):
  """One chunk of the final pass, on device.

  student_logits, teacher_logits: f32[C, V] raw; vocab_mask: bool[V]; rows, toks: int32[E]
  child edges (rows ≥ C are padding, dropped); q_edge, visit_edge: f32[E]; observed_edge:
  bool[E]. The tree's statistics are scattered to [C, V] here, not on the host. Returns
  (gradients.node_scores' dict of f32[C], MiniLLM terms: ĝ*_k, d_rkl_k, p_k, ℓ_k f32[E] and
  ⟨ĝ*, p⟩, ⟨d_rkl, p⟩, ‖p‖² f32[C], finite: bool[3, C] student logits, teacher logits and
  every direction's norm finite).
  """
  c, v = student_logits.shape
  zs, zt = student_logits / temperature, teacher_logits / temperature
  dense = lambda x, dt: jnp.zeros((c, v), dt).at[rows, toks].set(x.astype(dt), mode="drop")
  q, obs, w = (dense(q_edge, jnp.float32), dense(observed_edge, bool),
               dense(visit_edge, jnp.float32))
  scores = gradients.node_scores(zs, zt, q, obs, w, vocab_mask, jsd_beta=jsd_beta, topk=topk)
  g = gradients.ideal_direction(zs, q, obs, vocab_mask)
  d = gradients.reverse_kl_direction(zs, zt, vocab_mask)
  logp = gradients.masked_log_softmax(zs, vocab_mask)
  logq = gradients.masked_log_softmax(zt, vocab_mask)
  p = gradients.masked_softmax(zs, vocab_mask)
  at = lambda x: x[jnp.minimum(rows, c - 1), toks]
  terms = (at(g), at(d), at(p), at(logp) - at(logq), jnp.sum(g * p, -1), jnp.sum(d * p, -1),
           jnp.sum(p * p, -1))
  norms = jnp.stack([scores[k] for k in scores if k.startswith("norm_")])
  finite = jnp.stack([jnp.all(jnp.isfinite(zs), -1), jnp.all(jnp.isfinite(zt), -1),
                      jnp.all(jnp.isfinite(norms), 0)])
  return scores, terms, finite


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


def _future_rewards(tree: PrefixTree, arrays: TreeArrays, ell: np.ndarray) -> np.ndarray:
  """R̄ per edge (float64[U], indexed by child id): mean over the rollouts that visit the edge
  on-policy of Σ_{t'>t} (−ℓ_{y_t'}) / (L − t − 1) (0 for a rollout's last token). ell:
  float64[U], ℓ of the edge into each node. O(total tokens)."""
  total = np.zeros(arrays.num_nodes)
  for path, (_, _, branch_depth) in zip(rollout_paths(tree, arrays), tree.rollouts):
    n = len(path)  # path[t] = the child at depth t + 1 (token y_t)
    if not n:
      continue
    neg = -ell[path]
    after = np.concatenate([np.cumsum(neg[::-1])[::-1][1:], [0.0]])  # Σ_{t' > t}
    future = after / np.maximum(n - np.arange(n) - 1, 1)
    b = -1 if branch_depth is None else branch_depth
    total[path[b + 1:]] += future[b + 1:]  # on-policy edges only, as visits
  return np.where(arrays.visits > 0, total / np.maximum(arrays.visits, 1), 0.0)


def score_tree(tree: PrefixTree, student: PromptedModel, teacher: PromptedModel,
               chunk_nodes: int = 256, vocab_mask=None, jsd_beta: float = 0.5, topk: int = 20,
               temperature: float = 1.0, shapes: Shapes = Shapes()
               ) -> tuple[dict[str, np.ndarray], ScoringStats]:
  """Per scored node, every direction's alignment with ĝ* and the covariates.

  Logits are divided by ``temperature`` (the sampling temperature; MATH.md's π = softmax(z/T)),
  q̂ / observed / visit frequencies come from the tree. Returns ({column: [U']} over the U'
  scored nodes (root and nodes with a child) with ``node_id``, ``depth``, ``informative``,
  ``num_observed``, ``min_trials``, ``gradients.node_scores``' columns and
  ``{align,dot,norm}_minillm``, stats).
  """
  arrays = tree.arrays()
  v = student.cfg.vocab_size
  mask = jnp.ones(v, bool) if vocab_mask is None else jnp.asarray(vocab_mask, bool)
  n = arrays.num_nodes
  g_k, d_k, p_k, ell = (np.zeros(n) for _ in range(4))
  per_node = {"g_dot_p": np.zeros(n), "d_dot_p": np.zeros(n), "sq_p": np.zeros(n)}
  stats: list = []
  cols: dict[str, list] = {}
  for chunk in padded_chunks(arrays, student, teacher, chunk_nodes, stats, shapes):
    node_ids = chunk.node_ids
    rows, kids, q_e, obs_e, w_e = arrays.child_stats(node_ids)
    out, terms, finite = _chunk_scores(
        chunk.student, chunk.teacher, temperature, mask,
        chunk.pad_edges(rows.astype(np.int32), chunk_nodes), chunk.pad_edges(arrays.token[kids], 0),
        chunk.pad_edges(q_e, 0), chunk.pad_edges(obs_e, False), chunk.pad_edges(w_e, 0), jsd_beta,
        topk=topk)
    for dst, src in zip((g_k, d_k, p_k, ell), terms[:4]):
      dst[kids] = np.asarray(src)[:len(kids)]
    keep = node_ids >= 0
    ids = node_ids[keep]
    bad = ~np.asarray(finite)[:, keep]
    if bad.any():
      what = [w for w, b in zip(("student logits", "teacher logits", "directions"),
                                bad.any(axis=1)) if b]
      raise NonFiniteError(f"non-finite {' and '.join(what)} at tree node(s) "
                           f"{ids[bad.any(axis=0)][:5].tolist()}")
    for name, src in zip(per_node, terms[4:]):
      per_node[name][ids] = np.asarray(src)[keep]
    out = {k: np.asarray(x)[keep] for k, x in out.items()}
    out.update(node_id=ids, depth=arrays.depth[ids], informative=arrays.informative[ids],
               num_observed=arrays.num_observed[ids], min_trials=arrays.min_trials[ids])
    for k, x in out.items():
      cols.setdefault(k, []).append(x)
  cols = {k: np.concatenate(x) for k, x in cols.items()}
  # MiniLLM: h_k = w_k R̄_k on visited children, summed per parent.
  kids = np.arange(1, n)
  par = arrays.parent[kids]
  tot = arrays.total_visits[par]
  h = np.where(tot > 0, arrays.visits[kids] / np.maximum(tot, 1), 0.0)
  h = h * _future_rewards(tree, arrays, ell)[kids]
  sums = {}
  for name, x in [("gh", g_k[kids] * h), ("dh", d_k[kids] * h), ("hh", h * h),
                  ("hp", h * p_k[kids]), ("h", h)]:
    sums[name] = np.zeros(n)
    np.add.at(sums[name], par, x)
  ids = cols["node_id"]
  dot, sq = gradients.minillm_from_terms(
      cols["dot_reverse_kl"], cols["norm_reverse_kl"] ** 2, per_node["g_dot_p"][ids],
      per_node["d_dot_p"][ids], per_node["sq_p"][ids], sums["gh"][ids], sums["dh"][ids],
      sums["hh"][ids], sums["hp"][ids], sums["h"][ids])
  norm = np.sqrt(np.asarray(sq))
  den = cols["norm_ideal"] * norm
  cols["dot_minillm"] = np.asarray(dot)
  cols["norm_minillm"] = norm
  cols["align_minillm"] = np.where(den > 0, cols["dot_minillm"] / np.where(den > 0, den, 1), 0.0)
  cols["align_minillm"][~np.isfinite(den * cols["dot_minillm"])] = np.nan  # never 0
  return cols, stats[0]


__all__ = ["NonFiniteError", "ScoringConfig", "rollout_paths", "score_tree"]
