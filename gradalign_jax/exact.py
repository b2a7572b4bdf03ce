"""Exact V and g* by enumerating every continuation (tiny vocabulary and horizon).

The validation reference of MATH.md: the student's next-token distribution is restricted to
``vocab`` and renormalised there; a sequence ends at ``eos_id`` or after ``horizon`` generated
tokens. Enumeration runs level by level through the KV-cache path: the prompt is prefilled
once, then every live prefix of depth d is one row of a single batched decode step whose
cache rows are gathered from the parents' (no prefix is ever re-run). The number of rows at
the last level is (|vocab| − [eos in vocab])^(horizon − 1): keep both tiny.

Shape letters: see gradalign_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from gradalign_jax import gradients, models
from gradalign_jax.models.cache import gather_rows

Prefix = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ExactTree:
  """Every prefix's restricted policy and exact value.

  vocab:  the restricted token ids, in the order of ``probs`` rows.
  probs:  {prefix: float64[len(vocab)]} for every non-terminal prefix (π over ``vocab``).
  values: {prefix: V} for every prefix, terminal ones included (V = reward there).
  """
  vocab: tuple[int, ...]
  probs: dict[Prefix, np.ndarray]
  values: dict[Prefix, float]

  def q(self, prefix: Prefix) -> np.ndarray:
    """float64[len(vocab)]: Q(u, k) = V(u·k) for each k of ``vocab``."""
    return np.asarray([self.values[tuple(prefix) + (k,)] for k in self.vocab])

  def ideal_gradient(self, prefix: Prefix, vocab_size: int) -> np.ndarray:
    """Exact g*_j = π_j (Q_j − V) at node ``prefix`` over the full vocabulary (0 off ``vocab``).

    π is the restricted, renormalised policy: compare with ``gradients.ideal_direction`` called
    with ``vocab_mask`` = this vocabulary. Returns float64[vocab_size].
    """
    prefix = tuple(prefix)
    pi = self.probs[prefix]
    g = np.zeros(vocab_size)
    g[list(self.vocab)] = pi * (self.q(prefix) - self.values[prefix])
    return g


def enumerate_tree(cfg: models.Qwen3Config, params, prompt: Sequence[int], vocab: Sequence[int],
                   horizon: int, reward_fn: Callable[[Prefix], float],
                   eos_id: int | None = None) -> ExactTree:
  """Exact policy and values of every prefix; see ``values`` for the arguments."""
  vocab = tuple(int(k) for k in vocab)
  prompt = [int(t) for t in prompt]
  if len(set(vocab)) != len(vocab) or not vocab:
    raise ValueError(f"vocab must be a non-empty list of distinct ids, got {vocab}")
  if eos_id is not None and eos_id not in vocab:
    raise ValueError(f"eos_id={eos_id} is not in vocab {vocab}; add it (sequences end there)")
  if not prompt:
    raise ValueError("prompt is empty; the root's policy needs at least one prompt token")
  if horizon < 1:
    raise ValueError(f"horizon={horizon} must be ≥ 1")
  mask = np.zeros(cfg.vocab_size, bool)
  mask[list(vocab)] = True
  ids = jnp.asarray(vocab, jnp.int32)

  def restricted(logits):  # f32[B, V] → float64[B, |vocab|]
    return np.asarray(jnp.exp(gradients.masked_log_softmax(logits, mask)[:, ids]), np.float64)

  p = len(prompt)
  cache = models.init_cache(cfg, 1, p + horizon)
  logits, cache = models.forward_cached(cfg, params, jnp.asarray([prompt], jnp.int32),
                                        jnp.arange(p, dtype=jnp.int32)[None],
                                        jnp.ones((1, p), bool), cache)
  live: list[Prefix] = [()]
  probs = {(): restricted(logits[:, -1])[0]}
  cont = [k for k in vocab if k != eos_id]
  # Every level runs at the last level's width (rows past the live ones repeat row 0 and are
  # dropped): one compiled decode step instead of one per level.
  width = len(cont) ** (horizon - 1)
  for d in range(1, horizon):
    parents = np.repeat(np.arange(len(live)), len(cont))
    live = [u + (k,) for u in live for k in cont]
    if not live:
      break
    pad = width - len(live)
    rows = np.concatenate([parents, np.zeros(pad, parents.dtype)])
    cache = gather_rows(cache, jnp.asarray(rows, jnp.int32))
    toks = jnp.asarray([[u[-1]] for u in live] + [[live[0][-1]]] * pad, jnp.int32)
    pos = jnp.full((width, 1), p + d - 1, jnp.int32)
    logits, cache = models.forward_cached(cfg, params, toks, pos, jnp.ones((width, 1), bool),
                                          cache)
    for u, row in zip(live, restricted(logits[:len(live), -1])):
      probs[u] = row
  values: dict[Prefix, float] = {}
  for u in sorted(probs, key=len, reverse=True):  # children before parents
    v = 0.0
    for k, pk in zip(vocab, probs[u]):
      child = u + (k,)
      if child not in values:  # terminal: EOS or horizon
        values[child] = float(reward_fn(child))
      v += pk * values[child]
    values[u] = v
  return ExactTree(vocab=vocab, probs=probs, values=values)


def values(cfg: models.Qwen3Config, params, prompt: Sequence[int], vocab: Sequence[int],
           horizon: int, reward_fn: Callable[[Prefix], float],
           eos_id: int | None = None) -> dict[Prefix, float]:
  """{prefix: V} for every prefix (tuple of generated ids, prompt excluded).

  The student's next-token distribution is renormalised on ``vocab`` (a list of ids; it must
  contain ``eos_id`` when one is given). A sequence ends at ``eos_id`` or at ``horizon``
  tokens; ``reward_fn(generated)`` gets the generated ids only (prompt excluded, the EOS
  included when it ended the sequence) and returns 0 or 1. V(u) = Σ_k π_k V(u·k) holds at
  every non-terminal prefix; at a terminal one V is its reward.
  """
  return enumerate_tree(cfg, params, prompt, vocab, horizon, reward_fn, eos_id).values
