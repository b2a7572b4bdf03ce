"""Every KV-cache pytree and its helpers: the model's cache, a shared prefix, rollout state.

It lives in ``models`` (the lower layer) because the model's forward reads and writes a
``KVCache`` and attends a ``SharedPrefix``, while the sampler builds on the model: in
``sampling`` it would need the model and the model would need it, a circular import.
``sampling`` re-exports ``RolloutState``.

Shape letters: see gradalign_jax/__init__.py (J prefix groups of R rows, B = J·R; P prefix
slots; W generated slots per row).

``KVCache`` writes every row at one shared slot index (``KVCache.length``); rows of
different lengths are handled by a per-slot validity mask and per-row RoPE positions, so
the cache update is a single ``dynamic_update_slice`` and decode is dense matmuls.
A ``SharedPrefix`` (e.g. a prompt's keys/values) can be attended by several consecutive
rows without copying it per row: the sampler prefills a prompt once for its G samples.

A batch of rollouts (``RolloutState``) holds two KV segments:

- a ``SharedPrefix`` (L × keys [J, K, H, P], values [J, K, P, H]): the prompt (and, for
  branched rows, the source's generated prefix), written once and attended by the rows of its
  group: R consecutive rows each after ``sample``, or the rows a ``PrefixSlots`` table names
  after ``branch`` (every request on one source row, at any depth, shares that row's prefix);
- a per-row ``KVCache`` (L × keys [B, K, H, W], values [B, K, W, H]) of the generated tokens:
  slot i of row b holds the token at depth ``depth0[b] + i``, RoPE position
  ``base_pos[b] + i``.

Every slot's RoPE position is known, so "the prefix of depth t" is a validity mask
(position < prompt_len + t) over the same buffers: branching at any depth copies the same
amount of KV (once per distinct source row, not per request) and recomputes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax.shapes import bucket

if TYPE_CHECKING:  # qwen3 imports this module
  from gradalign_jax.models.qwen3 import Qwen3Config

# The slot axis of a key buffer and of a value buffer. Keys are slot-minor, [B, K, H, S]: a
# decode step's q·k reduces over H with the slots innermost, vectorised across slots (over
# [B, K, S, H] XLA's CPU backend reduces each slot's H alone: 2.6x slower at S = 128, 14x at
# 512). Values stay slot-major, [B, K, S, H], for probs·v (a reduce over S, H innermost).
K_SLOTS, V_SLOTS = 3, 2


def map_kv(fn, k_layers, v_layers):
  """``fn(buffer, slot_axis)`` over every layer's key and value buffers: (keys, values)."""
  return (tuple(fn(x, K_SLOTS) for x in k_layers), tuple(fn(x, V_SLOTS) for x in v_layers))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer keys/values written at a shared slot index.

  k, v:   L-tuples of keys [B, K, H, S] and values [B, K, S, H] (model dtype; ``K_SLOTS``,
          ``V_SLOTS``), keys already rotated. One buffer per layer (a layer writes its own in
          place and attends it whole: no slice of an all-layer buffer materialised per step);
          head-major, so a head's slots are contiguous.
  valid:  bool[B, S], slot holds a real token of that row.
  length: int32[] slots written so far (the next write index, shared by all rows).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  length: jax.Array

  @property
  def capacity(self) -> int:
    return self.v[0].shape[V_SLOTS]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixSlots:
  """Which batch rows attend which prefix, when they are not J equal runs of rows.

  Prefix j is attended by the rows in its R slots (R: the most rows one prefix has). The
  model gathers those rows' queries into this [J, R] layout and their scores back, so the
  prefix KV is read in place, never copied per row (XLA materialises a gather of keys).

  rows: int32[J, R] batch row in each slot (an empty slot names row 0 and has cut 0).
  cut:  int32[J, R] the slot's row sees the prefix's valid slots before index ``cut`` (its
        depth: along a prefix row the valid slots' positions increase).
  slot: int32[B] flat slot (j·R + r) of each batch row.
  """
  rows: jax.Array
  cut: jax.Array
  slot: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefix:
  """Keys/values of J prefixes, each attended by R = B // J consecutive rows of a batch, or
  by the rows ``slots`` names.

  k, v:  L-tuples of keys [J, K, H, P] and values [J, K, P, H] (model dtype), keys already
         rotated.
  valid: bool[J, P], slot holds a real token of that prefix (every row of the group sees it,
         up to its ``slots.cut``).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  slots: PrefixSlots | None = None

  def visible(self) -> jax.Array:
    """bool[J, R, P]: the prefix slots each slot's row sees (R = 1 without ``slots``)."""
    if self.slots is None:
      return self.valid[:, None]
    p = self.valid.shape[1]
    return self.valid[:, None] & (jnp.arange(p, dtype=jnp.int32) < self.slots.cut[..., None])


