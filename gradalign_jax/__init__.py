"""gradalign_jax: does a teacher's per-token distillation signal point where success lies?

Public modules (import them as submodules: ``from gradalign_jax import models, tree, ...``):
  models     Qwen3 in JAX (Flax NNX), checkpoints, tokenizers, KV cache
  tree       PrefixTree over one question's rollouts, MATH.md's bookkeeping, flat arrays
  scoring    student/teacher logits at every unique tree node, chunked; the final pass
  gradients  MATH.md's directions, alignment, covariates, (sum, count) aggregates
  exact      exact V and g* by enumeration (tiny vocabulary and horizon)
See ../shared/design/ARCHITECTURE.md and MATH.md.
"""

__version__ = "0.1.0"
