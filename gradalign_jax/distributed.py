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

    from gradalign_jax import distributed
    procs = distributed.initialize()              # first, before anything touches a device
    for group in procs.deal(groups): ...          # this process's share, same on every rerun
    procs.barrier("done")                         # every process finished its share
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence, TypeVar

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
    as any process reported a failure, TimeoutError after ``timeout_s`` (None: no limit; a
    process that dies without reporting is caught by JAX's heartbeats, which end the job).
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
      failed = _try_get(client, _FAILED)
      if failed is not None:
        raise ProcessFailed(f"{failed} (process {self.index} stopped at barrier {name!r})")
      if waiting:
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
  import jax
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
  import jax
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  procs = processes()
  _log.info("process %d of %d (coordinator %s); local devices %s", procs.index, procs.count,
            coordinator or "auto-detected", jax.local_devices())
  return procs


# ---------------------------------------------------------------------------------------
# Meshes and sharding rules: see the model-parallel half of issue 14.


__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "ProcessFailed",
           "Processes", "deal", "initialize", "processes"]
