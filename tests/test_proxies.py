"""The token filters of proxies.py against numpy written from their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from gradalign_jax import proxies


def _softmax(z, mask):
  z = np.where(mask, z, -np.inf)
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("masked", [False, True])
def test_proxy_scores_match_numpy(masked):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 5, 11)) * 2
  t = rng.normal(size=(3, 5, 11)) * 2
  mask = np.ones(11, bool)
  if masked:
    mask[-3:] = False
  tok = rng.integers(0, 8, size=(3, 5))
  got = proxies.proxy_scores(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                             jnp.asarray(tok), jnp.asarray(mask) if masked else None)
  p, q = _softmax(s, mask), _softmax(t, mask)
  with np.errstate(divide="ignore", invalid="ignore"):
    want = {
        "student_entropy": -np.nansum(np.where(p > 0, p * np.log(p), 0), -1),
        "kl_pq": np.nansum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0), -1),
        "abs_p_minus_q": np.abs(np.take_along_axis(p, tok[..., None], -1)
                                - np.take_along_axis(q, tok[..., None], -1))[..., 0],
        "teacher_logprob": np.log(np.take_along_axis(q, tok[..., None], -1))[..., 0],
    }
  assert set(got) == set(want) == set(proxies.PROXIES)
  for name in want:
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_top_fraction_keeps_the_highest_valid_scores(fraction):
  scores = np.array([[0.3, 0.9, 0.1, 0.9], [0.5, -1.0, 2.0, 0.0]], np.float32)
  valid = np.array([[True, True, True, False], [True, True, True, True]])
  kept = np.asarray(proxies.top_fraction(jnp.asarray(scores), jnp.asarray(valid), fraction))
  n = int(round(fraction * valid.sum()))
  # Brute force: valid positions by descending score, ties by position.
  cand = sorted((-scores[i, j], i * 4 + j) for i in range(2) for j in range(4) if valid[i, j])
  want = np.zeros_like(valid)
  for _, k in cand[:n]:
    want[k // 4, k % 4] = True
  np.testing.assert_array_equal(kept, want)
