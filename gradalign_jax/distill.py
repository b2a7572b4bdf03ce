"""On-policy distillation with a token gate: the per-token losses, the gates, one training step.

    from gradalign_jax import distill
    batch = distill.training_batch(prompts, ro, pad_id, length)       # host numpy
    step = distill.make_train_step(cfg, teacher_cfg, optax.adam(1e-3), vocab_mask)
    params, opt_state, stats = step(params, opt_state, teacher_params, batch.tokens, ...,
                                    arm=distill.ARMS.index("alignment_gated"), fraction=0.3)

The arms of ``experiments/gated_distillation.py`` differ only in which tokens' loss is kept
(``gate_mask``): every distillation arm's per-token loss is the full-vocabulary reverse
KL(p_θ‖q) at a position of the student's own sample (GKD's default), the teacher's logits a
constant, so its gradient w.r.t. the student's logits there is −``gradients.
reverse_kl_direction``; the ``reinforce`` arm keeps no distillation loss and takes the policy
gradient of the verifier's reward with a per-question mean baseline instead. A loss is summed
over kept positions and divided by the batch's *valid* positions (not the kept ones), so a gate
removes terms and never rescales the rest.

The arm is a traced index into ``ARMS`` (every gate is computed, one is picked), so one
compiled step serves every arm and every step of a run.

Shape letters (gradalign_jax/__init__.py): B batch rows (Q questions × G rollouts), T
sequence tokens (prompt + generated, right-padded), W generated positions per row, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import proxies
from gradalign_jax.gradients import at_tokens, kl_pq, masked_log_softmax

DISTILL_ARMS = ("all_tokens", "incorrect_only", "alignment_gated")
PROXY_ARMS = tuple(f"proxy_{name}" for name in proxies.PROXIES)
# Arms that keep alignment_gated's fraction of tokens at each step: the proxies and two random
# choices of that many (the controls: sparsity alone, no selection; and the covered tokens'
# positions without alignment's sign).
FRACTION_ARMS = PROXY_ARMS + ("random_fraction", "covered_random")
ARMS = DISTILL_ARMS + FRACTION_ARMS + ("reinforce",)
# Arms that run the diagnostic on their own current student (the covered mask, and for
# alignment_gated the alignment at each covered token's prefix node).
DIAGNOSTIC_ARMS = ("alignment_gated", "covered_random")
ARM_DOCS = {
    "all_tokens": "reverse KL at every generated token (GKD's default)",
    "incorrect_only": "reverse KL at the tokens of rollouts the verifier marks wrong",
    "alignment_gated": "reverse KL where the estimated alignment cos(ĝ*, d_reverse_kl) at the "
                       "token's prefix node is > 0 (the node scored and informative; any other "
                       "token is not kept)",
    **{f"proxy_{n}": f"reverse KL at the top tokens by {p.doc}, the same fraction of the "
                     "batch's tokens as alignment_gated kept at that step"
       for n, p in proxies.PROXIES.items()},
    "random_fraction": "reverse KL at uniformly random tokens of the batch, the same fraction "
                       "as alignment_gated kept at that step (sparsity without selection)",
    "covered_random": "reverse KL at uniformly random *covered* tokens (prefix node scored and "
                      "informative, the tokens alignment_gated chooses among), as many as "
                      "alignment_gated's kept fraction of the batch's valid tokens at that step "
                      "(all covered ones if fewer); runs its own diagnostic. The control for "
                      "position/coverage: alignment_gated − covered_random is what the sign "
                      "of alignment adds",
    "reinforce": "no distillation: policy gradient of the verifier's reward, per-question "
                 "mean baseline",
}


# ---------------------------------------------------------------------------------------
# Per-token losses


def token_reverse_kl(student_logits, teacher_logits, vocab_mask=None) -> jax.Array:
  """KL(p‖q) over the vocabulary at each position (``gradients.kl_pq``), the teacher a
  constant (no gradient).

  student_logits, teacher_logits: f32[..., V] raw (temperature applied); vocab_mask: bool[V]
  or None. Returns f32[...]; ∂/∂z_student = −``gradients.reverse_kl_direction``.
  """
  return kl_pq(masked_log_softmax(student_logits, vocab_mask),
               jax.lax.stop_gradient(masked_log_softmax(teacher_logits, vocab_mask)))


def distill_loss(student_logits, teacher_logits, keep, num_valid, vocab_mask=None) -> jax.Array:
  """Σ over kept positions of KL(p‖q), divided by ``num_valid`` (the batch's valid positions).

  keep: bool or f32[...] (0/1 weights). Returns a scalar."""
  kl = token_reverse_kl(student_logits, teacher_logits, vocab_mask)
  return jnp.sum(jnp.where(keep, kl, 0.0)) / jnp.maximum(num_valid, 1)


def reinforce_loss(student_logits, tokens, advantages, valid, num_valid,
                   vocab_mask=None) -> jax.Array:
  """−Σ_valid A · log π(y_t) / ``num_valid``: the score-function (REINFORCE) loss.

  advantages: f32[...] each position's rollout advantage (reward − its question's mean),
  broadcast over the rollout's positions; valid: bool[...]. Its gradient w.r.t. the logits
  at a valid position is −A (e_y − π) / num_valid."""
  logp = at_tokens(masked_log_softmax(student_logits, vocab_mask), tokens)
  return -jnp.sum(jnp.where(valid, advantages * logp, 0.0)) / jnp.maximum(num_valid, 1)


def question_advantages(rewards, question) -> np.ndarray:
  """reward − the mean reward of its question's rollouts. rewards f32[B], question int[B]."""
  rewards = np.asarray(rewards, np.float64)
  question = np.asarray(question)
  out = np.empty_like(rewards)
  for q in np.unique(question):
    rows = question == q
    out[rows] = rewards[rows] - rewards[rows].mean()
  return out.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Gates