def init_cache(cfg: Qwen3Config, batch: int, capacity: int, mesh=None) -> KVCache:
  """An empty cache for ``batch`` rows and ``capacity`` slots.

  mesh: a ``jax.sharding.Mesh`` (e.g. ``distributed.mesh_of(params)``): the cache is laid out
  on it by ``distributed.cache_sharding`` (kv heads over "model", rows over "data"), inside
  jit or outside. None: as before, no sharding.
  """
  zeros = lambda shape: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
  heads, dim = cfg.num_kv_heads, cfg.head_dim
  cache = KVCache(k=zeros((batch, heads, dim, capacity)), v=zeros((batch, heads, capacity, dim)),
                  valid=jnp.zeros((batch, capacity), bool), length=jnp.zeros((), jnp.int32))
  return constrain(mesh, cache)


def constrain(mesh, tree):
  """A KV pytree (KVCache, SharedPrefix, RolloutState) laid out on ``mesh`` by
  ``distributed.cache_sharding``; unchanged when ``mesh`` is None."""
  if mesh is None:
    return tree
  from gradalign_jax import distributed  # imported here: models is the lower layer
  # a constraint inside jit, a placement outside
  return jax.lax.with_sharding_constraint(tree, distributed.cache_sharding(mesh, tree))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutState:
  """Device-side KV of a batch of rollouts (padding rows included; real rows come first).

  prefix:     SharedPrefix, k/v L × [J, K, H, P] / [J, K, P, H], valid bool[J, P]:
              R = B // J consecutive rows each after ``sample``; one per distinct source row,
              with ``PrefixSlots`` naming its rows, after ``branch``.
  prefix_pos: int32[J, P] RoPE position of each prefix slot.
  gen:        KVCache, k/v L × [B, K, H, W] / [B, K, W, H], valid bool[B, W] (slot written
              with a real token).
  base_pos:   int32[B] position of generated slot 0 (= prompt_len + depth0).
  prompt_len: int32[B] prompt tokens of the row's question (positions 0 … prompt_len - 1).
  """
  prefix: SharedPrefix
  prefix_pos: jax.Array
  gen: KVCache
  base_pos: jax.Array
  prompt_len: jax.Array

  @property
  def group_size(self) -> int:
    """R, the rows per prefix (a prefix without ``PrefixSlots``)."""
    return self.gen.valid.shape[0] // self.prefix.valid.shape[0]


def gather_rows(cache: KVCache, rows: jax.Array) -> KVCache:
  """The cache restricted to ``rows`` (int32[B']), in that order (rows may repeat)."""
  take = lambda layers: tuple(jnp.take(x, rows, axis=0) for x in layers)
  return KVCache(k=take(cache.k), v=take(cache.v),
                 valid=jnp.take(cache.valid, rows, axis=0), length=cache.length)


def gen_positions(state: RolloutState) -> jax.Array:
  """int32[B, W] RoPE position of every generated slot."""
  w = state.gen.valid.shape[1]
  return state.base_pos[:, None] + jnp.arange(w, dtype=jnp.int32)[None]


