"""Cheap token filters: scores a distillation run could gate tokens on instead of alignment.

A proxy scores one generated position from the student's and the teacher's logits there and
the token the student sampled; a higher score means "keep this token's distillation loss".
The literature's filters keep 5–50% of tokens by such a score (high student entropy, large
KL, teacher confidence) and claim to match all-token distillation; the sweep's report asks
how well each predicts ``align > 0`` (MATH.md), and ``experiments/gated_distillation.py``
trains with each. ``PROXIES`` is the one registry both read.

Shape letters (gradalign_jax/__init__.py): V vocab; ``...`` any leading axes (positions,
rows); every function broadcasts over them. Logits are raw, the temperature applied by the
caller (the student's: its policy π; the teacher's: its own T_τ, as in the final pass).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax.gradients import at_tokens, masked_log_softmax, node_covariates


@dataclasses.dataclass(frozen=True)
class Proxy:
  """One token filter: either a property of the position (one of ``gradients.COVARIATES``,
  the same for every token sampled there) or a function of the sampled token's log-probabilities
  only, so that scoring every child of a tree node costs no pass over the vocabulary beyond
  the node's own.

  name: its column / arm name (``proxy_<name>`` in tables, an arm of gated_distillation).
  doc: one line for ``--help`` and the report, saying which end is kept.
  covariate: the ``gradients.node_covariates`` entry it is (position-level), or None;
  at_token: otherwise ``(logp_t f32[...], logq_t f32[...]) → f32[...]``, from log p(t) and
    log q(t) of the sampled token t. Higher = keep.
  """
  name: str
  doc: str
  covariate: str | None = None
  at_token: Callable | None = None


PROXIES = {p.name: p for p in (
    Proxy("student_entropy", "H(p): the student's entropy at the position (high kept)",
          covariate="entropy_p"),
    Proxy("kl_pq", "KL(p‖q) at the position, the reverse-KL loss itself (high kept)",
          covariate="kl_pq"),
    Proxy("abs_p_minus_q", "|p(t) − q(t)| at the sampled token t (high kept)",
          at_token=lambda logp_t, logq_t: jnp.abs(jnp.exp(logp_t) - jnp.exp(logq_t))),
    Proxy("teacher_logprob", "log q(t), the teacher's log-probability of the sampled token "
          "(high kept: tokens the teacher endorses)",
          at_token=lambda logp_t, logq_t: logq_t),
)}


def from_terms(covariates: dict[str, jax.Array], logp_t: jax.Array,
               logq_t: jax.Array) -> dict[str, jax.Array]:
  """Every proxy from the position's ``gradients.node_covariates`` (each f32[...]) and the
  sampled token's log p(t), log q(t) (f32[...]): ``{name: f32[...]}``. The final pass
  (alignment.py) calls it with its node covariates gathered to the child edges."""
  return {name: covariates[p.covariate] if p.covariate else p.at_token(logp_t, logq_t)
          for name, p in PROXIES.items()}


def proxy_scores(student_logits: jax.Array, teacher_logits: jax.Array, tokens: jax.Array,
                 vocab_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Every proxy at every position: ``{name: f32[...]}``.

  student_logits, teacher_logits f32[..., V] (raw, temperature applied); tokens int32[...]
  the sampled ids; vocab_mask bool[V] or None.
  """
  logp = masked_log_softmax(student_logits, vocab_mask)
  logq = masked_log_softmax(teacher_logits, vocab_mask)
  return from_terms(node_covariates(student_logits, teacher_logits, vocab_mask),
                    at_tokens(logp, tokens), at_tokens(logq, tokens))


def node_proxies(edge_scores: dict[str, np.ndarray], visits: np.ndarray, groups: np.ndarray,
                 num_nodes: int) -> dict[str, np.ndarray]:
  """Each proxy's value at a tree node: its mean over the node's on-policy rollout tokens.

  A node's on-policy rollouts leave it by its children in proportion to the visits, so the
  mean is the visit-weighted mean over the children of the proxy at the child's token (a
  position-level proxy, e.g. H(p), is the same for every child and comes back unchanged).
  Shape letters as in alignment.py: E child edges. edge_scores: {name: f[E]}, ``proxy_scores``
  at each child's token; visits: int[E] on-policy visits of each edge (``TreeArrays.visits``);
  groups: int[E] the edge's node, 0 … num_nodes − 1. Returns {``proxy_<name>``:
  float64[num_nodes]}, NaN at a node no on-policy rollout left (only forced tokens).
  """
  w = np.asarray(visits, np.float64)
  g = np.asarray(groups, np.int64)
  total = np.bincount(g, weights=w, minlength=num_nodes)
  out = {}
  for name, x in edge_scores.items():
    # A zero weight must not let a non-finite score (log q of a masked token) through.
    wx = np.where(w > 0, w * np.asarray(x, np.float64), 0.0)
    s = np.bincount(g, weights=wx, minlength=num_nodes)
    out[f"proxy_{name}"] = np.where(total > 0, s / np.where(total > 0, total, 1.0), np.nan)
  return out


def top_fraction(scores: jax.Array, valid: jax.Array, fraction: float) -> jax.Array:
  """bool[...]: the ``fraction`` of the valid positions with the highest scores.

  Ties at the threshold are broken by position (the earlier kept), so exactly
  ``round(fraction · #valid)`` positions are kept. scores f32[...], valid bool[...].
  """
  return top_count(scores, valid, jnp.round(fraction * jnp.sum(valid)).astype(jnp.int32))


def top_count(scores: jax.Array, valid: jax.Array, keep_n) -> jax.Array:
  """bool[...]: the ``keep_n`` valid positions with the highest scores (every valid one if
  fewer), ties broken by position (the earlier kept). scores f32[...], valid bool[...],
  keep_n int (traced or not)."""
  flat, ok = jnp.ravel(scores), jnp.ravel(valid)
  # Invalid positions sort last; a stable argsort breaks ties by position.
  order = jnp.argsort(jnp.where(ok, -flat, jnp.inf), stable=True)
  rank = jnp.empty_like(order).at[order].set(jnp.arange(order.size))
  return ((rank < keep_n) & ok).reshape(jnp.shape(scores))
