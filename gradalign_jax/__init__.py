"""gradalign_jax: does a teacher's per-token distillation signal point where success lies?

Public modules: ``models`` (Qwen3 in JAX). See ../shared/design/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
