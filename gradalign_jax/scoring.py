"""Student and teacher logits at every unique node of a prefix tree, chunk by chunk.

Shape letters (gradalign_jax/__init__.py): U scored nodes, C nodes per chunk, S cache slots
(S' of them the stack of ancestor slots, one per depth), V vocab, P prompt length. This module
stops at logits; the final pass that turns them into directions and cosines is
``alignment.py``, and targeted rollouts rank pairs from the same chunks (``padded_chunks``
serves both).

How (each node computed once, each prompt prefilled once, each node attending only to its
ancestors):
  1. The model's prompt minus its last token is prefilled once into a KV cache (the teacher's
     prompt is its privileged context + the question; the student's is the question).
  2. The scored nodes (the root and every node with a child) are laid out in depth-first
     preorder; node i of that order is *one* token: the prompt's last token for the root, the
     node's own token otherwise, at position P − 1 + depth. Its logits are the node's
     next-token logits.
  3. Chunks of C consecutive nodes are forwarded in that order. In preorder the subtree of u
     is the interval [pre(u), pre(u) + size(u)), so "y is an ancestor-or-self of node i" is
     ``lo[y] <= i < hi[y]``; and every ancestor of a chunk's node that lies *before* the
     chunk is an ancestor of the chunk's first node a (its subtree interval contains both).
  4. So the cache is [prompt | a stack of S' slots, one per depth | the chunk]: after a chunk
     each node's KV moves to the stack slot of its depth (the last node of each depth wins),
     and when the next chunk starts, stack slot d < depth(a) holds a's ancestor at depth d
     (the last node written at depth d before a: anything at depth d after that ancestor
     would lie in its subtree, hence deeper). A chunk attends to the prompt, the stack slots
     d < depth(a) that are its node's ancestors (``lo``/``hi`` again) and its own nodes (the
     tree mask within the chunk). Deeper stack slots are hidden, so a chunk runs on
     [prompt | the stack's first W slots | itself], W ≥ depth(a) a power of two
     (``Shapes.min_window``; W = S' runs it in the cache itself). Nothing of nodes × vocab
     is kept beyond one chunk: consumers get f32[C, V] per chunk (``node_logit_chunks``,
     ``padded_chunks``).

Params on a mesh (``distributed.param_sharding``): the cache is laid out on the params' mesh
(kv heads over "model"); the chunk programs are unchanged and XLA partitions them.

Cost and memory: each chunk attends over P + W + C slots (W the window above, at most S' = the
deepest node's depth + 1 to a power of two), so a tree of U scored nodes costs at most
U × (P + S' + C) attention entries, the same as one causal forward of every rollout
(Σ_r L_r × (P + L_r)) up to the chunk, and the cache holds P + S' + C slots (plus, with a
window short of the stack, a copy of the chunk's [prompt | window | chunk]) whatever the
tree's size. Before the stack, every chunk attended
over the whole tree (P + U slots): 11-29× one forward of the rollouts at G = 16 (issue 13).

Why this and not the alternatives (measured by ``ScoringStats``; see tests/test_scoring.py
and the numbers below): a forward per rollout ("cached prefixes" without a tree) processes
Σ_r (P − 1 + L_r) positions, re-running every shared prefix once per rollout that shares it; a
single tree-masked chunk processes the same U positions as this scheme but needs a U × U
mask and U × V logits at once. Appending the preorder chunk by chunk processes exactly
(P − 1) + U positions, plus padding (the prompt is prefilled padded to a power of two ≥ 16 and
the last chunk of nodes to a power of two, so a sweep over many questions and contexts
compiles a handful of programs).
Measured on the sample tree of tests/test_scoring.py::test_positions_processed (16 rollouts of
48 tokens, each branching off an earlier one; question P = 8, teacher context + question
P = 48; C = 8): 439 unique scored nodes; positions processed 456 = 7 + 439 + 1 node padding
+ 9 prompt padding (student) and 504 = 47 + 439 + 1 + 17 (teacher), i.e. ≤ 1.05 × nodes +
context + prompt padding; forwards per rollout would process 880 (student) and 1520
(teacher), 1.9× and 3.0× more.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import distributed, models
from gradalign_jax.shapes import bucket
from gradalign_jax.tree import PrefixTree, TreeArrays

_NEVER = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class PromptedModel:
  """A model and the tokens it reads before the student's generated prefix.

  cfg, params: the Qwen3 model. prompt: int ids, the question as the student sees it, or the
  teacher's privileged context followed by the same question (at least one token).
  tokenizer: optional; when both models have one, their vocabularies are compared too.
  """
  cfg: models.Qwen3Config
  params: Any
  prompt: Sequence[int]
  tokenizer: Any = None


@dataclasses.dataclass(frozen=True)
class Shapes:
  """How a scoring pass pads, i.e. how many programs a sweep compiles.

  min_prompt: the prompt is prefilled padded to a power of two ≥ this. min_capacity: the
  stack of ancestor slots (one per depth) holds a power of two ≥ this many. min_window: a
  chunk attends to the stack's first W slots, W the smallest power of two ≥ this and ≥ the
  depth of the chunk's first node (its ancestors outside the chunk are shallower), capped at
  the stack: shallow chunks skip the deep slots they cannot see, at one compiled program per
  W (None: the whole stack, one program). full_chunks: pad the last chunk of nodes to the
  full chunk size (one chunk program) instead of a power of two (less padding). A sweep sets
  min_capacity to its horizon (no node is deeper) and full_chunks, so that it compiles one
  chunk program per model and window: on small models compilation, not compute, dominates.
  """
  min_prompt: int = 16
  min_capacity: int = 64
  min_window: int | None = 64
  full_chunks: bool = False


def check_compatible(student_cfg: models.Qwen3Config, teacher_cfg: models.Qwen3Config,
                     student_tokenizer=None, teacher_tokenizer=None) -> None:
  """Raises ValueError unless student and teacher share the vocabulary (MATH.md)."""
  if student_cfg.vocab_size != teacher_cfg.vocab_size:
    raise ValueError(
        f"student vocab_size={student_cfg.vocab_size} differs from teacher vocab_size="
        f"{teacher_cfg.vocab_size}: per-token distillation compares distributions over the same "
        "ids; pick a teacher from the student's model family (same tokenizer and padded vocab)")
  if (student_tokenizer is None) != (teacher_tokenizer is None):
    raise ValueError("pass both tokenizers or neither to check_compatible")
  if student_tokenizer is not None:
    models.check_same_vocabulary(student_tokenizer, teacher_tokenizer)


@dataclasses.dataclass(frozen=True)
class TreePlan:
  """The scored nodes of a tree in preorder, padded to whole chunks (shared by both models).

  node_ids int32[U'] (U' = U padded to whole chunks; −1 = padding); depth, token int32[U'];
  lo, hi int32[U']: node j's subtree is the order interval [lo[j], hi[j]) (empty for padding);
  chunks: (start, size) of each chunk: full chunks of C, then the remainder as one chunk of
  a power of two (≥ 8 when C ≥ 8): a tree uses at most two chunk programs and a sweep at
  most log2(C) + 1, at the cost of padding under half the last chunk (padded − U < C/2 + 8).
  """
  node_ids: np.ndarray
  depth: np.ndarray
  token: np.ndarray
  lo: np.ndarray
  hi: np.ndarray
  num_nodes: int
  chunks: tuple[tuple[int, int], ...]


def plan_tree(arrays: TreeArrays, chunk_nodes: int, full_chunks: bool = False) -> TreePlan:
  """Orders the scored nodes (root + every node with a child) in preorder. O(U)."""
  pre = arrays.preorder
  scored = (arrays.child_count > 0)
  scored[0] = True
  in_order = scored[pre]
  ids = pre[in_order]
  n = len(ids)
  # rank[p] = scored nodes strictly before preorder position p
  rank = np.concatenate([[0], np.cumsum(in_order)])
  pos = np.empty(len(pre), np.int64)
  pos[pre] = np.arange(len(pre))
  lo = rank[pos[ids]]
  hi = rank[pos[ids] + arrays.subtree_size[ids]]
  if chunk_nodes < 1:
    raise ValueError(f"chunk_nodes={chunk_nodes} must be ≥ 1")
  granule = 8 if chunk_nodes >= 8 else 1
  m = -(-n // granule) * granule
  chunks, start = [], 0
  while m - start >= chunk_nodes:
    chunks.append((start, chunk_nodes))
    start += chunk_nodes
  if m > start:  # the remainder: one chunk of a power of two, padded
    size = chunk_nodes if full_chunks else min(chunk_nodes, bucket(m - start, granule))
    chunks.append((start, size))
    m = start = start + size
  assert start == m, (start, m)
  pad = lambda x, fill: np.concatenate([x, np.full(m - n, fill)]).astype(np.int32)
  return TreePlan(node_ids=pad(ids, -1), depth=pad(arrays.depth[ids], 0),
                  token=pad(arrays.token[ids], 0), lo=pad(lo, 1), hi=pad(hi, 0), num_nodes=n,
                  chunks=tuple(chunks))


@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnums=9)
def _tree_chunk(cfg, params, tokens, positions, valid, order, slot_lo, slot_hi, dest, cache,
                keep):
  """One chunk of tree nodes: attends to the prompt, its ancestors' stack slots and itself.

  cache: [prompt | stack | scratch] (S slots, ``cache.length`` the first scratch slot);
  keep: static, None to run the chunk in the cache itself (at the scratch slots, seeing the
  whole stack), or the leading slots it may see (the prompt and the stack's window), to run
  it on a copy of [those slots | C empty ones]. tokens, positions, order: int32[1, C] (order =
  the node's preorder index); valid: bool[1, C]; slot_lo, slot_hi: int32 over the slots the
  chunk runs on (S, or keep + C): slot s is seen by node i iff slot_lo[s] <= order[i] <
  slot_hi[s]; dest: int32[C] the stack slot each node's KV moves to afterwards (≥ S: it
  does not). The cache keeps its S slots and its length. Returns (logits f32[C, V], cache).
  """
  c = tokens.shape[1]
  if keep is None:
    window, at = cache, cache.length
  else:
    def view(x, axis):  # the first keep slots, then c empty ones
      empty = list(x.shape)
      empty[axis] = c
      return jnp.concatenate([jax.lax.slice_in_dim(x, 0, keep, axis=axis),
                              jnp.zeros(empty, x.dtype)], axis=axis)
    k, v = models.cache.map_kv(view, cache.k, cache.v)
    window = models.KVCache(
        k=k, v=v,
        valid=jnp.concatenate([cache.valid[:, :keep], jnp.zeros((1, c), bool)], axis=1),
        length=jnp.asarray(keep, jnp.int32))
    at = keep
  attend = ((slot_lo[None, None, :] <= order[:, :, None])
            & (order[:, :, None] < slot_hi[None, None, :]))  # [1, C, slots]
  chunk_mask = jax.lax.dynamic_slice(attend, (0, 0, at), (1, c, c))
  logits, window = models.bind(cfg, params)(tokens, positions, valid, window, chunk_mask,
                                            attend_mask=attend)
  base = window if keep is None else cache  # the cache itself was written in place

  def move(full, new, axis):  # the chunk's c slots of new to the dest slots of full
    put = (slice(None),) * axis + (dest,)
    return tuple(x.at[put].set(jax.lax.dynamic_slice_in_dim(y, at, c, axis=axis), mode="drop")
                 for x, y in zip(full, new))
  cache = models.KVCache(k=move(base.k, window.k, models.cache.K_SLOTS),
                         v=move(base.v, window.v, models.cache.V_SLOTS),
                         valid=base.valid.at[:, dest].set(True, mode="drop"),
                         length=cache.length)
  return logits[0], cache


class _Counter:
  positions = 0
  prompt_padding = 0


def _stack_moves(plan: TreePlan, start: int, c: int, stack_at: int, capacity: int) -> np.ndarray:
  """int32[C]: the cache slot each node of a chunk moves to (its depth's stack slot), or
  ``capacity`` (dropped) for padding and for a node a later node of the chunk at the same
  depth replaces (preorder: the last node at a depth is the one later nodes descend from)."""
  depth = plan.depth[start:start + c]
  real = plan.node_ids[start:start + c] >= 0
  dest = np.full(c, capacity, np.int32)
  rev = np.flatnonzero(real)[::-1]
  _, first = np.unique(depth[rev], return_index=True)  # the last node of each depth
  keep = rev[first]
  dest[keep] = stack_at + depth[keep]
  return dest


def _logit_stream(model: PromptedModel, plan: TreePlan, counter: _Counter,
                  shapes: Shapes) -> Iterator[jax.Array]:
  """Yields f32[C, V] logits of each chunk of ``plan`` for one model."""
  prompt = [int(t) for t in model.prompt]
  if not prompt:
    raise ValueError("a PromptedModel's prompt needs at least one token (the root is its last "
                     "token)")
  base = len(prompt) - 1
  # The prompt is prefilled padded to a bucket (padding slots are invalid, never attended),
  # so prompts of many lengths share a handful of compiled programs.
  padded = bucket(base, shapes.min_prompt) if base else 0
  depth_slots = bucket(int(plan.depth.max()) + 1, shapes.min_capacity)
  largest = max(c for _, c in plan.chunks)
  stack_at, scratch = padded, padded + depth_slots
  # params on a mesh: the cache's kv heads split over its "model" axis (distributed.py)
  cache = models.init_cache(model.cfg, 1, scratch + largest, distributed.mesh_of(model.params))
  if base:
    toks = np.zeros((1, padded), np.int32)
    toks[0, :base] = prompt[:-1]
    _, cache = models.forward_cached(model.cfg, model.params, jnp.asarray(toks),
                                     jnp.arange(padded, dtype=jnp.int32)[None],
                                     jnp.asarray(np.arange(padded) < base)[None], cache)
    counter.positions += padded
    counter.prompt_padding = padded - base
  cache = dataclasses.replace(cache, length=jnp.asarray(scratch, jnp.int32))
  # slot_hi of a stack slot: the subtree end of the node last written at that depth; only
  # depths above the chunk's first node are its ancestors (and its nodes' only ancestors
  # outside the chunk), so deeper stack slots are hidden (hi 0).
  slot_lo = np.zeros(cache.capacity, np.int32)
  slot_hi = np.zeros(cache.capacity, np.int32)
  slot_hi[:base] = _NEVER
  stack_hi = np.zeros(depth_slots, np.int32)
  tokens = plan.token.copy()
  tokens[0] = prompt[-1]  # the root (order 0) is the prompt's last token
  for start, c in plan.chunks:
    sl = slice(start, start + c)
    top = int(plan.depth[start])
    slot_hi[stack_at:scratch] = np.where(np.arange(depth_slots) < top, stack_hi, 0)
    window = (depth_slots if shapes.min_window is None
              else min(depth_slots, bucket(top, shapes.min_window)))
    if window == depth_slots:  # the whole stack: the chunk runs at the cache's scratch slots
      keep = None
      slot_lo[scratch:] = 1
      slot_hi[scratch:] = 0
      slot_lo[scratch:scratch + c], slot_hi[scratch:scratch + c] = plan.lo[sl], plan.hi[sl]
      lo, hi = slot_lo.copy(), slot_hi.copy()
    else:  # the prompt and the stack's first `window` slots, then the chunk
      keep = stack_at + window
      lo = np.concatenate([slot_lo[:keep], plan.lo[sl]])
      hi = np.concatenate([slot_hi[:keep], plan.hi[sl]])
    dest = _stack_moves(plan, start, c, stack_at, cache.capacity)
    order = np.arange(start, start + c, dtype=np.int32)
    # numpy arguments go to the device with the call (no eager op per array)
    logits, cache = _tree_chunk(model.cfg, model.params, tokens[None, sl],
                                (base + plan.depth[sl])[None], (plan.node_ids[sl] >= 0)[None],
                                order[None], lo, hi, dest, cache, keep)
    moved = dest < cache.capacity
    stack_hi[dest[moved] - stack_at] = plan.hi[sl][moved]
    counter.positions += c
    yield logits


@dataclasses.dataclass(frozen=True)
class ScoringStats:
  """What a scoring pass processed, next to what it had to.

  unique_nodes: scored nodes U (root + nodes with a child); student_context, teacher_context:
  prompt lengths P; student_positions, teacher_positions: token positions run through each
  model (prefill + chunks, padding included); padding: padded node positions per model;
  student_prompt_padding, teacher_prompt_padding: padded prefill positions (the prompt minus
  its last token is prefilled padded to a power of two ≥ 16, so that prompts of many lengths
  share a few compiled programs);
  per_rollout_student, per_rollout_teacher: positions a forward per rollout would process.
  """
  unique_nodes: int
  student_context: int
  teacher_context: int
  student_positions: int
  teacher_positions: int
  padding: int
  per_rollout_student: int
  per_rollout_teacher: int
  student_prompt_padding: int = 0
  teacher_prompt_padding: int = 0


class NodeLogits(NamedTuple):
  """One chunk: node_ids int32[C] (−1 = padding), student and teacher logits f32[C, V]."""
  node_ids: np.ndarray
  student: jax.Array
  teacher: jax.Array


def node_logit_chunks(tree: PrefixTree | TreeArrays, student: PromptedModel, teacher: PromptedModel,
                      chunk_nodes: int = 256, stats_out: list | None = None,
                      shapes: Shapes = Shapes()) -> Iterator[NodeLogits]:
  """Student and teacher logits at every scored node, one chunk of C nodes at a time.

  teacher None: the student's logits only (chunks' ``teacher`` is None; no stats).

  Scored nodes: the root and every node with at least one child (a leaf has no decision).
  If ``stats_out`` is a list, a ScoringStats is appended to it once the stream is exhausted.
  """
  if teacher is not None:
    both = student.tokenizer is not None and teacher.tokenizer is not None
    check_compatible(student.cfg, teacher.cfg, student.tokenizer if both else None,
                     teacher.tokenizer if both else None)
  arrays = tree.arrays() if isinstance(tree, PrefixTree) else tree
  plan = plan_tree(arrays, chunk_nodes, shapes.full_chunks)
  s_count, t_count = _Counter(), _Counter()
  # No teacher (student-only targeting): no teacher forward at all.
  t_stream = (_logit_stream(teacher, plan, t_count, shapes) if teacher is not None
              else itertools.repeat(None))
  for (start, c), s_logits, t_logits in zip(plan.chunks,
                                            _logit_stream(student, plan, s_count, shapes),
                                            t_stream):
    yield NodeLogits(plan.node_ids[start:start + c], s_logits, t_logits)
  if stats_out is not None and teacher is not None:
    leaves = np.flatnonzero((arrays.child_count == 0) & (np.arange(arrays.num_nodes) > 0))
    lengths = arrays.depth[leaves]
    stats_out.append(ScoringStats(
        unique_nodes=plan.num_nodes, student_context=len(student.prompt),
        teacher_context=len(teacher.prompt), student_positions=s_count.positions,
        teacher_positions=t_count.positions, padding=len(plan.node_ids) - plan.num_nodes,
        per_rollout_student=int(np.sum(lengths + len(student.prompt) - 1)),
        per_rollout_teacher=int(np.sum(lengths + len(teacher.prompt) - 1)),
        student_prompt_padding=s_count.prompt_padding,
        teacher_prompt_padding=t_count.prompt_padding))


def node_logits(tree, student: PromptedModel, teacher: PromptedModel, chunk_nodes: int = 256,
                shapes: Shapes = Shapes()):
  """All scored nodes at once (small trees, tests): (node_ids int32[U], f32[U, V] × 2, stats)."""
  stats: list = []
  ids, s, t = [], [], []
  for chunk in node_logit_chunks(tree, student, teacher, chunk_nodes, stats, shapes):
    keep = chunk.node_ids >= 0
    ids.append(chunk.node_ids[keep])
    s.append(np.asarray(chunk.student)[keep])
    t.append(np.asarray(chunk.teacher)[keep])
  return np.concatenate(ids), np.concatenate(s), np.concatenate(t), stats[0]


class PaddedChunk(NamedTuple):
  """One chunk padded to C rows, with the child edges of its nodes (for device scatters).

  node_ids: int32[C] (−1 = padding); student, teacher: f32[C, V] logits (padding rows 0);
  rows: int[E'] row (into node_ids) of each child edge; kids: int32[E'] child node ids;
  num_edges: E, the edge arrays' padded length (a power of two ≥ 2C, so nearly every chunk
  of a sweep shares one compiled consumer).
  """
  node_ids: np.ndarray
  student: jax.Array
  teacher: jax.Array
  rows: np.ndarray
  kids: np.ndarray
  num_edges: int

  def pad_edges(self, x, fill, dtype=None) -> jax.Array:
    """An int/float/bool[E'] per-edge array padded with ``fill`` to [E], on device."""
    x = np.asarray(x)
    return jnp.asarray(np.concatenate([x, np.full(self.num_edges - len(x), fill, x.dtype)]),
                       dtype)


def padded_chunks(arrays: TreeArrays, student: PromptedModel, teacher: PromptedModel,
                  chunk_nodes: int = 256, stats_out: list | None = None,
                  shapes: Shapes = Shapes()) -> Iterator[PaddedChunk]:
  """``node_logit_chunks`` with every chunk padded to C rows and its child edges listed:
  what both the final pass and the targeted-rollout candidates consume."""
  for chunk in node_logit_chunks(arrays, student, teacher, chunk_nodes, stats_out, shapes):
    extra = chunk_nodes - len(chunk.node_ids)
    node_ids = np.concatenate([chunk.node_ids, np.full(extra, -1, np.int32)])
    rows, kids = arrays.child_edges(node_ids)
    yield PaddedChunk(node_ids, jnp.pad(chunk.student, ((0, extra), (0, 0))),
                      None if chunk.teacher is None
                      else jnp.pad(chunk.teacher, ((0, extra), (0, 0))), rows, kids,
                      bucket(len(kids), 2 * chunk_nodes))


# On a CPU a consumer's [C, V] temporaries for 16 rows fit the cache (V = 151,936: 10 MB
# each) and a whole chunk's do not: at C = 256 the final pass took 2.4x as long (BENCHMARKS.md,
# "One question at real layer shapes"). A chunk under BLOCK_ABOVE elements (a toy vocabulary)
# and an accelerator get one call: the same compiled program, and results, as before.
ROW_BLOCK = 16
BLOCK_ABOVE = 2**22


def default_row_block(chunk_elements: int) -> int | None:
  """``row_blocks``' block for a chunk of C × V elements: ROW_BLOCK on a CPU when the chunk
  holds more than BLOCK_ABOVE, else None (one call)."""
  cpu = jax.default_backend() == "cpu"
  return ROW_BLOCK if cpu and chunk_elements > BLOCK_ABOVE else None


def row_blocks(fn, arrays, rows, block: int | None = None):
  """``fn`` over blocks of ``block`` rows of a chunk, one after another (``lax.map``), for
  consumers whose work is per row of [C, V] arrays: the same outputs as one call, with
  [block, V] temporaries instead of [C, V]. Call inside jit.

  fn(*arrays_block, local_rows) → (per_row, per_edge): pytrees with leaves [block, ...] and
  [E, ...]; arrays: [C, ...] each; rows: int32[E] the row of each edge (≥ C: padding). In a
  block, ``local_rows`` is rows − the block's start where the edge is in it, else ``block``
  (out of range: a scatter with mode="drop" ignores it, a gather clipped to block − 1 reads
  the block's last row, as the whole chunk's clipped gather of a padding edge reads row C − 1).
  Returns per_row with leaves [C, ...] and per_edge with each edge's value from its own
  block (a padding edge's from the last). block None: ``default_row_block`` of the first
  array's size; C not a multiple of block, or no block: one call.
  """
  c = arrays[0].shape[0]
  block = default_row_block(arrays[0].size) if block is None else block
  if block is None or block >= c or c % block:
    return fn(*arrays, rows)
  nb = c // block

  def one(args):
    xs, start = args
    local = rows - start
    return fn(*xs, jnp.where((local >= 0) & (local < block), local, block))

  per_row, per_edge = jax.lax.map(
      one, (tuple(a.reshape((nb, block) + a.shape[1:]) for a in arrays),
            jnp.arange(nb, dtype=rows.dtype) * block))
  owner = jnp.clip(rows // block, 0, nb - 1)
  edges = jnp.arange(rows.shape[0])
  return (jax.tree.map(lambda x: x.reshape((c,) + x.shape[2:]), per_row),
          jax.tree.map(lambda x: x[owner, edges], per_edge))