def gate_mask(arm: str, valid, correct, align_keep, scores: dict | None = None,
              fraction=0.0, noise=None, covered=None) -> jax.Array:
  """bool[...]: the positions whose distillation loss ``arm`` keeps.

  valid: bool[B, W] generated positions (EOS included); correct: bool[B] the verifier's
  verdict per rollout; align_keep: bool[B, W] positions whose prefix node has estimated
  alignment > 0 (``alignment_keep``); scores: {proxy name: f32[B, W]}
  (``proxies.proxy_scores``), needed by the proxy arms; fraction: the share of valid
  positions a proxy arm keeps (``proxies.top_fraction``, over the whole batch); noise:
  f32[B, W] i.i.d. uniform draws, ``random_fraction``'s and ``covered_random``'s scores;
  covered: bool[B, W] positions whose prefix node has an alignment estimate
  (``alignment_keep``), needed by ``covered_random``, which keeps round(fraction · #valid)
  of them (all if fewer). ``reinforce`` keeps no distillation loss (all False).
  """
  valid = jnp.asarray(valid, bool)
  if arm == "all_tokens":
    return valid
  if arm == "incorrect_only":
    return valid & ~jnp.asarray(correct, bool)[:, None]
  if arm == "alignment_gated":
    return valid & jnp.asarray(align_keep, bool)
  if arm in PROXY_ARMS:
    if scores is None:
      raise ValueError(f"arm {arm!r} needs the proxy scores: pass scores=proxy_scores(...)")
    return proxies.top_fraction(scores[arm[len("proxy_"):]], valid, fraction)
  if arm == "random_fraction":
    if noise is None:
      raise ValueError("arm 'random_fraction' needs noise: uniform draws shaped like valid")
    return proxies.top_fraction(noise, valid, fraction)
  if arm == "covered_random":
    if noise is None or covered is None:
      raise ValueError("arm 'covered_random' needs noise and the covered mask "
                       "(alignment_keep's second output), both shaped like valid")
    count = jnp.round(fraction * jnp.sum(valid)).astype(jnp.int32)
    return proxies.top_count(noise, valid & jnp.asarray(covered, bool), count)
  if arm == "reinforce":
    return jnp.zeros_like(valid)
  raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


def alignment_keep(tree, columns: dict, sequences: Sequence[Sequence[int]], width: int,
                   direction: str = "reverse_kl") -> tuple[np.ndarray, np.ndarray]:
  """(keep, covered), bool[B, W] each: at position t of sequence b, whether the prefix
  ``sequences[b][:t]`` is a node of ``tree`` that the diagnostic scored as informative
  (``covered``) and whose alignment ``align_<direction>`` there is > 0 (``keep``).

  tree: a PrefixTree; columns: its ``TreeTerms.node_columns()`` / ``alignment.score_tree``
  columns; sequences: generated ids of each row (the tree's own rollouts, or later samples of
  the same question: a prefix the tree never saw is not covered); width: W.
  """
  align = {int(n): (bool(i), float(a)) for n, i, a in
           zip(columns["node_id"], columns["informative"], columns[f"align_{direction}"])}
  keep = np.zeros((len(sequences), width), bool)
  covered = np.zeros((len(sequences), width), bool)
  for b, seq in enumerate(sequences):
    seq = [int(x) for x in seq][:width]
    # The prefix seq[:t] of every t the tree saw (it never saw a longer one past a gap).
    for t, node in enumerate(tree.prefix_nodes(seq)[:len(seq)]):
      informative, value = align.get(node, (False, np.nan))
      covered[b, t] = informative and np.isfinite(value)
      keep[b, t] = covered[b, t] and value > 0
  return keep, covered


