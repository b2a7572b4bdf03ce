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

- a ``SharedPrefix`` [L, J, P, K, H]: the prompt (and, for branched rows, the source's
  generated prefix), written once and attended by the R rows of its group;
- a per-row ``KVCache`` [L, B, W, K, H] of the generated tokens: slot i of row b holds the
  token at depth ``depth0[b] + i``, RoPE position ``base_pos[b] + i``.

Every slot's RoPE position is known, so "the prefix of depth t" is a validity mask
(position < prompt_len + t) over the same buffers: branching at any depth gathers the same
amount of KV and recomputes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # qwen3 imports this module
  from gradalign_jax.models.qwen3 import Qwen3Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer keys/values written at a shared slot index.

  k, v:   [L, B, S, K, H] (model dtype), keys already rotated.
  valid:  bool[B, S], slot holds a real token of that row.
  length: int32[] slots written so far (the next write index, shared by all rows).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  length: jax.Array

  @property
  def capacity(self) -> int:
    return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefix:
  """Keys/values of J prefixes, each attended by R = B // J consecutive rows of a batch.

  k, v:  [L, J, P, K, H] (model dtype), keys already rotated.
  valid: bool[J, P], slot holds a real token of that prefix (every row of the group sees it).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array


def init_cache(cfg: Qwen3Config, batch: int, capacity: int, mesh=None) -> KVCache:
  """An empty cache for ``batch`` rows and ``capacity`` slots.

  mesh: a ``jax.sharding.Mesh`` (e.g. ``distributed.mesh_of(params)``): the cache is laid out
  on it by ``distributed.cache_sharding`` (kv heads over "model", rows over "data"), inside
  jit or outside. None: as before, no sharding.
  """
  shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  cache = KVCache(k=jnp.zeros(shape, cfg.jnp_dtype), v=jnp.zeros(shape, cfg.jnp_dtype),
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

  prefix:     SharedPrefix, k/v [L, J, P, K, H], valid bool[J, P].
  prefix_pos: int32[J, P] RoPE position of each prefix slot.
  gen:        KVCache, k/v [L, B, W, K, H], valid bool[B, W] (slot written with a real token).
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
    return self.gen.valid.shape[0] // self.prefix.valid.shape[0]


def gather_rows(cache: KVCache, rows: jax.Array) -> KVCache:
  """The cache restricted to ``rows`` (int32[B']), in that order (rows may repeat)."""
  return KVCache(k=jnp.take(cache.k, rows, axis=1), v=jnp.take(cache.v, rows, axis=1),
                 valid=jnp.take(cache.valid, rows, axis=0), length=cache.length)


def truncate(cache: KVCache, slot_pos: jax.Array, end_pos: jax.Array) -> KVCache:
  """Keeps only the slots whose position is below ``end_pos``.

  slot_pos: int32[B, S] position of each slot; end_pos: int32[B]. Nothing is moved: the
  other slots become invalid and are never attended.
  """
  valid = cache.valid & (slot_pos < end_pos[:, None])
  return dataclasses.replace(cache, valid=valid)


def gen_positions(state: RolloutState) -> jax.Array:
  """int32[B, W] RoPE position of every generated slot."""
  w = state.gen.valid.shape[1]
  return state.base_pos[:, None] + jnp.arange(w, dtype=jnp.int32)[None]


def branch_prefix(state: RolloutState, rows: jax.Array, depths: jax.Array):
  """The prefix of depth ``depths[i]`` of source row ``rows[i]``, as one shared prefix each.

  rows, depths: int32[J']. Returns (SharedPrefix [L, J', P + W, K, H], prefix_pos
  int32[J', P + W]): the source's group prefix followed by its generated slots, valid where
  the slot holds a token of the prompt or of depth < ``depths[i]``. The gathered size does
  not depend on the depth.
  """
  group = rows // state.group_size
  end = jnp.take(state.prompt_len, rows) + depths  # [J']
  pre = state.prefix
  pre_pos = jnp.take(state.prefix_pos, group, axis=0)
  gen = truncate(gather_rows(state.gen, rows), jnp.take(gen_positions(state), rows, axis=0), end)
  pre_valid = jnp.take(pre.valid, group, axis=0) & (pre_pos < end[:, None])
  k = jnp.concatenate([jnp.take(pre.k, group, axis=1), gen.k], axis=2)
  v = jnp.concatenate([jnp.take(pre.v, group, axis=1), gen.v], axis=2)
  valid = jnp.concatenate([pre_valid, gen.valid], axis=1)
  pos = jnp.concatenate([pre_pos, jnp.take(gen_positions(state), rows, axis=0)], axis=1)
  return SharedPrefix(k=k, v=v, valid=valid), pos
