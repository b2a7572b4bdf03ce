"""JAX's persistent compilation cache: a rerun, a resumed run and the test suite load compiled
programs from disk instead of compiling them again (on the toy models compilation is most of
the main job's time).

    from gradalign_jax import compilation
    compilation.enable()   # first thing in a script, before anything is compiled

The directory is ``$GRADALIGN_JAX_COMPILATION_CACHE``, or ``gradalign_jax/xla`` under the user
cache directory (``$XDG_CACHE_HOME``, default ``~/.cache``). Set the variable to ``off`` to
compile everything afresh (e.g. to time compilation). JAX keys each entry by the program,
the jax/jaxlib versions, the backend and the compile options, so an entry is never reused
for a different program; the directory can be deleted at any time.
"""

from __future__ import annotations

import os

ENV = "GRADALIGN_JAX_COMPILATION_CACHE"
_OFF = ("off", "0", "false", "no", "")


def cache_dir() -> str | None:
  """The directory ``enable`` would use, or None when the cache is turned off."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in _OFF else os.path.expanduser(value)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "gradalign_jax", "xla")


def enable(path: str | None = None) -> str | None:
  """Turns the persistent cache on at ``path`` (default ``cache_dir()``); returns the
  directory, or None when it is turned off. Idempotent."""
  import jax

  path = path or cache_dir()
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program is worth keeping: the toy models compile many programs of ~0.1-1 s each,
  # below JAX's default threshold of 1 s.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
