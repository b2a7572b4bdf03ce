"""exact.values against brute-force sequence probabilities from full forwards, and the
Bellman identity V(u) = Σ_k π_k V(u·k) at every node."""

import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from gradalign_jax import exact, gradients, models

CFG = models.Qwen3Config(vocab_size=23, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
PARAMS = models.init_params(CFG, seed=7)
PROMPT = [3, 9, 14]

REWARDS = {
    "contains_5": lambda y: int(5 in y),
    "ends_eos_even": lambda y: int(len(y) > 0 and y[-1] == 2 and len(y) % 2 == 0),
    "first_is_last": lambda y: int(len(y) > 1 and y[0] == y[-1]),
}
SETTINGS = {  # vocab, horizon, eos_id
    "eos3_h4": ([2, 5, 11], 4, 2),
    "noeos_h3": ([5, 7, 11], 3, None),
    "eos4_h3": ([2, 5, 6, 20], 3, 2),
}


def _complete_sequences(vocab, horizon, eos):
  """Every sequence that ends at EOS or at the horizon."""
  out = []
  for n in range(1, horizon + 1):
    for seq in itertools.product(vocab, repeat=n):
      if eos in seq[:-1]:
        continue
      if n < horizon and seq[-1] != eos:
        continue
      out.append(seq)
  return out


@functools.lru_cache(maxsize=None)
def _step_logps(setting):
  """{sequence: float64[len]} per-step log π(y_t | prompt, y_<t) renormalised on vocab, from ONE
  full forward of every complete sequence (right-padded: causal, pads change nothing before)."""
  vocab, horizon, eos = SETTINGS[setting]
  seqs = _complete_sequences(vocab, horizon, eos)
  toks = np.asarray([PROMPT + list(s) + [vocab[0]] * (horizon - len(s)) for s in seqs], np.int32)
  full = np.asarray(models.forward(CFG, PARAMS, jnp.asarray(toks)), np.float64)
  steps = full[:, len(PROMPT) - 1: len(PROMPT) - 1 + horizon][:, :, vocab]
  logp = steps - scipy.special.logsumexp(steps, axis=-1, keepdims=True)
  return {s: np.asarray([logp[i, t, vocab.index(k)] for t, k in enumerate(s)])
          for i, s in enumerate(seqs)}


@pytest.mark.parametrize("reward", list(REWARDS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_values_match_brute_force(setting, reward):
  vocab, horizon, eos = SETTINGS[setting]
  fn = REWARDS[reward]
  got = exact.values(CFG, PARAMS, PROMPT, vocab, horizon, fn, eos_id=eos)
  logps = _step_logps(setting)
  np.testing.assert_allclose(sum(np.exp(lp.sum()) for lp in logps.values()), 1.0, atol=1e-5)
  prefixes = {s[:i] for s in logps for i in range(len(s) + 1)}
  assert set(got) == prefixes
  for u in prefixes:
    # V(u) = Σ_{s ⊒ u} P(s | u) R(s), P(s | u) = Π of the steps after u
    brute = sum(np.exp(lp[len(u):].sum()) * fn(s) for s, lp in logps.items() if s[:len(u)] == u)
    np.testing.assert_allclose(got[u], brute, atol=1e-5, err_msg=str(u))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_bellman_identity_and_exact_gradient(setting):
  vocab, horizon, eos = SETTINGS[setting]
  t = exact.enumerate_tree(CFG, PARAMS, PROMPT, vocab, horizon, REWARDS["contains_5"], eos)
  for u, pi in t.probs.items():
    np.testing.assert_allclose(pi.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(t.values[u], float(pi @ t.q(u)), atol=1e-6)
    g = t.ideal_gradient(u, CFG.vocab_size)
    np.testing.assert_allclose(g.sum(), 0.0, atol=1e-6)
  # g* at the root equals ideal_direction with exact Q, all children observed, on the same π
  root_logits = models.forward(CFG, PARAMS, jnp.asarray([PROMPT], jnp.int32))[0, -1]
  mask = np.zeros(CFG.vocab_size, bool)
  mask[vocab] = True
  q = np.zeros(CFG.vocab_size)
  q[vocab] = t.q(())
  want = gradients.ideal_direction(root_logits, q, mask, mask)
  np.testing.assert_allclose(t.ideal_gradient((), CFG.vocab_size), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("kwargs,msg", [(dict(vocab=[5, 7], eos_id=2), "eos_id=2 is not in"),
                                        (dict(vocab=[5, 5]), "distinct"),
                                        (dict(vocab=[5, 7], horizon=0), "horizon")])
def test_errors_name_the_fix(kwargs, msg):
  args = dict(cfg=CFG, params=PARAMS, prompt=PROMPT, vocab=[5, 7], horizon=2,
              reward_fn=REWARDS["contains_5"], eos_id=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=msg):
    exact.values(**args)
