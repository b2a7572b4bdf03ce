"""Many devices and many hosts on JAX's own runtime: start-up, meshes, sharding rules.

    mesh = distributed.make_mesh(model=8)                  # ("data", "model") over local devices
    cfg, params = models.load_pretrained(path, sharding=distributed.param_sharding(mesh))
    teacher = loaded.LoadedModel("Qwen/Qwen3-8B", "bfloat16", mesh=mesh)   # the same, wrapped

Params placed on a mesh are all the sampler and the scorer need: they read the mesh from the
params (``mesh_of``) and lay their KV caches out by ``cache_sharding``; XLA's SPMD partitioner
(GSPMD) propagates the rest from the sharded inputs, so ``models.forward``, ``sampling.sample``
/ ``branch`` and ``alignment.score_tree`` run unchanged. Shape letters: see
gradalign_jax/__init__.py.

Note for whoever extends this module: ``models.cache`` imports it lazily (only when a mesh is
given), so nothing here may import ``gradalign_jax.models`` or anything above it at module level.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"


# ---------------------------------------------------------------------------------------
# Meshes and sharding rules
#
# Tensor parallelism over "model", Megatron style, so that each layer needs two all-reduces
# (after o_proj and after down_proj) and no weight is ever gathered:
#   q_proj [N, H, D], k_proj / v_proj [K, H, D] and their biases: split over heads (N or K);
#   o_proj [D, N, H]: split over its input heads N (its partial sums are all-reduced);
#   gate_proj / up_proj [F, D]: split over F; down_proj [D, F]: over its input F;
#   embed_tokens and lm_head [V, D]: split over the vocabulary V (vocab-parallel). V and not
#     D because the head's logits then come out split over V with no reduction over D, and an
#     embedding split over V is a masked lookup plus one all-reduce; splitting D would leave
#     activations split over D, which every RMSNorm must gather. Tied models share one array.
#   norms (q_norm, k_norm [H], layer norms [D]) and o_bias [D]: replicated (tiny).
# Every weight is replicated over "data" (data parallelism over question rows).
# Fallback: a dimension the "model" axis does not divide is not split; the tensor is
#   replicated over "model" and a warning names it. For K kv heads fewer than the axis (e.g.
#   K = 8 on a model axis of 16) k_proj / v_proj and the KV cache are replicated, as in
#   Megatron: each device computes every kv head (a small projection) next to its share of
#   the query heads. Splitting K·H over head_dim instead would put a gather inside q/k
#   RMSNorm and RoPE (both read the whole head) at every layer. Qwen3-0.6B, 1.7B and 8B
#   (shapes in benchmarks/) have K = 8, N ≥ 16, F and V divisible by 8: with model ≤ 8
#   everything is split.
#
# KV caches ([L, B or J, S, K, H] keys and values, bool[B or J, S] validity, int32[B] or
# [J, P] positions): K over "model" when it divides (the attention of a head group then runs
# where its query heads are), rows over "data" when they divide; otherwise that axis is
# replicated (the sampler's row counts are powers of two, so for power-of-two meshes only a
# batch smaller than the data axis falls back).

# the axis of each weight split over "model" (by the last part of its path); absent: replicated
_SPLIT_AXIS = {
    "embed_tokens": 0, "lm_head": 0,  # [V, D]
    "q_proj": 0, "k_proj": 0, "v_proj": 0,  # [N or K, H, D]
    "q_bias": 0, "k_bias": 0, "v_bias": 0,  # [N or K, H]
    "o_proj": 1,  # [D, N, H]
    "gate_proj": 0, "up_proj": 0,  # [F, D]
    "down_proj": 1,  # [D, F]
}
_SPLIT_WHAT = {"embed_tokens": "vocabulary rows", "lm_head": "vocabulary rows",
               "k_proj": "kv heads", "v_proj": "kv heads", "k_bias": "kv heads",
               "v_bias": "kv heads", "q_proj": "query heads", "q_bias": "query heads",
               "o_proj": "query heads", "gate_proj": "MLP rows (F)", "up_proj": "MLP rows (F)",
               "down_proj": "MLP columns (F)"}
_warned: set = set()


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "model") mesh of ``data × model`` devices.

  devices: default this process's devices (``jax.local_devices()``): question groups are
  dealt to processes, so a model is sharded over one host's chips and every array the
  library reads back on the host is addressable there. data: default ``len(devices) //
  model``. Neighbouring devices (on TPU, by the physical topology) share a model group.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if model < 1 or (data is not None and data < 1):
    raise ValueError(f"mesh axes must be ≥ 1 (got data={data}, model={model})")
  if data is None:
    if len(devices) % model:
      raise ValueError(f"model={model} does not divide the {len(devices)} devices; pick a "
                       f"model axis that divides {len(devices)} or pass devices=")
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"a mesh of data={data} × model={model} needs {data * model} devices but "
                     f"{len(devices)} are given; pass data=None to use them all, or devices=")
  from jax.experimental import mesh_utils
  grid = mesh_utils.create_device_mesh((data, model), devices=devices)
  return Mesh(grid, (DATA, MODEL))


def _axis_size(mesh: Mesh, name: str) -> int:
  return dict(mesh.shape).get(name, 1)  # a Mesh or an AbstractMesh


def _warn_once(key, message: str) -> None:
  if key not in _warned:
    _warned.add(key)
    _log.warning(message)


def param_spec(parts: tuple, shape: tuple, model_size: int) -> P:
  """The PartitionSpec of one Qwen3 parameter (rules above), on a "model" axis of
  ``model_size`` devices. parts: the parameter's path, e.g. ('layers', 3, 'self_attn',
  'k_proj') as ``load_pretrained`` passes it; shape: its shape in this package's layout."""
  name = parts[-1]
  axis = _SPLIT_AXIS.get(name)
  if axis is None or model_size == 1:
    return P()
  if shape[axis] % model_size:
    _warn_once((name, shape[axis], model_size),
               f"{name} {list(shape)}: its {shape[axis]} {_SPLIT_WHAT[name]} do not split "
               f"evenly over model={model_size}; replicated over the model axis (every device "
               f"holds it whole)")
    return P()
  spec = [None] * len(shape)
  spec[axis] = MODEL
  return P(*spec)


