"""Targeted rollouts (MATH.md "Targeted rollouts"): spend a rollout budget on the (node, token)
pairs that decide the cosine, branching from cached prefixes.

Shape letters (gradalign_jax/__init__.py): C nodes of a chunk, V vocab, E child edges of a
chunk, Y candidate tokens kept per node, I chosen (node, token) pairs.

One round:
  1. Candidates: every scored node u of the tree (root and nodes with a child) and every
     token k of the sampling policy's support S_u with n_k < ``min_trials``; priority by
     default the expected reduction of the error of ĝ*(u) from the student and the tree alone
     (``ideal_error_priority``: one tree serves every teacher spec), or |d_k(u)| of a
     distillation direction / |p_k − q_k| on one teacher (``priorities``). Logits come chunk
     by chunk from ``scoring.padded_chunks`` (the student's only, for the default); only the
     Y best tokens of each node leave the device.
  2. Depth windows [0,1), [1,2), [2,4), [4,8), … (``window_index``): the round's pairs are split
     equally across the windows that have candidates, a window with fewer candidates than its
     share hands the rest on (``split_budget``); within a window the highest priorities win
     (``select``).
  3. Each pair gets M continuations from ``sampling.branch``: a source rollout whose path
     passes through u already holds u's prefix in its KV state (``find_sources``), the token
     k is forced at depth(u), the rest is sampled on-policy. All pairs of a round that share a
     source batch go in one ``branch`` call.
  4. The continuations enter the tree with ``branch_depth = depth(u)`` (they count toward
     (s, n) of u·k and below, never toward u's ancestors); ``PrefixTree.arrays()`` then gives
     the refreshed Q̂, Wilson bounds and informative flags. Later rounds re-score the tree
     (new nodes) and choose again.

``RolloutPool`` is the one mutable object: a question's tree together with the sampler batches
its rollouts came from (the KV state a branch needs). Everything else is a pure function.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import gradients, sampling, scoring
from gradalign_jax.tree import PrefixTree, TreeArrays

# The student-only rule, then |d_k| of the registry's directions that need no tree statistics
# (the top-k ones are left out: their support is the student's own top-k, so |d_k| says
# little about other tokens), and |p_k − q_k|.
IDEAL_ERROR = "ideal_error"
PRIORITIES = (IDEAL_ERROR, "reverse_kl", "forward_kl", "jsd", "prob_gap")


@dataclasses.dataclass(frozen=True)
class TargetedConfig:
  """How targeted rollouts spend their budget (per question).

  priority: how (node, token) pairs are ranked.
    ``"ideal_error"`` (default): the expected reduction of the error of ĝ*(u) itself if the
      pair gets M more continuations (``ideal_error_priority``), from the student's policy
      and the tree's counts only. It never looks at a teacher, so one tree serves every spec
      of a sweep and a spec's tables are the same alone or with others (MATH.md). Cost: one
      student-only scoring pass per round and question, whatever the number of specs.
    ``"reverse_kl"``, ``"forward_kl"``, ``"jsd"`` (β = ``jsd_beta``), ``"prob_gap"``
      (|p_k − q_k|): |d_k(u)| of that direction on one teacher (the paper's rule, for a study
      of one direction). It depends on the teacher, so the pipeline gives each spec its own
      copy of the tree with the whole budget: cost × the number of specs (rollouts, branch
      calls, a student + teacher pass per round, and the final pass on a tree per spec).
  budget: targeted rollouts in all, over all rounds (the initial on-policy rollouts are not
    counted here). Default 64.
  num_continuations: M, continuations per (node, token) pair. Default 4. A round's budget is
    dealt evenly over ⌈budget / M⌉ pairs (so pairs get M or M − 1 when it does not divide);
    when fewer pairs are eligible, each gets more (``plan_round``), so the budget is spent.
  rounds: the budget is split evenly across rounds; each round re-scores the refreshed tree
    and chooses again (pairs found by earlier targeted rollouts become candidates). Default 2.
    Rounds stop early when no pair is eligible in any question (budget left unspent).
  min_trials: a pair is a candidate while n_k < min_trials (outcome trials of u·k). None
    (default): no limit for ``"ideal_error"`` (its priority falls as n_k grows and
    ``tolerance`` stops it), 4 (= M) for the teacher priorities (a pair targeted once is not
    targeted again).
  tolerance: ``"ideal_error"`` only: a pair stops being a candidate once its share of the
    error of ĝ*, ‖∂ĝ*/∂Q̂_k‖ · sd(Q̂_k) under the Beta(1 + s, 1 + n − s) posterior, is below
    this (its interval is already tight where it matters). Default 0.01.
  max_pairs_per_node: at most this many tokens of one node are kept as candidates (the top
    priorities; bounds what leaves the device for a large vocabulary). Default 8.
  max_depth: nodes deeper than this are not candidates (None: no limit).
  jsd_beta: β of the ``"jsd"`` priority. Default 0.5.
  surplus: when every candidate already gets M and budget is left, deal it ``"even"``ly
    (default) or in proportion to ``"priority"`` (``plan_round``).
  """
  budget: int = 64
  num_continuations: int = 4
  rounds: int = 2
  priority: str = IDEAL_ERROR
  min_trials: int | None = None
  tolerance: float = 0.01
  max_pairs_per_node: int = 8
  max_depth: int | None = None
  jsd_beta: float = 0.5
  surplus: str = "even"

  def __post_init__(self):
    if self.priority not in PRIORITIES:
      raise ValueError(f"priority={self.priority!r} is not one of {PRIORITIES}")
    if self.budget < 0 or self.num_continuations < 1 or self.rounds < 1:
      raise ValueError(f"need budget ≥ 0, num_continuations ≥ 1, rounds ≥ 1 (got "
                       f"{self.budget}, {self.num_continuations}, {self.rounds})")
    if self.surplus not in ("even", "priority"):
      raise ValueError(f"surplus={self.surplus!r} must be 'even' or 'priority'")
    if (self.min_trials is not None and self.min_trials < 1) or self.max_pairs_per_node < 1:
      raise ValueError(f"min_trials={self.min_trials} and max_pairs_per_node="
                       f"{self.max_pairs_per_node} must be ≥ 1")
    if self.tolerance < 0:
      raise ValueError(f"tolerance={self.tolerance} must be ≥ 0 (0: never stop early)")

  @property
  def per_spec(self) -> bool:
    """Whether the priority reads a teacher (then each spec needs its own tree)."""
    return self.priority != IDEAL_ERROR

  def trial_limit(self) -> int:
    """min_trials with its default resolved."""
    if self.min_trials is not None:
      return self.min_trials
    return 2**30 if not self.per_spec else 4

  def round_budgets(self) -> list[int]:
    """Targeted rollouts of each round (sums to ``budget``; earlier rounds get the remainder)."""
    base, extra = divmod(self.budget, self.rounds)
    return [base + (r < extra) for r in range(self.rounds)]


# ---------------------------------------------------------------------------------------
# Windows and the budget split (pure numpy)


def window_index(depth) -> np.ndarray:
  """Depth window of each depth: 0 for [0,1), 1 for [1,2), 2 for [2,4), w for [2^(w−1), 2^w).

  depth: int array-like ≥ 0 → int64 array of the same shape.
  """
  d = np.asarray(depth, np.int64)
  if np.any(d < 0):
    raise ValueError("depths must be ≥ 0")
  w = np.zeros(d.shape, np.int64)
  pos = d > 0
  w[pos] = np.floor(np.log2(d[pos])).astype(np.int64) + 1
  return w


def window_bounds(w: int) -> tuple[int, int]:
  """[lo, hi) in generated tokens of window w."""
  return (0, 1) if w == 0 else (1 << (w - 1), 1 << w)


def split_budget(available: Sequence[int], total: int) -> np.ndarray:
  """Pairs per window: equal shares over the windows with candidates, water-filled.

  available: int[W] candidates in each window; total: pairs to place. A window never gets
  more than it has; what it cannot take is shared among the others; a remainder that does
  not divide evenly goes to the shallowest windows. Returns int64[W], sum = min(total,
  Σ available).
  """
  avail = np.asarray(available, np.int64)
  out = np.zeros_like(avail)
  left = min(int(total), int(avail.sum()))
  open_ = [w for w in range(len(avail)) if avail[w] > 0]
  # Windows too small for an equal share take all they have, until every open one can take
  # its share; only then is the remainder dealt (so it never lands before a cap is known).
  while open_:
    small = [w for w in open_ if avail[w] * len(open_) <= left]
    if not small:
      break
    for w in small:
      out[w] = avail[w]
      left -= int(avail[w])
    open_ = [w for w in open_ if w not in small]
  if open_:
    share, extra = divmod(left, len(open_))
    for i, w in enumerate(open_):
      out[w] = share + (i < extra)
  return out


class Candidates(NamedTuple):
  """Candidate pairs (one entry per (node, token)); all arrays of one length.

  node int32 (tree node id), token int32, depth int32 (of the node), priority float32,
  trials int64 (n_k so far).
  """
  node: np.ndarray
  token: np.ndarray
  depth: np.ndarray
  priority: np.ndarray
  trials: np.ndarray

  def take(self, idx) -> "Candidates":
    return Candidates(*(x[idx] for x in self))


def select(cands: Candidates, num_pairs: int) -> np.ndarray:
  """Indices into ``cands`` of the chosen pairs: ``split_budget`` over the depth windows, then
  within each window the highest priorities (ties: fewer trials, then lower node id, token).
  Returned in window order, best first within a window. int64[≤ num_pairs].
  """
  if len(cands.node) == 0 or num_pairs <= 0:
    return np.zeros(0, np.int64)
  win = window_index(cands.depth)
  counts = np.bincount(win)
  quota = split_budget(counts, num_pairs)
  # lexsort: last key is primary.
  order = np.lexsort((cands.token, cands.node, cands.trials, -cands.priority.astype(np.float64),
                      win))
  chosen = []
  start = 0
  for w, c in enumerate(counts):
    chosen.append(order[start:start + quota[w]])
    start += c
  return np.concatenate(chosen).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Priorities (device, chunk by chunk)


def priorities(student_logits, teacher_logits, kind: str, vocab_mask=None,
               jsd_beta: float = 0.5) -> jax.Array:
  """Priority of every token at a chunk of nodes for a teacher priority: f32[C, V] logits
  (the student's ``sampling.policy_logits``, the teacher's over its temperature) →
  f32[C, V], 0 on masked rows. kind: one of PRIORITIES but ``"ideal_error"`` (|d_k| of that
  registry direction, or |p_k − q_k| for ``"prob_gap"``)."""
  if kind == "prob_gap":
    d = (gradients.masked_softmax(student_logits, vocab_mask)
         - gradients.masked_softmax(teacher_logits, vocab_mask))
  elif kind in PRIORITIES and kind != IDEAL_ERROR:
    d = gradients.DIRECTIONS[kind].at_node(student_logits, teacher_logits, None, vocab_mask,
                                           jsd_beta, None)
  else:
    raise ValueError(f"priority {kind!r} is not a teacher priority of {PRIORITIES}")
  return jnp.abs(d)


def ideal_error_priority(student_logits, vocab_mask, successes, trials, m):
  """The expected reduction of the error of ĝ*(u) from M more continuations of each pair.

  student_logits: f32[C, V] the student's ``sampling.policy_logits`` (support S_u:
  ``sampling.in_support``); successes, trials: f32[C, V] s_k, n_k of each child (0 where none); m: M.
  ĝ* = diag(π)(I − 1 π̃ᵀ) Q̂ on O ∪ {k} (π̃: π renormalised there), so an error in Q̂_k moves
  ĝ* by ‖column k‖² = π_k² (1 − 2 π̃_k) + π̃_k² Σ_{O∪{k}} π_j² per unit variance; with a
  Beta(1 + s, 1 + n − s) posterior of mean μ, Var = μ(1 − μ)/(n + 3), and M more trials leave
  about μ(1 − μ)/(n + 3 + M). Returns (priority f32[C, V] = column² × that reduction, error
  f32[C, V] = column × sd now, the pair's share of ĝ*'s error), 0 off the support.
  """
  support = sampling.in_support(student_logits) & vocab_mask
  pi = gradients.masked_softmax(student_logits, support)
  obs = support & (trials > 0)
  mass = jnp.sum(jnp.where(obs, pi, 0.0), -1, keepdims=True)
  sq = jnp.sum(jnp.where(obs, pi * pi, 0.0), -1, keepdims=True)
  # The pair's own token joins O when it is not observed yet.
  mass_k = mass + jnp.where(obs, 0.0, pi)
  sq_k = sq + jnp.where(obs, 0.0, pi * pi)
  pt = pi / jnp.maximum(mass_k, 1e-30)
  column = jnp.maximum(pi * pi * (1 - 2 * pt) + pt * pt * sq_k, 0.0)
  mu = (1 + successes) / (trials + 2)
  spread = mu * (1 - mu)
  reduction = spread * (1 / (trials + 3) - 1 / (trials + 3 + m))
  prio = jnp.where(support, column * reduction, 0.0)
  error = jnp.where(support, jnp.sqrt(column * spread / (trials + 3)), 0.0)
  return prio, error


@functools.partial(jax.jit, static_argnames=("kind", "k", "policy"))
def _chunk_candidates(student_logits, teacher_logits, teacher_temperature, vocab_mask, rows,
                      toks, successes_edge, trials_edge, min_trials, tolerance, m, jsd_beta,
                      kind, k, policy):
  """Top-k eligible tokens per node of a chunk. rows, toks: int32[E] child edges (rows ≥ C:
  padding); successes_edge f32[E], trials_edge int32[E]; teacher_logits None for
  ``"ideal_error"``. Returns (priority f32[C, Y], token int32[C, Y], trials int32[C, Y]),
  Y = k; priority −1 where no eligible token is left. Only tokens of the sampling policy's
  support are eligible (a forced token π can never sample would not estimate its Q)."""
  def block(s, *t_and_rows):
    *t, local_rows = t_and_rows
    return _block_candidates(s, t[0] if t else None, teacher_temperature, vocab_mask,
                             local_rows, toks, successes_edge, trials_edge, min_trials,
                             tolerance, m, jsd_beta, kind, k, policy), ()
  logits = (student_logits,) if teacher_logits is None else (student_logits, teacher_logits)
  return scoring.row_blocks(block, logits, rows)[0]


def _block_candidates(student_logits, teacher_logits, teacher_temperature, vocab_mask, rows,
                      toks, successes_edge, trials_edge, min_trials, tolerance, m, jsd_beta,
                      kind, k, policy):
  """``_chunk_candidates`` on a chunk or a block of its rows (``scoring.row_blocks``)."""
  c, v = student_logits.shape
  zs = sampling.policy_logits(student_logits, policy, vocab_mask)
  support = sampling.in_support(zs) & vocab_mask
  trials = jnp.zeros((c, v), jnp.int32).at[rows, toks].set(trials_edge, mode="drop")
  ok = (trials < min_trials) & support
  if kind == IDEAL_ERROR:
    succ = jnp.zeros((c, v), jnp.float32).at[rows, toks].set(successes_edge, mode="drop")
    prio, error = ideal_error_priority(zs, vocab_mask, succ, trials.astype(jnp.float32), m)
    ok &= error >= tolerance
  else:
    prio = priorities(zs, teacher_logits / teacher_temperature, kind, vocab_mask, jsd_beta)
  val, tok = jax.lax.top_k(jnp.where(ok, prio, -1.0), k)
  return val, tok, jnp.take_along_axis(trials, tok, axis=1)


def candidates(tree: PrefixTree | TreeArrays, student: scoring.PromptedModel,
               teacher: scoring.PromptedModel | None, cfg: TargetedConfig, vocab_mask=None,
               policy: sampling.SamplingConfig | float = 1.0, chunk_nodes: int = 256,
               shapes: scoring.Shapes = scoring.Shapes(), teacher_temperature: float = 1.0
               ) -> Candidates:
  """Every eligible (node, token) pair of the tree's scored nodes with its priority.

  A node is a candidate when it has a child (it is a decision some rollout took; a leaf ended
  at EOS or the horizon) and its depth is ≤ cfg.max_depth; a token when it is in the support
  of the sampling policy (``policy``: the rollouts' SamplingConfig or their temperature;
  ``sampling.policy_logits`` within ``vocab_mask``, bool[V], None = all), n_k <
  cfg.trial_limit() and, for ``"ideal_error"``, its error share ≥ cfg.tolerance; at most
  cfg.max_pairs_per_node tokens per node, the highest priorities. teacher: needed by the
  teacher priorities only (None for ``"ideal_error"``: no teacher pass); its logits are
  divided by ``teacher_temperature``.
  """
  if cfg.per_spec and teacher is None:
    raise ValueError(f"priority={cfg.priority!r} ranks pairs on a teacher: pass one, or use "
                     f"priority={IDEAL_ERROR!r}")
  arrays = tree.arrays() if isinstance(tree, PrefixTree) else tree
  v = student.cfg.vocab_size
  mask = jnp.ones(v, bool) if vocab_mask is None else jnp.asarray(vocab_mask, bool)
  k = min(cfg.max_pairs_per_node, v)
  out = []
  for chunk in scoring.padded_chunks(arrays, student, teacher if cfg.per_spec else None,
                                     chunk_nodes, shapes=shapes):
    node_ids, kids = chunk.node_ids, chunk.kids
    val, tok, tr = _chunk_candidates(
        chunk.student, chunk.teacher, teacher_temperature, mask,
        chunk.pad_edges(chunk.rows, len(node_ids), jnp.int32),
        chunk.pad_edges(arrays.token[kids], 0, jnp.int32),
        chunk.pad_edges(arrays.successes[kids], 0, jnp.float32),
        chunk.pad_edges(np.minimum(arrays.trials[kids], 2**30), 0, jnp.int32),
        min(cfg.trial_limit(), 2**31 - 1), cfg.tolerance, cfg.num_continuations,
        cfg.jsd_beta, kind=cfg.priority, k=k, policy=sampling.as_policy(policy))
    val, tok, tr = np.asarray(val), np.asarray(tok), np.asarray(tr)
    real = node_ids >= 0
    if cfg.max_depth is not None:
      real &= arrays.depth[np.maximum(node_ids, 0)] <= cfg.max_depth
    keep = real[:, None] & (val >= 0)
    r, j = np.nonzero(keep)
    ids = node_ids[r]
    out.append(Candidates(ids.astype(np.int32), tok[r, j].astype(np.int32),
                          arrays.depth[ids].astype(np.int32), val[r, j].astype(np.float32),
                          tr[r, j].astype(np.int64)))
  return Candidates(*(np.concatenate(x) for x in zip(*out)))


# ---------------------------------------------------------------------------------------
# Rollouts, their sources, and a round


class RolloutPool:
  """One question's tree and the sampler batches its rollouts came from.

      pool = RolloutPool()
      pool.add(ro, rewards, rows)       # rows of a sampler batch that belong to this question
      pool.tree                         # the PrefixTree (branch_depth from ro.branch_depth)

  ``origin[i]`` is the (batch index, row) of the tree's i-th rollout (``tree.rollouts[i]``):
  a branch from node u starts from any such row whose path passes through u.
  """

  def __init__(self):
    self.tree = PrefixTree()
    self.batches: list[sampling.Rollouts] = []
    self.origin: list[tuple[int, int]] = []

  def add(self, ro: sampling.Rollouts, rewards: Sequence[float],
          rows: Sequence[int] | None = None) -> None:
    """Adds rows of a sampler batch (default: all) with their rewards (same order as rows)."""
    rows = range(len(ro)) if rows is None else [int(r) for r in rows]
    rewards = list(rewards)
    if len(rewards) != len(rows):
      raise ValueError(f"{len(rewards)} rewards for {len(rows)} rows; pass one per row")
    for i, batch in enumerate(self.batches):  # the same batch object is stored once
      if batch is ro:
        b = i
        break
    else:
      self.batches.append(ro)
      b = len(self.batches) - 1
    for r, reward in zip(rows, rewards):
      depth = int(ro.branch_depth[r])
      self.tree.add(ro.sequence(r), reward, branch_depth=None if depth < 0 else depth)
      self.origin.append((b, r))

  @property
  def num_rollouts(self) -> int:
    return len(self.origin)

  def copy(self) -> "RolloutPool":
    """An independent tree over the same sampler batches (a teacher priority's own tree)."""
    out = RolloutPool()
    out.tree = copy.deepcopy(self.tree)
    out.batches, out.origin = list(self.batches), list(self.origin)
    return out


def find_sources(pool: RolloutPool, node_ids: Sequence[int],
                 arrays: TreeArrays | None = None) -> list[tuple[int, int]]:
  """(batch, row) of a pool rollout that passes through each node and goes on past it.

  A rollout passes through u and goes on iff its last node lies strictly inside u's subtree
  in preorder; its KV state then holds u's whole prefix (a branched row holds the part before
  its branch point in its shared prefix). Among those, one of the earliest added batch is
  chosen. Raises if a node has none (it has no child).
  """
  if len(pool.tree.rollouts) != len(pool.origin):
    raise ValueError(f"the pool's tree holds {len(pool.tree.rollouts)} rollouts but the pool "
                     f"knows the source of {len(pool.origin)}: add rollouts through "
                     "RolloutPool.add, not PrefixTree.add")
  arrays = pool.tree.arrays() if arrays is None else arrays
  pos = np.empty(arrays.num_nodes, np.int64)
  pos[arrays.preorder] = np.arange(arrays.num_nodes)
  leaves = np.asarray([leaf for leaf, _, _ in pool.tree.rollouts], np.int64)
  leaf_pos = pos[leaves]
  order = np.argsort(leaf_pos, kind="stable")
  sorted_pos = leaf_pos[order]
  batch_of = np.asarray([b for b, _ in pool.origin], np.int64)[order]
  out = []
  for u in node_ids:
    lo = pos[u] + 1  # strictly below u
    hi = pos[u] + arrays.subtree_size[u]
    i, j = np.searchsorted(sorted_pos, lo), np.searchsorted(sorted_pos, hi)
    if i >= j:
      raise ValueError(f"node {u} has no rollout that goes on past it (a leaf); only nodes "
                       "with a child can be branched from")
    # The earliest batch (the on-policy samples where possible): branches then share the
    # source state's shapes, hence the compiled branch programs.
    k = i + int(np.argmin(batch_of[i:j]))
    out.append(pool.origin[int(order[k])])
  return out


@dataclasses.dataclass(frozen=True)
class RoundLog:
  """What one round did: the chosen pairs (Candidates) and the rollouts each got (int[I])."""
  pairs: Candidates
  rollouts: np.ndarray
  window: np.ndarray


def plan_round(cands: Candidates, budget: int, m: int,
               surplus: str = "even") -> tuple[np.ndarray, np.ndarray]:
  """Chosen candidate indices and the rollouts each gets.

  ⌈budget / m⌉ pairs are chosen (``select``) and the budget is dealt evenly over them (the
  first in ``select``'s order, shallow windows first, get the remainder): about m each.
  When the candidates run out first, every candidate is chosen and gets m, and the surplus
  is dealt evenly (``surplus="even"``) or in proportion to the pairs' priorities
  (``"priority"``, largest remainders first), so the whole budget is still spent. Returns
  (idx int64[I], rollouts int64[I]), Σ rollouts = budget (0 with no candidates).
  """
  budget, m = int(budget), int(m)
  if surplus not in ("even", "priority"):
    raise ValueError(f"surplus={surplus!r} must be 'even' or 'priority'")
  if budget <= 0 or len(cands.node) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  idx = select(cands, -(-budget // m))
  base = min(m, budget // len(idx)) if surplus == "priority" else budget // len(idx)
  counts = np.full(len(idx), base, np.int64)
  left = budget - int(counts.sum())
  w = cands.priority[idx].astype(np.float64)
  if surplus == "priority" and left > 0 and w.sum() > 0:
    share = left * w / w.sum()
    counts += np.floor(share).astype(np.int64)
    left = budget - int(counts.sum())
    counts[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
  else:
    counts[:left] += 1
  return idx, counts


RewardFn = Callable[[tuple[int, ...]], float]


def _per_pool(reward_fn: RewardFn | Sequence[RewardFn], n: int) -> list[RewardFn]:
  if callable(reward_fn):
    return [reward_fn] * n
  if len(reward_fn) != n:
    raise ValueError(f"{len(reward_fn)} reward functions for {n} pools; pass one, or one "
                     "per pool")
  return list(reward_fn)


def run_round(pools: Sequence[RolloutPool], cands: Sequence[Candidates], budget: int,
              m: int, cfg_model, params, reward_fn: RewardFn | Sequence[RewardFn],
              vocab_mask=None, seed: int = 0, surplus: str = "even") -> list[RoundLog]:
  """One round over several questions: chooses ``budget`` rollouts' worth of pairs per
  question, branches them (one ``sampling.branch`` call per source batch and power of two
  in the pairs' counts), scores them with ``reward_fn(generated ids) → 0/1`` (one function,
  or one per pool: each question has its own answer) and adds them to each pool's tree."""
  reward_fns = _per_pool(reward_fn, len(pools))
  # A pair's count is split into powers of two, one branch call per (source batch, power):
  # num_samples is static in the sampler, so this keeps the compiled programs to a handful
  # whatever the budget. A pair may appear in several calls; their seeds differ.
  requests: dict[tuple[int, int], list] = {}  # (batch id, 2^j) → [(pool i, batch i, row, d, k)]
  logs = []
  for qi, (pool, c) in enumerate(zip(pools, cands)):
    idx, counts = plan_round(c, budget, m, surplus)
    pairs = c.take(idx)
    logs.append(RoundLog(pairs, counts, window_index(pairs.depth)))
    if not len(idx):
      continue
    for (b, row), d, k, n in zip(find_sources(pool, pairs.node), pairs.depth, pairs.token,
                                 counts):
      for j in range(int(n).bit_length()):
        if n >> j & 1:
          key = (id(pool.batches[b]), 1 << j)
          requests.setdefault(key, []).append((qi, b, row, int(d), int(k)))
  for call, ((_, n), reqs) in enumerate(sorted(requests.items(), key=lambda kv: kv[0][1])):
    qi0, b0 = reqs[0][0], reqs[0][1]
    source = pools[qi0].batches[b0]
    br = sampling.branch(cfg_model, params, source, [r[2] for r in reqs], [r[3] for r in reqs],
                         [r[4] for r in reqs], num_samples=n, seed=seed * 1000 + call,
                         vocab_mask=vocab_mask)
    for j, (qi, _, _, _, _) in enumerate(reqs):
      rows = list(range(j * n, (j + 1) * n))
      pools[qi].add(br, [reward_fns[qi](tuple(br.sequence(r))) for r in rows], rows)
  return logs


def targeted_rollouts(pools: Sequence[RolloutPool], students: Sequence[scoring.PromptedModel],
                      teachers: Sequence[scoring.PromptedModel] | None, cfg: TargetedConfig,
                      reward_fn: RewardFn | Sequence[RewardFn], vocab_mask=None,
                      policy: sampling.SamplingConfig | float = 1.0, seed: int = 0,
                      chunk_nodes: int = 256, shapes: scoring.Shapes = scoring.Shapes(),
                      teacher_temperature: float = 1.0) -> list[list[RoundLog]]:
  """All rounds of targeted rollouts for a batch of questions (one pool and student
  PromptedModel each, and one teacher each for a teacher priority, else None; the students
  share cfg and params, which also sample the continuations).

  policy must be the sampling policy of the pools' rollouts (their SamplingConfig, or their
  temperature when untruncated). Returns, per round, one RoundLog per question; rounds stop
  early once no question has an eligible pair. The pools' trees hold the refreshed estimates
  afterwards.
  """
  if teachers is None:
    teachers = [None] * len(pools)
  if not (len(pools) == len(students) == len(teachers)):
    raise ValueError("pass one student (and, for a teacher priority, one teacher) "
                     "PromptedModel per pool")
  policy = sampling.as_policy(policy)
  for pool in pools:
    for ro in pool.batches:
      if ro.sampling.policy_only() != policy:
        raise ValueError(f"rollouts were sampled with {ro.sampling.policy_only()} but the "
                         f"policy given is {policy}: priorities must use the sampled policy")
  out = []
  for r, budget in enumerate(cfg.round_budgets()):
    cands = [candidates(p.tree, s, t, cfg, vocab_mask, policy, chunk_nodes, shapes,
                        teacher_temperature)
             for p, s, t in zip(pools, students, teachers)]
    if not any(len(c.node) for c in cands):
      break
    out.append(run_round(pools, cands, budget, cfg.num_continuations, students[0].cfg,
                         students[0].params, reward_fn, vocab_mask, seed=seed * 101 + r,
                         surplus=cfg.surplus))
  return out


__all__ = ["Candidates", "IDEAL_ERROR", "PRIORITIES", "RolloutPool", "RoundLog", "TargetedConfig",
           "candidates", "find_sources", "ideal_error_priority", "plan_round", "priorities",
           "run_round", "select", "split_budget", "targeted_rollouts", "window_bounds",
           "window_index"]