# ---------------------------------------------------------------------------------------
# A batch and the training step


@dataclasses.dataclass(frozen=True)
class Batch:
  """A batch of prompt + sampled continuation, right-padded (host numpy).

  tokens int32[B, T]: prompt then generated ids, then pad; positions int32[B, W]: the index
  in ``tokens`` whose logits predict generated token t (prompt length − 1 + t); generated
  int32[B, W]: the generated ids; valid bool[B, W]: t < the rollout's length;
  sequence_tokens: Σ over rows of prompt + generated tokens (the real, unpadded ones).
  """
  tokens: np.ndarray
  positions: np.ndarray
  generated: np.ndarray
  valid: np.ndarray
  sequence_tokens: int


def training_batch(prompts: Sequence[Sequence[int]], question: np.ndarray, generated: np.ndarray,
                   lengths: np.ndarray, pad_id: int, length: int) -> Batch:
  """Batch of row b = prompts[question[b]] + generated[b, :lengths[b]], padded to ``length``.

  generated int32[B, W] (a sampler's ``Rollouts.tokens``), lengths int[B]; raises when a row
  does not fit (raise ``length``)."""
  generated = np.asarray(generated, np.int32)
  b, w = generated.shape
  tokens = np.full((b, length), pad_id, np.int32)
  positions = np.zeros((b, w), np.int32)
  valid = np.arange(w)[None] < np.asarray(lengths)[:, None]
  total = 0
  for r in range(b):
    p = list(prompts[int(question[r])])
    n = int(lengths[r])
    if len(p) + n > length:
      raise ValueError(f"row {r}: {len(p)} prompt + {n} generated tokens exceed the batch "
                       f"length {length}; pass a larger length")
    tokens[r, :len(p)] = p
    tokens[r, len(p):len(p) + n] = generated[r, :n]
    positions[r] = np.minimum(len(p) - 1 + np.arange(w), length - 1)
    total += len(p) + n
  return Batch(tokens, positions, np.where(valid, generated, pad_id), valid, total)


def make_train_step(cfg, teacher_cfg, optimizer, vocab_mask=None):
  """The jitted step ``(params, opt_state, teacher_params, tokens, positions, generated, valid,
  correct, align_keep, covered, advantages, arm, fraction, noise) → (params, opt_state,
  stats)``.

  tokens int32[B, T], positions/generated int32[B, W], valid/align_keep/covered bool[B, W]
  (Batch and ``alignment_keep``), correct bool[B], advantages f32[B] (``question_advantages``), arm
  int32 (an index into ARMS), fraction f32 (FRACTION_ARMS' share of valid tokens), noise
  f32[B, W] (random_fraction's uniform draws).
  stats: {"loss", "kept" (positions kept), "valid"}. Params are arguments and the arm is
  traced: one program for every arm and step.
  """
  import optax

  from gradalign_jax.models import qwen3

  mask = None if vocab_mask is None else jnp.asarray(vocab_mask, bool)

  def at_positions(logits, positions):
    return jnp.take_along_axis(logits, positions[..., None], axis=1)

  def loss_fn(params, teacher_logits, tokens, positions, generated, valid, correct, align_keep,
              covered, advantages, arm, fraction, noise):
    student = at_positions(qwen3.bind(cfg, params)(tokens)[0], positions)
    scores = proxies.proxy_scores(jax.lax.stop_gradient(student), teacher_logits, generated,
                                  mask)
    gates = jnp.stack([gate_mask(a, valid, correct, align_keep, scores, fraction, noise,
                                 covered) for a in ARMS])
    keep = gates[arm]
    num_valid = jnp.sum(valid)
    is_pg = (arm == ARMS.index("reinforce")).astype(jnp.float32)
    pg = reinforce_loss(student, generated, advantages[:, None], valid, num_valid, mask)
    loss = distill_loss(student, teacher_logits, keep, num_valid, mask) + is_pg * pg
    return loss, {"kept": jnp.sum(keep), "valid": num_valid}

  @jax.jit
  def step(params, opt_state, teacher_params, tokens, positions, generated, valid, correct,
           align_keep, covered, advantages, arm, fraction, noise):
    teacher_logits = at_positions(qwen3.bind(teacher_cfg, teacher_params)(tokens)[0], positions)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, jax.lax.stop_gradient(teacher_logits), tokens, positions, generated, valid,
        correct, align_keep, covered, advantages, arm, fraction, noise)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(stats, loss=loss)

  return step


__all__ = ["ARMS", "ARM_DOCS", "Batch", "DIAGNOSTIC_ARMS", "DISTILL_ARMS", "FRACTION_ARMS",
           "PROXY_ARMS", "alignment_keep", "distill_loss", "gate_mask", "make_train_step",
           "question_advantages", "reinforce_loss", "token_reverse_kl", "training_batch"]