def param_sharding(mesh: Mesh) -> Callable[[tuple, tuple], NamedSharding]:
  """``f(param_path, shape) -> NamedSharding`` for ``models.load_pretrained(sharding=f)``:
  each checkpoint tensor is read into its shards directly. The rules need only each
  parameter's name and shape, so no config is needed before loading."""
  model_size = _axis_size(mesh, MODEL)
  return lambda parts, shape: NamedSharding(mesh, param_spec(tuple(parts), tuple(shape),
                                                             model_size))


def param_shardings(mesh: Mesh, params):
  """The NamedSharding of every leaf of a params pytree (arrays or ShapeDtypeStructs), e.g.
  ``jax.device_put(params, param_shardings(mesh, params))`` to shard params already loaded."""
  from gradalign_jax.models.checkpoint import param_path  # models imports this module lazily
  place = param_sharding(mesh)
  return jax.tree_util.tree_map_with_path(lambda p, x: place(param_path(p), x.shape), params)


def mesh_of(params) -> Mesh | None:
  """The mesh the params are laid out on (a ``NamedSharding``'s), or None for params on one
  device. The sampler and the scorer lay their caches out on it."""
  for leaf in jax.tree_util.tree_leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def cache_spec(mesh: Mesh, shape: tuple) -> P:
  """The PartitionSpec of one KV-cache array (rules above), known by its rank: [L, B, S, K, H]
  keys/values (K over "model", B over "data"); [B, ...] validity and positions (B over
  "data"); scalars (the write index) replicated."""
  if not shape:
    return P()
  data, model = _axis_size(mesh, DATA), _axis_size(mesh, MODEL)
  if len(shape) == 5:
    rows, heads = shape[1], shape[3]
    return P(None, DATA if data > 1 and rows % data == 0 else None, None,
             MODEL if model > 1 and heads % model == 0 else None, None)
  return P(DATA if data > 1 and shape[0] % data == 0 else None, *[None] * (len(shape) - 1))


def cache_sharding(mesh: Mesh, tree):
  """NamedShardings for a KV pytree (``KVCache``, ``SharedPrefix``, ``RolloutState``); the
  sampler and the scorer apply them with ``models.cache.constrain``."""
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, cache_spec(mesh, x.shape)), tree)


__all__ = ["DATA", "MODEL", "cache_sharding", "cache_spec", "make_mesh",
           "mesh_of", "param_sharding", "param_shardings", "param_spec"]