def row_prefix(state: RolloutState, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The prefix each of ``rows`` (int32[B']) attends, and the prefix slots it sees:
  (int32[B'] index into the prefix's J, bool[B', P])."""
  pre = state.prefix
  if pre.slots is None:
    j = rows // state.group_size
    return j, jnp.take(pre.valid, j, axis=0)
  flat = jnp.take(pre.slots.slot, rows)
  j = flat // pre.slots.rows.shape[1]
  seen = jnp.take(pre.visible().reshape(-1, pre.valid.shape[1]), flat, axis=0)
  return j, seen


class SlotLayout(NamedTuple):
  """Where each branch row sits among the rows on its source (``branch_prefix``'s plan,
  host numpy, from ``slot_layout``).

  sources:    int32[J'] the distinct source rows (J' bucketed; padding repeats the first).
  slot_rows:  int32[J', R] the new batch's row in each slot (R = M × the most requests on
              one source, bucketed).
  slot_depth: int32[J', R] that row's branch depth (-1: empty slot).
  row_slot:   int32[B'] each new row's flat slot j·R + r (padding rows: slot 0).
  """
  sources: np.ndarray
  slot_rows: np.ndarray
  slot_depth: np.ndarray
  row_slot: np.ndarray


def slot_layout(rows: np.ndarray, depths: np.ndarray, m: int, n_rows: int) -> SlotLayout:
  """The layout of N branch requests (source ``rows``, ``depths``: int[N]) of M rows each,
  request i's rows i·M … i·M + M − 1 of a batch of ``n_rows``."""
  sources, which = np.unique(rows, return_inverse=True)
  rank = np.zeros(len(rows), np.int64)  # the request's index among those on its source
  taken = np.zeros(len(sources), np.int64)
  for i, j in enumerate(which):
    rank[i], taken[j] = taken[j], taken[j] + 1
  width = bucket(int(taken.max())) * m
  slot_rows = np.zeros((bucket(len(sources)), width), np.int32)
  slot_depth = np.full(slot_rows.shape, -1, np.int32)
  row_slot = np.zeros(n_rows, np.int32)
  for i, (j, r) in enumerate(zip(which, rank)):
    cols = r * m + np.arange(m)
    slot_rows[j, cols] = i * m + np.arange(m)
    slot_depth[j, cols] = depths[i]
    row_slot[i * m:(i + 1) * m] = j * width + cols
  padded = np.concatenate([sources, np.full(len(slot_rows) - len(sources), sources[0])])
  return SlotLayout(padded.astype(np.int32), slot_rows, slot_depth, row_slot)


def branch_prefix(state: RolloutState, layout: SlotLayout):
  """One shared prefix per distinct source row, attended by every branch row on it.

  layout: ``slot_layout`` of the requests. Returns (SharedPrefix L × [J', K, ·, ·] over P + W
  slots with its ``PrefixSlots``, prefix_pos int32[J', P + W]): each source's view of its own
  prefix followed by its generated slots; a slot's row sees the ones at positions
  < prompt_len + its depth. The size depends on the distinct sources, not on the requests or their depths.
  """
  sources, slot_rows, slot_depth, row_slot = layout
  j, seen = row_prefix(state, sources)
  pre = state.prefix
  gen_pos = jnp.take(gen_positions(state), sources, axis=0)
  join = lambda prompt, gen, axis: tuple(  # per layer, P + W slots
      jnp.concatenate([jnp.take(p, j, axis=0), jnp.take(g, sources, axis=0)], axis=axis)
      for p, g in zip(prompt, gen))
  k, v = join(pre.k, state.gen.k, K_SLOTS), join(pre.v, state.gen.v, V_SLOTS)
  valid = jnp.concatenate([seen, jnp.take(state.gen.valid, sources, axis=0)], axis=1)
  pos = jnp.concatenate([jnp.take(state.prefix_pos, j, axis=0), gen_pos], axis=1)
  end = jnp.take(state.prompt_len, sources)[:, None] + slot_depth  # [J', R]
  # The valid slots' positions increase along a row: a row sees those before the first
  # valid slot at or past its end.
  beyond = valid[:, None] & (pos[:, None] >= end[..., None])  # [J', R, P + W]
  cut = jnp.where(jnp.any(beyond, -1), jnp.argmax(beyond, -1), pos.shape[1]).astype(jnp.int32)
  cut = jnp.where(slot_depth >= 0, cut, 0)
  slots = PrefixSlots(rows=slot_rows, cut=cut, slot=row_slot)
  return SharedPrefix(k=k, v=v, valid=valid, slots=slots), pos
