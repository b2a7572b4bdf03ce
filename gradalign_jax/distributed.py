"""Many devices and many hosts on JAX's own multi-controller runtime (``jax.distributed``).

Two sections, each usable alone:

* **Start-up and processes.** ``initialize`` starts ``jax.distributed`` from explicit
  arguments (the experiments' ``--coordinator``, ``--num_processes``, ``--process_id``), from
  ``GRADALIGN_JAX_COORDINATOR`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` (``launch/
  local_multiprocess.sh``), or from the platform (TPU VM pods, SLURM, Open MPI: JAX detects
  them); with one process it does nothing. ``Processes`` is this process's place in the job:
  ``deal`` hands it its share of the question groups, ``barrier`` waits for every process
  (and fails at once, naming the process, when another one reported a failure with
  ``report_failure``). The data-parallel layout is one question group per process at a time:
  every process computes on its own local devices and writes its own parts
  (``rundir.RunDir``), process 0 merges and reports. Results do not depend on the number of
  processes: a group's random draws are keyed by the seed and the questions' dataset
  indices (``sampling._sample_keys``), never by the process or the order groups run in.
* **Meshes and sharding rules.** A mesh with a data axis (question groups) and a model axis,
  the sharding rule of every Qwen3 parameter and KV cache, and placement at load time.
  Params placed on a mesh are all the sampler and the scorer need: they read the mesh from
  the params (``mesh_of``) and lay their KV caches out by ``cache_sharding``; XLA's SPMD
  partitioner (GSPMD) propagates the rest from the sharded inputs, so ``models.forward``,
  ``sampling.sample`` / ``branch`` and ``alignment.score_tree`` run unchanged.

    from gradalign_jax import distributed
    procs = distributed.initialize()              # first, before anything touches a device
    for group in procs.deal(groups): ...          # this process's share, same on every rerun
    procs.barrier("done")                         # every process finished its share

    mesh = distributed.make_mesh(model=8)         # ("data", "model") over local devices
    cfg, params = models.load_pretrained(path, sharding=distributed.param_sharding(mesh))
    teacher = loaded.LoadedModel("Qwen/Qwen3-8B", "bfloat16", mesh=mesh)   # the same, wrapped

Shape letters: see gradalign_jax/__init__.py. ``models.cache`` imports this module lazily
(only when a mesh is given), so nothing here may import ``gradalign_jax.models`` or anything
above it at module level.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Start-up and processes

ENV_COORDINATOR = "GRADALIGN_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "GRADALIGN_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GRADALIGN_JAX_PROCESS_ID"
_PREFIX = "gradalign_jax"  # the namespace of our keys in the coordination service
_FAILED = f"{_PREFIX}/failed"
_POLL_S = 0.25

T = TypeVar("T")


class ProcessFailed(RuntimeError):
  """Another process of the job reported a failure while this one waited for it."""


def _client():
  """The coordination service's client, or None before ``jax.distributed.initialize``.
  (Private in JAX; orbax's multi-host helpers reach it the same way.)"""
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer; unset it or give a number") from None


def _detected_cluster() -> str | None:
  """The name of a multi-process platform JAX can start from its environment (a TPU VM pod,
  a SLURM job of several tasks, an Open MPI job), or None: one process."""
  try:
    from jax._src import clusters
    envs = [e for e in clusters.ClusterEnv._cluster_types
            if not e.opt_in_only_method and e.is_env_present()]
  except Exception as e:  # private API: a JAX that moved it still runs one process
    _log.warning("could not look for a cluster environment (%s); running as one process", e)
    return None
  for env in envs:
    try:
      if env.get_process_count() > 1:
        return env.__name__
    except Exception as e:  # e.g. a TPU metadata server that does not answer
      _log.warning("%s: the process count cannot be read (%s); not using it", env.__name__, e)
  return None


@dataclasses.dataclass(frozen=True)
class Processes:
  """This process's place in a job of ``count`` processes (index 0 owns the run directory,
  merges and reports). The default is a job of one process, where every method is trivial."""
  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise ValueError(f"process index {self.index} is not in [0, {self.count}); pass "
                       "--process_id between 0 and --num_processes - 1")

  @property
  def lead(self) -> bool:
    """Process 0: takes the lock, checks the run directory, merges and writes the report."""
    return self.index == 0

  def deal(self, items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (every ``count``-th from its index): the same on
    every process and every rerun given the same list, and the shares cover the list once."""
    return deal(items, self.index, self.count)

  def barrier(self, name: str, timeout_s: float | None = None) -> None:
    """Waits until every process has reached ``barrier(name)``; raises ProcessFailed as soon
    as any process reported a failure while some are still missing, TimeoutError after
    ``timeout_s`` (None: no limit; a process that dies without reporting is caught by JAX's
    heartbeats, which end the job). Once all have arrived the barrier is passed: a failure
    reported after that (by a process already past it) is heard at the next barrier.
    Each name is used once per job."""
    if self.count == 1:
      return
    client = _client()
    if client is None:
      raise RuntimeError("Processes.barrier with count > 1 before distributed.initialize()")
    client.key_value_set(f"{_PREFIX}/barrier/{name}/{self.index}", "1")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waiting = set(range(self.count))
    while waiting:
      for i in sorted(waiting):
        if _try_get(client, f"{_PREFIX}/barrier/{name}/{i}") is not None:
          waiting.discard(i)
      if not waiting:  # everyone arrived: a failure reported since is for the next barrier
        return
      failed = _try_get(client, _FAILED)
      if failed is not None:
        raise ProcessFailed(f"{failed} (process {self.index} stopped at barrier {name!r})")
      if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"barrier {name!r}: processes {sorted(waiting)} did not arrive "
                           f"within {timeout_s} s")
      time.sleep(_POLL_S)

  def report_failure(self, message: str) -> None:
    """Tells every process waiting at a barrier that this one failed (the first report
    wins), so the job ends with this message instead of waiting for heartbeats to time out."""
    if self.count == 1 or _client() is None:
      return
    try:
      if _try_get(_client(), _FAILED) is None:
        _client().key_value_set(_FAILED, f"process {self.index} failed: {message}")
    except Exception as e:  # the coordinator may already be gone; the exit status still tells
      _log.warning("could not report the failure to the other processes: %s", e)


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # NOT_FOUND comes back as an exception
    if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
      return None
    raise


def deal(items: Sequence[T], process_index: int, process_count: int) -> list[T]:
  """Process ``process_index``'s share of ``items`` out of ``process_count``: items
  ``process_index, process_index + count, …`` (round robin, so each share holds every
  kind of item: students, early and late groups). Deal the groups still to do, so a
  restarted job spreads what is left over all its processes."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return list(items)[process_index::process_count]


def processes() -> Processes:
  """This process's place in the job (``jax.process_index()``, ``jax.process_count()``):
  one process unless ``initialize`` started a job of several."""
  if _client() is None:
    return Processes()
  return Processes(jax.process_index(), jax.process_count())


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Processes:
  """Starts ``jax.distributed`` when this process is one of several, and returns its place.

  coordinator: ``host:port`` of process 0's coordination service; num_processes: the job's
  process count; process_id: this process's index. Each falls back to its environment
  variable (``GRADALIGN_JAX_COORDINATOR``, ``_NUM_PROCESSES``, ``_PROCESS_ID``); with none
  given, JAX's own detection runs when a multi-process platform is present (a TPU VM pod,
  a SLURM job of several tasks, Open MPI); otherwise, or with ``num_processes=1``, nothing
  is started. Call it before anything touches a device. Idempotent: a second call returns
  the running job's place."""
  if _client() is not None:
    return processes()
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes} must be ≥ 1")
  if num_processes == 1:
    if process_id not in (None, 0):
      raise ValueError(f"process_id={process_id} with num_processes=1; pass process_id=0")
    return Processes()
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if not explicit:
    cluster = _detected_cluster()
    if cluster is None:
      return Processes()
    _log.info("starting jax.distributed from the %s environment", cluster)
  elif coordinator is None or num_processes is None or process_id is None:
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if _detected_cluster() is None:  # JAX could fill them in only on a known platform
      raise ValueError(f"a multi-process job needs --{', --'.join(missing)} as well (or "
                       f"${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); "
                       "launch/local_multiprocess.sh sets them")
  if process_id is not None and num_processes is not None:
    Processes(process_id, num_processes)  # checks the range
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  procs = processes()
  _log.info("process %d of %d (coordinator %s); local devices %s", procs.index, procs.count,
            coordinator or "auto-detected", jax.local_devices())
  return procs


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
# KV caches (per layer keys [B or J, K, H, S] and values [B or J, K, S, H], bool[B or J, S]
# validity, int32[B] or [J, P] positions): K over "model" when it divides (the attention of a
# head group then runs where its query heads are), rows over "data" when they divide;
# otherwise that axis is replicated (the sampler's row counts are powers of two, so for
# power-of-two meshes only a batch smaller than the data axis falls back).

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
  """The PartitionSpec of one KV-cache array (rules above), known by its rank: keys
  [B, K, H, S] and values [B, K, S, H] (K over "model", B over "data"); [B, ...] validity and positions (B over
  "data"); scalars (the write index) replicated."""
  if not shape:
    return P()
  data, model = _axis_size(mesh, DATA), _axis_size(mesh, MODEL)
  if len(shape) == 4:
    rows, heads = shape[0], shape[1]
    return P(DATA if data > 1 and rows % data == 0 else None,
             MODEL if model > 1 and heads % model == 0 else None, None, None)
  return P(DATA if data > 1 and shape[0] % data == 0 else None, *[None] * (len(shape) - 1))


def cache_sharding(mesh: Mesh, tree):
  """NamedShardings for a KV pytree (``KVCache``, ``SharedPrefix``, ``RolloutState``); the
  sampler and the scorer apply them with ``models.cache.constrain``."""
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, cache_spec(mesh, x.shape)), tree)


__all__ = ["DATA", "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "MODEL",
           "ProcessFailed", "Processes", "cache_sharding", "cache_spec", "deal", "initialize",
           "make_mesh", "mesh_of", "param_sharding", "param_shardings", "param_spec",
           "processes"]
