"""gradalign_jax: does a teacher's per-token distillation signal point where success lies?

Public modules (import them as submodules: ``from gradalign_jax import models, tree, ...``):
  pipeline   the diagnostic for a group of questions end to end (``pipeline.diagnose``)
  models     Qwen3 in JAX (Flax NNX), checkpoints, tokenizers, KV cache, loaded models
  sampling   the student's batched sampler and branching
  tree       PrefixTree over one question's rollouts, MATH.md's bookkeeping, flat arrays
  scoring    student/teacher logits at every unique tree node, chunked
  alignment  the final pass: ĝ*, every direction, cosines, covariates per node
  gradients  MATH.md's directions (the one registry), alignment, covariates
  targeted   targeted rollouts: depth windows, priorities, budget
  contexts   teacher specs, demonstrations, summaries, their prompts
  tasks      loaders, prompts, verifiers; the synthetic toy task
  analysis   tables (schemas, aggregates), statistics, report, plots, token view
  rundir     a run directory: settings check, atomic per-question parts, resume, merge
  compilation  JAX's persistent compilation cache (``compilation.enable()``)
  distributed  jax.distributed start-up, this process's share of a job, barriers
  exact      exact V and g* by enumeration (tiny vocabulary and horizon)
See ../shared/design/ARCHITECTURE.md and MATH.md.

Shape letters, used in docstrings, comments and einsum strings. A letter means one thing
across the package; add a new one here rather than reuse one. A prime is another count of
the same kind (B' gathered rows, J' branch requests).

  Model:   B batch rows, T query tokens (this call's chunk), S key/cache slots, D model dim,
           F MLP dim, V vocab, L layers, N query heads, K kv heads, H head dim,
           A query heads per kv head (N = K·A), X heads and head dim flattened (N·H or K·H).
  Cache:   P prefix slots (a prompt, or a prompt and a source rollout's tokens), J prefix
           groups, R rows per prefix group (B = J·R), W generated slots per row.
  Sampler: Z blocks of the vocabulary in the two-level inverse-CDF draw.
  Tree:    U nodes, E edges, C nodes per chunk, G rollouts per question, M continuations per
           targeted pair, Q questions, Y candidate tokens kept per node, I chosen (node, token)
           pairs.
"""

__version__ = "0.1.0"
