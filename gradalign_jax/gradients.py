"""Logit-space directions of MATH.md, their registry, alignment and node covariates.

Shape letters (gradalign_jax/__init__.py): V vocab, C nodes of a chunk; ``...`` any leading
axes (every function broadcasts over them and reduces over the last, vocab, axis).

Conventions (MATH.md is the contract):
  * logits are raw: the caller applies the sampling temperature;
  * every ``*_direction`` returns the *descent* direction ``d = −∇_z L`` of its loss, and
    ``ideal_direction`` the *ascent* direction ``ĝ* = ∇_z V`` estimated from the tree;
  * ``vocab_mask`` bool[V] (or broadcastable to the logits) marks real vocabulary rows;
    masked rows are excluded from every softmax (a large negative logit, not −inf, so
    |logits| ~ 1e4 stay NaN-free) and come back exactly 0 in every direction;
  * all arithmetic is fp32.

The closed forms below are checked against ``jax.grad`` of independently written losses in
tests/test_gradients.py. ``DIRECTIONS`` is the one registry of directions; the final pass
(``alignment.py``) computes every registry entry over a chunk of nodes. Where a node is nearly
deterministic (one token with p ≈ 1 − 1e-8) the plain forms subtract nearly equal numbers;
every direction is computed in a form that does not (``_centered``, ``_zero_sum_at_mode``)
and is checked against a float64 reference there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

# exp(MASKED_LOGIT - anything real) is exactly 0 in fp32, and MASKED_LOGIT - 1e4 is finite.
MASKED_LOGIT = -1e30


def _mask_like(logits: jax.Array, vocab_mask: jax.Array | None) -> jax.Array:
  if vocab_mask is None:
    return jnp.ones(logits.shape, bool)
  return jnp.broadcast_to(jnp.asarray(vocab_mask, bool), logits.shape)


def masked_log_softmax(logits: jax.Array, vocab_mask: jax.Array | None = None) -> jax.Array:
  """log softmax over the unmasked rows of the last axis; masked rows get MASKED_LOGIT.

  logits: float[..., V]; vocab_mask: bool[V] or broadcastable, None = all rows real.
  Returns f32[..., V]. The one softmax helper of the package (scoring and exact use it too).
  """
  z = jnp.asarray(logits, jnp.float32)
  mask = _mask_like(z, vocab_mask)
  z = jnp.where(mask, z, MASKED_LOGIT)
  logp = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  logp = logp - jnp.log(jnp.sum(jnp.exp(logp), axis=-1, keepdims=True))
  return jnp.where(mask, logp, MASKED_LOGIT)


def masked_softmax(logits: jax.Array, vocab_mask: jax.Array | None = None) -> jax.Array:
  """softmax over the unmasked rows of the last axis; masked rows are exactly 0. f32[..., V]."""
  return jnp.where(_mask_like(jnp.asarray(logits), vocab_mask),
                   jnp.exp(masked_log_softmax(logits, vocab_mask)), 0.0)


def kl_pq(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(p‖q) = Σ p (log p − log q) over the last axis, from log-probabilities f32[..., V]
  (``masked_log_softmax``'s: a masked row is MASKED_LOGIT in both) → f32[...].

  A row with p = 0 (masked, or underflowed) adds exactly 0, value and gradient: ``where``, not
  a multiply, since its log ratio may be 0 · ∞. The one KL(p‖q) of the package (the
  ``kl_pq`` covariate and the distillation loss)."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def at_tokens(x: jax.Array, tokens) -> jax.Array:
  """x[..., tokens[...]]: each position's entry of its token, x f32[..., V], tokens int[...]
  → f32[...] (e.g. log p(t) of the sampled token t)."""
  return jnp.take_along_axis(x, jnp.asarray(tokens, jnp.int32)[..., None], axis=-1)[..., 0]


def _log_ratio(student_logits, teacher_logits, vocab_mask):
  """p, q and ℓ = log p − log q (0 on masked rows)."""
  mask = _mask_like(jnp.asarray(student_logits), vocab_mask)
  logp = masked_log_softmax(student_logits, mask)
  logq = masked_log_softmax(teacher_logits, mask)
  p = jnp.where(mask, jnp.exp(logp), 0.0)
  q = jnp.where(mask, jnp.exp(logq), 0.0)
  return p, q, jnp.where(mask, logp - logq, 0.0), mask


def mode_index(weights: jax.Array) -> jax.Array:
  """int32[..., 1]: the first index of the largest of ``weights`` over the last axis, as
  ``jnp.argmax`` (a row holding NaN gives the last index instead of the first NaN's).

  A max and then the smallest index equal to it: two plain reductions, which XLA's CPU
  backend vectorises; argmax is one variadic reduce that it does not (2× slower over
  [16, 151,936] rows, and the final pass takes one per direction family per block).
  """
  v = weights.shape[-1]
  top = jnp.max(weights, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(weights == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1,
                  keepdims=True)
  return jnp.minimum(first, v - 1)


def _at_mode(x, weights):
  """x at the argmax of ``weights`` over the last axis, keeping that axis: [..., 1]."""
  m = mode_index(weights)
  return jnp.take_along_axis(x, m, axis=-1), m


def _centered(p, a):
  """p ⊙ (a − Σ p a): the softmax Jacobian applied to a (∂/∂z of Σ_k p_k a_k at fixed a).

  Computed around the mode m of p, a − Σ p a = (a − a_m) − Σ_i p_i (a_i − a_m): the mode's
  term is exactly 0 and the rest are small weights times O(1) differences, so a node where
  p_m ≈ 1 − 1e-8 keeps its digits (the plain form subtracts two nearly equal numbers; MATH.md).
  """
  a_m, _ = _at_mode(a, p)
  diff = a - a_m
  return p * (diff - jnp.sum(p * diff, axis=-1, keepdims=True))


def _zero_sum_at_mode(d, p):
  """d with its entry at the mode of p replaced by −Σ of the others.

  Every direction of a softmax is a gradient in logit space and sums to 0; the other entries
  are computed without cancellation, the mode's (where p ≈ 1) is not, so it is recovered
  from them.
  """
  _, m = _at_mode(d, p)
  is_mode = jnp.arange(d.shape[-1]) == m
  rest = jnp.sum(jnp.where(is_mode, 0.0, d), axis=-1, keepdims=True)
  return jnp.where(is_mode, -rest, d)


# ---------------------------------------------------------------------------------------
# Directions


def ideal_direction(student_logits, q_hat, observed, vocab_mask=None) -> jax.Array:
  """ĝ*_j = π_j (Q̂_j − V̂) on observed children j, else 0 (ascent direction of V).

  student_logits: f32[..., V]; q_hat: f32[..., V] (success rate of each child, ignored where
  not observed); observed: bool[..., V] (n_k > 0). V̂ = Σ_O π Q̂ / Σ_O π is the policy's
  average over the observed children only (a softmax restricted to O, exact when the
  observed children have tiny probability), and Q̂_j − V̂ is taken in MATH.md's stable form
  around the mode m of O: (Q̂_j − Q̂_m) − Σ_{i∈O} π̃_i (Q̂_i − Q̂_m). Returns f32[..., V].
  """
  z = jnp.asarray(student_logits, jnp.float32)
  mask = _mask_like(z, vocab_mask)
  obs = mask & jnp.broadcast_to(jnp.asarray(observed, bool), z.shape)
  q_hat = jnp.where(obs, jnp.asarray(q_hat, jnp.float32), 0.0)
  pi = masked_softmax(z, mask)
  pi_o = masked_softmax(z, obs)
  q_m, _ = _at_mode(q_hat, pi_o)
  diff = jnp.where(obs, q_hat - q_m, 0.0)
  centered = diff - jnp.sum(pi_o * diff, axis=-1, keepdims=True)
  any_obs = jnp.any(obs, axis=-1, keepdims=True)
  return jnp.where(obs & any_obs, pi * centered, 0.0)


def reverse_kl_direction(student_logits, teacher_logits, vocab_mask=None) -> jax.Array:
  """−∇_z KL(p‖q) = −p_j (ℓ_j − ℓ̄). Logits f32[..., V] → f32[..., V]."""
  p, _, ell, mask = _log_ratio(student_logits, teacher_logits, vocab_mask)
  return jnp.where(mask, -_centered(p, ell), 0.0)


def forward_kl_direction(student_logits, teacher_logits, vocab_mask=None) -> jax.Array:
  """−∇_z KL(q‖p) = q_j − p_j (at p's mode, −Σ of the others). f32[..., V] → f32[..., V]."""
  p, q, _, mask = _log_ratio(student_logits, teacher_logits, vocab_mask)
  return _zero_sum_at_mode(jnp.where(mask, q - p, 0.0), p)


def jsd_direction(student_logits, teacher_logits, beta, vocab_mask=None) -> jax.Array:
  """−∇_z of β KL(q‖m) + (1−β) KL(p‖m), m = βq + (1−β)p (GKD's generalised JSD).

  Closed form: ∂L/∂p_k = (1−β) log(p_k/m_k), hence d = −(1−β) p ⊙ (a − Σ p a), a = log p − log m.
  (β = 0 or 1 makes the loss identically 0, and d = 0.) beta: float scalar or f32[...].
  """
  beta = jnp.asarray(beta, jnp.float32)
  beta = beta[..., None] if beta.ndim else beta
  mask = _mask_like(jnp.asarray(student_logits), vocab_mask)
  logp = masked_log_softmax(student_logits, mask)
  logq = masked_log_softmax(teacher_logits, mask)
  # log m as a logaddexp of the two weighted logs: exact when p or q underflows.
  logm = jnp.logaddexp(jnp.log(beta) + logq, jnp.log1p(-beta) + logp)
  p = jnp.where(mask, jnp.exp(logp), 0.0)
  a = jnp.where(mask & (p > 0), logp - logm, 0.0)
  return jnp.where(mask, -(1.0 - beta) * _centered(p, a), 0.0)


def topk_reverse_kl_direction(student_logits, teacher_logits, k: int,
                              stop_grad_normaliser: bool = False, vocab_mask=None) -> jax.Array:
  """−∇_z of the reverse KL restricted to the student's top-k support S, renormalised.

  p̃ = p_S / P_S, q̃ = q_S / Q_S, L = Σ_S p̃ (log p̃ − log q̃), ℓ̃ = log p̃ − log q̃.
  Without stop-gradient p̃ = softmax(z_S): d_j = −p̃_j (ℓ̃_j − Σ_S p̃ ℓ̃) on S, 0 elsewhere.
  With ``stop_grad_normaliser`` P_S is a constant: d_j = p_j (Σ_S p̃ ℓ̃ + 1) − [j∈S] p̃_j (ℓ̃_j + 1),
  which reaches every unmasked row, not only S. k: static int (clipped to V); ties broken by
  lower index (``lax.top_k``). Logits f32[..., V] → f32[..., V].
  """
  z = jnp.asarray(student_logits, jnp.float32)
  mask = _mask_like(z, vocab_mask)
  k = min(int(k), z.shape[-1])
  zm = jnp.where(mask, z, MASKED_LOGIT)
  _, idx = jax.lax.top_k(zm, k)
  support = jnp.put_along_axis(jnp.zeros(z.shape, bool), idx, True, axis=-1, inplace=False)
  support = support & mask  # k larger than the unmasked rows picks masked ones: drop them
  logp_s = masked_log_softmax(z, support)
  logq_s = masked_log_softmax(teacher_logits, support)
  p_s = jnp.where(support, jnp.exp(logp_s), 0.0)
  ell = jnp.where(support, logp_s - logq_s, 0.0)
  centered = _centered(p_s, ell)  # p̃ ⊙ (ℓ̃ − ℓ̄), stable at a near-deterministic node
  if not stop_grad_normaliser:
    return jnp.where(support, -centered, 0.0)
  # On S, p_j (ℓ̄ + 1) − p̃_j (ℓ̃_j + 1) = −P_S p̃_j (ℓ̃_j − ℓ̄) − p̃_j (1 − P_S)(ℓ̃_j + 1), with
  # 1 − P_S summed over the rows outside S: no difference of nearly equal numbers.
  p = masked_softmax(z, mask)
  outside = jnp.sum(jnp.where(support, 0.0, p), axis=-1, keepdims=True)
  ell_bar = jnp.sum(p_s * ell, axis=-1, keepdims=True)
  on_s = -(1.0 - outside) * centered - p_s * outside * (ell + 1.0)
  return jnp.where(support, on_s, jnp.where(mask, p * (ell_bar + 1.0), 0.0))


def single_sample_direction(student_logits, teacher_logits, visit_freq,
                            vocab_mask=None) -> jax.Array:
  """−∇_z E_{y~w}[sg(ℓ_y) log p_y] = Σ_k w_k (−ℓ_k)(e_k − p).

  visit_freq: f32[..., V], the on-policy visit frequencies w of the children (sum to 1 over
  visited children; pass counts / total). With w = p this is exactly ``reverse_kl_direction``.
  """
  p, _, ell, mask = _log_ratio(student_logits, teacher_logits, vocab_mask)
  w = jnp.where(mask, jnp.asarray(visit_freq, jnp.float32), 0.0)
  d = jnp.where(mask, -w * ell + p * jnp.sum(w * ell, axis=-1, keepdims=True), 0.0)
  return _zero_sum_at_mode(d, p)


def minillm_direction(student_logits, teacher_logits, visit_freq, future_reward,
                      vocab_mask=None) -> jax.Array:
  """−p(ℓ − ℓ̄) + Σ_k w_k R̄_k (e_k − p): single-step reverse KL plus the long-term term.

  visit_freq: f32[..., V] as in ``single_sample_direction``; future_reward: f32[..., V], R̄_k
  the mean over rollouts through u·k of the length-normalised future reward (MATH.md).
  """
  p, _, ell, mask = _log_ratio(student_logits, teacher_logits, vocab_mask)
  w = jnp.where(mask, jnp.asarray(visit_freq, jnp.float32), 0.0)
  wr = w * jnp.where(mask, jnp.asarray(future_reward, jnp.float32), 0.0)
  long_term = _zero_sum_at_mode(wr - p * jnp.sum(wr, axis=-1, keepdims=True), p)
  return jnp.where(mask, -_centered(p, ell) + long_term, 0.0)


# ---------------------------------------------------------------------------------------
# Alignment, covariates


def alignment(a, b) -> jax.Array:
  """cos(a, b) over the last axis; 0 where either norm is 0, NaN (never 0) where either
  vector holds a NaN or Inf. f32[..., V] × 2 → f32[...]."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  finite = jnp.all(jnp.isfinite(a), axis=-1) & jnp.all(jnp.isfinite(b), axis=-1)
  # Scale each vector by its max-abs first: squares of |x| ~ 1e20 would overflow fp32.
  sa = jnp.max(jnp.abs(a), axis=-1, keepdims=True)
  sb = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
  a = a / jnp.where(sa > 0, sa, 1.0)
  b = b / jnp.where(sb > 0, sb, 1.0)
  na = jnp.sqrt(jnp.sum(a * a, axis=-1))
  nb = jnp.sqrt(jnp.sum(b * b, axis=-1))
  ok = (na > 0) & (nb > 0)
  cos = jnp.where(ok, jnp.sum(a * b, axis=-1) / jnp.where(ok, na * nb, 1.0), 0.0)
  return jnp.where(finite, cos, jnp.nan)


COVARIATES = ("kl_pq", "kl_qp", "l2_pq", "cos_pq", "entropy_p", "entropy_q")


def node_covariates(student_logits, teacher_logits, vocab_mask=None) -> dict[str, jax.Array]:
  """KL(p‖q), KL(q‖p), ‖p−q‖₂, cos(p,q), H(p), H(q) over the last axis (each f32[...]);
  keys: COVARIATES, in that order."""
  mask = _mask_like(jnp.asarray(student_logits), vocab_mask)
  logp = masked_log_softmax(student_logits, mask)
  logq = masked_log_softmax(teacher_logits, mask)
  p = jnp.where(mask, jnp.exp(logp), 0.0)
  q = jnp.where(mask, jnp.exp(logq), 0.0)
  ell = jnp.where(mask, logp - logq, 0.0)
  # p·logp with p = 0 is 0 (where, not multiply: logp may be MASKED_LOGIT).
  return {
      "kl_pq": kl_pq(logp, logq),
      "kl_qp": jnp.sum(jnp.where(q > 0, -q * ell, 0.0), axis=-1),
      "l2_pq": jnp.sqrt(jnp.sum((p - q) ** 2, axis=-1)),
      "cos_pq": alignment(p, q),
      "entropy_p": -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1),
      "entropy_q": -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1),
  }


# ---------------------------------------------------------------------------------------
# The registry of directions: scoring, the tables, targeting and the report all read it, so
# adding a direction touches this one place.


@dataclasses.dataclass(frozen=True)
class Direction:
  """One distillation direction of MATH.md's table.

  name: its column suffix (``align_<name>``, ``dot_<name>``, ``norm_<name>``).
  doc: one line for ``--help`` and the report.
  at_node: the descent direction at one node, ``(student_logits f32[V], teacher_logits f32[V],
    visit_freq f32[V], vocab_mask bool[V], jsd_beta, topk) → f32[V]``; None when the final
    pass finishes it from per-edge terms instead (MiniLLM: its R̄ needs the teacher along every
    rollout's future, known only once every node is scored).
  uses_tree: whether it reads the tree (visit frequencies or future rewards); a direction
    that does not can rank targeted (node, token) pairs by |d_k| (``targeted.PRIORITIES``).
  """
  name: str
  doc: str
  at_node: Callable | None
  uses_tree: bool = False


def _registry(*directions: Direction) -> dict[str, Direction]:
  return {d.name: d for d in directions}


DIRECTIONS: dict[str, Direction] = _registry(
    Direction("reverse_kl", "−∇ KL(p‖q) (GKD β=1)",
              lambda s, t, w, m, beta, k: reverse_kl_direction(s, t, m)),
    Direction("forward_kl", "−∇ KL(q‖p) (supervised KD)",
              lambda s, t, w, m, beta, k: forward_kl_direction(s, t, m)),
    Direction("jsd", "−∇ generalised JSD(β) (GKD)",
              lambda s, t, w, m, beta, k: jsd_direction(s, t, beta, m)),
    Direction("topk_reverse_kl", "reverse KL on the student's top-k, renormalised",
              lambda s, t, w, m, beta, k: topk_reverse_kl_direction(s, t, k, False, m)),
    Direction("topk_reverse_kl_sg", "top-k reverse KL, stop-gradient through the normaliser",
              lambda s, t, w, m, beta, k: topk_reverse_kl_direction(s, t, k, True, m)),
    Direction("single_sample", "on-policy distillation, per-token reward −ℓ_y",
              lambda s, t, w, m, beta, k: single_sample_direction(s, t, w, m), uses_tree=True),
    Direction("minillm", "reverse KL + long-term policy gradient (MiniLLM)", None,
              uses_tree=True),
)
