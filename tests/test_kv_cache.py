"""The KV-cache path (prefill a chunk, decode step by step, ragged rows, tree masks) gives the
same logits as one full forward of each row's own sequence."""

import jax.numpy as jnp
import numpy as np
import pytest

from gradalign_jax import models
from gradalign_jax.models import qwen3

CFG = qwen3.Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                        num_heads=6, num_kv_heads=2, head_dim=12, rope_theta=1e4)
PARAMS = qwen3.init_params(CFG, seed=3)


def _full(seq):
  return np.asarray(models.forward(CFG, PARAMS, jnp.asarray([seq], jnp.int32)))[0]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ragged_prefill_then_decode(padding):
  rng = np.random.default_rng(0)
  lengths = [7, 3, 5]
  seqs = [list(rng.integers(0, CFG.vocab_size, n + 4)) for n in lengths]  # prompt + 4 decoded
  width = max(lengths)
  toks = np.zeros((3, width), np.int32)
  pos = np.zeros((3, width), np.int32)
  valid = np.zeros((3, width), bool)
  for i, n in enumerate(lengths):
    cols = np.arange(n) if padding == "right" else np.arange(width - n, width)
    toks[i, cols], pos[i, cols], valid[i, cols] = seqs[i][:n], np.arange(n), True
  cache = models.init_cache(CFG, 3, width + 4)
  logits, cache = models.forward_cached(CFG, PARAMS, toks, pos, valid, cache)
  got = [[np.asarray(logits[i, np.flatnonzero(valid[i])])] for i in range(3)]
  for step in range(4):
    tok = np.array([[s[n + step]] for s, n in zip(seqs, lengths)], np.int32)
    p = np.array([[n + step] for n in lengths], np.int32)
    logits, cache = models.forward_cached(CFG, PARAMS, tok, p, np.ones((3, 1), bool), cache)
    for i in range(3):
      got[i].append(np.asarray(logits[i]))
  for i in range(3):
    np.testing.assert_allclose(np.concatenate(got[i]), _full(seqs[i]), rtol=1e-5, atol=1e-5)


def test_multi_token_chunks_after_prefill():
  """A second multi-token chunk (e.g. a forced branch prefix) continues the first exactly."""
  seq = list(np.random.default_rng(1).integers(0, CFG.vocab_size, 12))
  cache = models.init_cache(CFG, 1, 16)
  outs = []
  for lo, hi in [(0, 5), (5, 9), (9, 12)]:
    chunk = np.asarray([seq[lo:hi]], np.int32)
    logits, cache = models.forward_cached(CFG, PARAMS, chunk, np.arange(lo, hi)[None],
                                          np.ones_like(chunk, bool), cache)
    outs.append(np.asarray(logits[0]))
  np.testing.assert_allclose(np.concatenate(outs), _full(seq), rtol=1e-5, atol=1e-5)


def test_tree_mask_scores_branches_in_one_chunk():
  """A shared context in the cache, then two branches packed in one chunk with a tree mask."""
  rng = np.random.default_rng(2)
  ctx = list(rng.integers(0, CFG.vocab_size, 6))
  a, b = list(rng.integers(0, CFG.vocab_size, 3)), list(rng.integers(0, CFG.vocab_size, 2))
  # chunk = [a0 a1 a2 b0 b1]; b branches off the context, not off a.
  chunk = np.asarray([a + b], np.int32)
  depth = np.array([0, 1, 2, 0, 1])
  mask = np.zeros((5, 5), bool)
  mask[:3, :3] = np.tril(np.ones((3, 3), bool))
  mask[3:, 3:] = np.tril(np.ones((2, 2), bool))
  cache = models.init_cache(CFG, 1, 16)
  _, cache = models.forward_cached(CFG, PARAMS, np.asarray([ctx], np.int32),
                                   np.arange(6)[None], np.ones((1, 6), bool), cache)
  model = qwen3.bind(CFG, PARAMS)
  logits, _ = model(jnp.asarray(chunk), jnp.asarray(6 + depth)[None], None, cache, mask[None])
  np.testing.assert_allclose(np.asarray(logits[0, :3]), _full(ctx + a)[6:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[0, 3:]), _full(ctx + b)[6:], rtol=1e-5, atol=1e-5)
