"""Every closed form of gradients.py against jax.grad of its loss, written here independently
(on the unmasked rows only, with jax.nn's own softmax), plus invariances and aggregates."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from gradalign_jax import gradients as G

# ---------------------------------------------------------------------------------------
# Reference losses of one row over its unmasked sub-vocabulary (z, t: f32[n]).


def _kl(logp, logq):
  return jnp.sum(jnp.exp(logp) * (logp - logq))


def ref_reverse_kl(z, t, **_):
  return _kl(jax.nn.log_softmax(z), jax.nn.log_softmax(t))


def ref_forward_kl(z, t, **_):
  return _kl(jax.nn.log_softmax(t), jax.nn.log_softmax(z))


def ref_jsd(z, t, beta, **_):
  p, q = jax.nn.softmax(z), jax.nn.softmax(t)
  m = beta * q + (1 - beta) * p
  return beta * jnp.sum(q * jnp.log(q / m)) + (1 - beta) * jnp.sum(p * jnp.log(p / m))


def ref_topk(z, t, s, **_):
  return _kl(jax.nn.log_softmax(z[s]), jax.nn.log_softmax(t[s]))


def ref_topk_sg(z, t, s, **_):
  p = jax.nn.softmax(z)[s]
  p_tilde = p / jax.lax.stop_gradient(jnp.sum(p))
  return jnp.sum(p_tilde * (jnp.log(p_tilde) - jax.nn.log_softmax(t[s])))


def ref_single_sample(z, t, w, **_):
  logp, logq = jax.nn.log_softmax(z), jax.nn.log_softmax(t)
  return jnp.sum(w * jax.lax.stop_gradient(logp - logq) * logp)


def ref_minillm(z, t, w, r, **_):
  return ref_reverse_kl(z, t) - jnp.sum(w * r * jax.nn.log_softmax(z))


CASES = {
    "reverse_kl": (ref_reverse_kl, lambda z, t, m, a: G.reverse_kl_direction(z, t, m)),
    "forward_kl": (ref_forward_kl, lambda z, t, m, a: G.forward_kl_direction(z, t, m)),
    "jsd": (ref_jsd, lambda z, t, m, a: G.jsd_direction(z, t, a["beta"], m)),
    "topk": (ref_topk, lambda z, t, m, a: G.topk_reverse_kl_direction(z, t, a["k"], False, m)),
    "topk_sg": (ref_topk_sg,
                lambda z, t, m, a: G.topk_reverse_kl_direction(z, t, a["k"], True, m)),
    "single_sample": (ref_single_sample,
                      lambda z, t, m, a: G.single_sample_direction(z, t, a["w_full"], m)),
    "minillm": (ref_minillm,
                lambda z, t, m, a: G.minillm_direction(z, t, a["w_full"], a["r_full"], m)),
}

SHAPES = {"vec5": (5,), "rows3x17": (3, 17), "batch2x3x64": (2, 3, 64)}
SCALES = {"vec5": 1.0, "rows3x17": 8.0, "batch2x3x64": 2.0}
MASKS = ["none", "random", "padded_tail"]


def _mask(kind, v, rng):
  if kind == "none":
    return None
  n_real = v - max(1, v // 4)  # same count for both kinds: fewer shapes to compile
  if kind == "padded_tail":
    return np.arange(v) < n_real
  m = np.zeros(v, bool)
  m[rng.choice(v, n_real, replace=False)] = True
  return m


def _reference(name, z, t, mask, extra, leading):
  """−jax.grad of the reference loss, row by row, scattered back into the full vocab."""
  ref_loss = CASES[name][0]
  v = z.shape[-1]
  idx = np.arange(v) if mask is None else np.flatnonzero(mask)
  sub = lambda x: np.asarray(x, np.float32).reshape(-1, v)[:, idx]
  zs, ts, ws, rs = sub(z), sub(t), sub(extra["w_full"]), sub(extra["r_full"])
  # The top-k support comes from the primal logits (numpy), outside the differentiated loss.
  support = np.argsort(-zs, axis=-1, kind="stable")[:, :min(extra["k"], len(idx))]
  grad = jax.vmap(jax.grad(lambda z1, t1, w1, r1, s1: ref_loss(z1, t1, beta=extra["beta"], s=s1,
                                                               w=w1, r=r1)))(zs, ts, ws, rs,
                                                                             support)
  out = np.zeros((zs.shape[0], v), np.float64)
  out[:, idx] = -np.asarray(grad)
  return out.reshape(z.shape)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("name", list(CASES))
def test_direction_is_minus_grad_of_loss(name, shape_name, mask_kind):
  shape, scale = SHAPES[shape_name], SCALES[shape_name]
  rng = np.random.default_rng(zlib.crc32(repr((name, shape, mask_kind, scale)).encode()))
  z = (scale * rng.normal(size=shape)).astype(np.float32)
  t = (scale * rng.normal(size=shape)).astype(np.float32)
  mask = _mask(mask_kind, shape[-1], rng)
  w = rng.random(shape) * (rng.random(shape) < 0.5)
  extra = {"beta": 0.3, "k": 4, "w_full": (w / np.maximum(w.sum(-1, keepdims=True), 1e-9)),
           "r_full": rng.normal(size=shape)}
  got = np.asarray(CASES[name][1](z, t, mask, extra))
  want = _reference(name, z, t, mask, extra, shape[:-1])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  if mask is not None:
    assert np.all(got[..., ~mask] == 0.0)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_ideal_is_grad_of_value_when_all_observed(shape, mask_kind):
  rng = np.random.default_rng(len(shape) * 7 + MASKS.index(mask_kind))
  z = (3 * rng.normal(size=shape)).astype(np.float32)
  q = rng.random(shape).astype(np.float32)
  mask = _mask(mask_kind, shape[-1], rng)
  m = np.ones(shape[-1], bool) if mask is None else mask
  idx = np.flatnonzero(m)
  got = np.asarray(G.ideal_direction(z, q, np.ones(shape, bool), mask))
  value = lambda z1, q1: jnp.sum(jax.nn.softmax(z1) * q1)
  rows = lambda x: x.reshape(-1, shape[-1])[:, idx]
  grad = jax.vmap(jax.grad(value))(rows(z), rows(q))
  want = np.zeros((grad.shape[0], shape[-1]))
  want[:, idx] = np.asarray(grad)
  want = want.reshape(shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(got[..., ~m] == 0.0)


@pytest.mark.parametrize("observed_frac", [0.2, 0.5, 0.9])
def test_ideal_partially_observed_matches_math(observed_frac):
  """ĝ*_j = π_j(Q̂_j − V̂) on O, V̂ = Σ_O π Q̂ / Σ_O π; zero off O; Σ_j ĝ*_j = 0."""
  rng = np.random.default_rng(int(observed_frac * 10))
  z = rng.normal(size=(6, 30)) * 2
  q = rng.random((6, 30))
  obs = rng.random((6, 30)) < observed_frac
  obs[:, :2] = True
  got = np.asarray(G.ideal_direction(z, q, obs))
  pi = scipy.special.softmax(z, axis=-1)
  v_hat = (pi * q * obs).sum(-1, keepdims=True) / (pi * obs).sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.where(obs, pi * (q - v_hat), 0.0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-6)


def test_ideal_nothing_observed_is_zero():
  z = np.random.default_rng(0).normal(size=(2, 9))
  assert np.all(np.asarray(G.ideal_direction(z, np.ones((2, 9)), np.zeros((2, 9), bool))) == 0)


ALL_DIRECTIONS = {
    "ideal": lambda z, t, m, w, r: G.ideal_direction(z, r > 0, w > 0, m),
    "reverse_kl": lambda z, t, m, w, r: G.reverse_kl_direction(z, t, m),
    "forward_kl": lambda z, t, m, w, r: G.forward_kl_direction(z, t, m),
    "jsd": lambda z, t, m, w, r: G.jsd_direction(z, t, 0.5, m),
    "topk": lambda z, t, m, w, r: G.topk_reverse_kl_direction(z, t, 5, False, m),
    "topk_sg": lambda z, t, m, w, r: G.topk_reverse_kl_direction(z, t, 5, True, m),
    "single_sample": lambda z, t, m, w, r: G.single_sample_direction(z, t, w, m),
    "minillm": lambda z, t, m, w, r: G.minillm_direction(z, t, w, r, m),
}


@pytest.mark.parametrize("name", list(ALL_DIRECTIONS))
def test_extreme_logits_and_masked_rows_stay_finite(name):
  rng = np.random.default_rng(1)
  v = 40
  z = (1e4 * rng.normal(size=(4, v))).astype(np.float32)
  t = (1e4 * rng.normal(size=(4, v))).astype(np.float32)
  mask = np.arange(v) < 30
  z[:, 30:] = 1e4  # padded rows with large logits must still be ignored
  w = rng.random((4, v)) * (rng.random((4, v)) < 0.5)
  r = rng.normal(size=(4, v))
  d = np.asarray(ALL_DIRECTIONS[name](z, t, mask, w, r))
  assert np.all(np.isfinite(d))
  assert np.all(d[:, 30:] == 0.0)
  cov = G.node_covariates(z, t, mask)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in cov.values())


def test_single_sample_expectation_is_reverse_kl():
  rng = np.random.default_rng(2)
  v = 12
  z, t = rng.normal(size=v), rng.normal(size=v)
  mask = np.arange(v) < 10
  p = np.asarray(G.masked_softmax(z, mask), np.float64)
  rkl = np.asarray(G.reverse_kl_direction(z, t, mask))
  onehots = np.eye(v)
  per_y = np.asarray(G.single_sample_direction(np.tile(z, (v, 1)), np.tile(t, (v, 1)), onehots,
                                               mask))
  np.testing.assert_allclose(p @ per_y, rkl, atol=1e-6)  # exact expectation
  ys = rng.choice(v, size=20000, p=p / p.sum())
  mc = per_y[ys].mean(0)  # Monte Carlo over sampled tokens
  np.testing.assert_allclose(mc, rkl, atol=4 * per_y.std(0).max() / np.sqrt(len(ys)))
  np.testing.assert_allclose(np.asarray(G.single_sample_direction(z, t, p, mask)), rkl, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Invariances (hypothesis)

_row = st.tuples(st.just(16), st.integers(0, 2**31 - 1))  # one shape: one compile


@jax.jit
def _all_directions(z, t, mask, w, r):
  return {name: fn(z, t, mask, w, r) for name, fn in ALL_DIRECTIONS.items()}


def _draw(v, seed):
  rng = np.random.default_rng(seed)
  z, t = 3 * rng.normal(size=(2, v)), 3 * rng.normal(size=(2, v))
  w = rng.random((2, v)) * (rng.random((2, v)) < 0.6)
  r = rng.normal(size=(2, v))
  mask = rng.random(v) < 0.8
  mask[:3] = True
  return rng, z, t, mask, w, r


@settings(max_examples=25, deadline=None)
@given(_row, st.floats(-50, 50), st.floats(-50, 50))
def test_invariant_to_logit_shift(vs, a, b):
  _, z, t, mask, w, r = _draw(*vs)
  shifted, base = _all_directions(z + a, t + b, mask, w, r), _all_directions(z, t, mask, w, r)
  for name in ALL_DIRECTIONS:
    np.testing.assert_allclose(np.asarray(shifted[name]), np.asarray(base[name]), atol=2e-5,
                               err_msg=name)


@settings(max_examples=25, deadline=None)
@given(_row, st.floats(0.01, 100), st.floats(-1, 1))
def test_ideal_scales_with_q_and_ignores_q_offset(vs, c, b):
  _, z, _, mask, w, r = _draw(*vs)
  ideal = jax.jit(G.ideal_direction)
  obs = w > 0
  base = np.asarray(ideal(z, r, obs, mask))
  scaled = ideal(z, c * r, obs, mask)
  np.testing.assert_allclose(np.asarray(scaled), c * base, rtol=1e-4, atol=1e-5 * max(c, 1))
  np.testing.assert_allclose(np.asarray(ideal(z, r + b, obs, mask)), base, atol=1e-5)
  np.testing.assert_allclose(np.asarray(G.alignment(scaled, z)), np.asarray(G.alignment(base, z)),
                             atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(_row)
def test_equivariant_to_vocab_permutation(vs):
  rng, z, t, mask, w, r = _draw(*vs)
  perm = rng.permutation(z.shape[-1])
  permuted = _all_directions(z[:, perm], t[:, perm], mask[perm], w[:, perm], r[:, perm])
  base = _all_directions(z, t, mask, w, r)
  for name in ALL_DIRECTIONS:
    np.testing.assert_allclose(np.asarray(permuted[name]), np.asarray(base[name])[:, perm],
                               rtol=1e-4, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------
# Alignment, covariates, per-node scores, aggregates


@pytest.mark.parametrize("case", ["random", "zero_a", "zero_both", "huge", "parallel", "opposite",
                                  "nan_a", "inf_b", "nan_and_zero"])
def test_alignment(case):
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
  want = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  if case == "zero_a":
    a[1] = 0
    want[1] = 0
  elif case == "zero_both":
    a[:] = 0
    b[:] = 0
    want[:] = 0
  elif case == "huge":
    a, b = a * 1e25, b * 1e-25
  elif case == "parallel":
    b, want = 3 * a, np.ones(5)
  elif case == "opposite":
    b, want = -a, -np.ones(5)
  elif case == "nan_a":  # a non-finite vector has no direction: NaN, never 0
    a[2, 3] = np.nan
    want[2] = np.nan
  elif case == "inf_b":
    b[0, 0] = np.inf
    want[0] = np.nan
  elif case == "nan_and_zero":
    a[1], b[1, 5] = 0, np.nan
    want[1] = np.nan
  np.testing.assert_allclose(np.asarray(G.alignment(a, b)), want, rtol=1e-5, atol=1e-6)


def test_node_covariates_match_scipy():
  rng = np.random.default_rng(4)
  z, t = rng.normal(size=(3, 20)) * 2, rng.normal(size=(3, 20)) * 2
  mask = np.arange(20) < 16
  p = scipy.special.softmax(z[:, :16], -1)
  q = scipy.special.softmax(t[:, :16], -1)
  got = {k: np.asarray(v) for k, v in G.node_covariates(z, t, mask).items()}
  np.testing.assert_allclose(got["kl_pq"], scipy.stats.entropy(p, q, axis=-1), rtol=1e-4)
  np.testing.assert_allclose(got["kl_qp"], scipy.stats.entropy(q, p, axis=-1), rtol=1e-4)
  np.testing.assert_allclose(got["entropy_p"], scipy.stats.entropy(p, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(got["entropy_q"], scipy.stats.entropy(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(got["l2_pq"], np.linalg.norm(p - q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(got["cos_pq"], (p * q).sum(-1) / np.linalg.norm(p, axis=-1)
                             / np.linalg.norm(q, axis=-1), rtol=1e-5)


def test_registry_entries_are_the_direction_functions():
  """Each registry entry computed at a chunk of nodes equals its direction function."""
  rng = np.random.default_rng(5)
  c, v = 4, 30
  z, t = rng.normal(size=(c, v)), rng.normal(size=(c, v))
  obs = rng.random((c, v)) < 0.4
  w = obs / obs.sum(-1, keepdims=True)
  mask = np.arange(v) < 27
  want = {"reverse_kl": G.reverse_kl_direction(z, t, mask),
          "forward_kl": G.forward_kl_direction(z, t, mask),
          "jsd": G.jsd_direction(z, t, 0.3, mask),
          "topk_reverse_kl": G.topk_reverse_kl_direction(z, t, 5, False, mask),
          "topk_reverse_kl_sg": G.topk_reverse_kl_direction(z, t, 5, True, mask),
          "single_sample": G.single_sample_direction(z, t, w, mask)}
  computed = {n: d for n, d in G.DIRECTIONS.items() if d.at_node is not None}
  assert set(computed) == set(want) and set(G.DIRECTIONS) - set(want) == {"minillm"}
  for name, d in computed.items():
    np.testing.assert_array_equal(np.asarray(d.at_node(z, t, w, mask, 0.3, 5)),
                                  np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("name,min_cos", [("reverse_kl", 0.99999), ("forward_kl", 0.99),
                                          ("single_sample_on_policy", 0.99999), ("jsd", 0.99),
                                          ("minillm_no_future", 0.99999)])
def test_teacher_tilted_toward_success_aligns(name, min_cos):
  """Sign conventions end to end: a teacher q ∝ p·exp(βQ) pushes toward success, so every
  descent direction points along the ascent direction ĝ* (exactly for reverse KL: d = β ĝ*)."""
  rng = np.random.default_rng(8)
  z = rng.normal(size=(5, 24)) * 2
  q = rng.random((5, 24))
  mask = np.arange(24) < 20
  beta = 0.01
  t = z + beta * q
  p = np.asarray(G.masked_softmax(z, mask))
  d = {"reverse_kl": lambda: G.reverse_kl_direction(z, t, mask),
       "single_sample_on_policy": lambda: G.single_sample_direction(z, t, p, mask),
       "forward_kl": lambda: G.forward_kl_direction(z, t, mask),
       "jsd": lambda: G.jsd_direction(z, t, 0.5, mask),
       "minillm_no_future": lambda: G.minillm_direction(z, t, p, np.zeros_like(z), mask)}[name]()
  g = G.ideal_direction(z, q, np.ones_like(z, bool), mask)
  cos = np.asarray(G.alignment(g, d))
  assert np.all(cos >= min_cos), cos
  assert np.all(np.asarray(G.alignment(g, G.reverse_kl_direction(z, z - beta * q, mask))) < -0.999)


def _softmax64(z, mask):
  z = np.where(mask, np.asarray(z, np.float64), -np.inf)
  e = np.exp(z - z.max())
  return e / e.sum()


def _cos64(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("eps", [1e-6, 1e-8])
@pytest.mark.parametrize("teacher", ["peaked_same", "prefers_other"])
def test_near_deterministic_node_matches_fp64(eps, teacher):
  """At a node where the student's top token has 1 − π = eps, ĝ* and every direction's cosine
  with it agree with a float64 reference written from MATH.md's formulas (the plain fp32 forms
  subtract two nearly equal numbers there)."""
  rng = np.random.default_rng(11)
  v = 12
  mask = np.arange(v) < 10
  z = np.full(v, -50.0)
  z[0] = 3.0
  z[1:10] = 3.0 + np.log(eps / 9) + 0.3 * rng.normal(size=9)
  z = z.astype(np.float32)
  t = z.copy()
  if teacher == "peaked_same":
    t[1:10] = t[1:10] + 0.8 * rng.normal(size=9).astype(np.float32)
  else:
    t[2] = 3.5  # the teacher prefers token 2
  obs = np.zeros(v, bool)
  obs[[0, 2, 5]] = True
  q = np.zeros(v, np.float32)
  q[[0, 2, 5]] = [0.5, 1.0, 0.25]
  w = np.zeros(v, np.float32)
  w[[0, 2]] = [0.75, 0.25]
  rbar = np.zeros(v, np.float32)
  rbar[[0, 2]] = [-0.3, 0.4]
  # float64 reference
  p, qt = _softmax64(z, mask), _softmax64(t, mask)
  po = _softmax64(np.where(obs, z, -np.inf), mask & obs)
  q64 = np.where(obs, q, 0).astype(np.float64)
  g = np.where(obs, p * (q64 - po @ q64), 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    ell = np.where(mask, np.log(p) - np.log(qt), 0.0)
    a = np.where(mask, np.log(p) - np.log(0.5 * qt + 0.5 * p), 0.0)
  rkl = -p * (ell - p @ ell)
  beta = 0.5
  jsd = -(1 - beta) * p * (a - p @ a)
  sup = np.zeros(v, bool)
  sup[np.argsort(-np.where(mask, z, -np.inf), kind="stable")[:4]] = True
  ps, qs = p * sup / (p * sup).sum(), qt * sup / (qt * sup).sum()
  ell_s = np.where(sup, np.log(np.where(sup, ps, 1)) - np.log(np.where(sup, qs, 1)), 0.0)
  topk = np.where(sup, -ps * (ell_s - ps @ ell_s), 0.0)
  topk_sg = np.where(mask, p * (ps @ ell_s + 1) - np.where(sup, ps * (ell_s + 1), 0), 0.0)
  w64, r64 = w.astype(np.float64), rbar.astype(np.float64)
  single = -w64 * ell + p * (w64 @ ell)
  minillm = rkl + w64 * r64 - p * (w64 @ r64)
  ref = {"reverse_kl": rkl, "forward_kl": qt - p, "jsd": jsd, "topk_reverse_kl": topk,
         "topk_reverse_kl_sg": topk_sg, "single_sample": single, "minillm": minillm}
  got_g = np.asarray(G.ideal_direction(z, q, obs, mask), np.float64)
  assert _cos64(got_g, g) > 1 - 1e-3
  got = {"reverse_kl": G.reverse_kl_direction(z, t, mask),
         "forward_kl": G.forward_kl_direction(z, t, mask),
         "jsd": G.jsd_direction(z, t, beta, mask),
         "topk_reverse_kl": G.topk_reverse_kl_direction(z, t, 4, False, mask),
         "topk_reverse_kl_sg": G.topk_reverse_kl_direction(z, t, 4, True, mask),
         "single_sample": G.single_sample_direction(z, t, w, mask),
         "minillm": G.minillm_direction(z, t, w, rbar, mask)}
  for name, d in got.items():
    want = _cos64(g, ref[name])
    assert abs(_cos64(got_g, np.asarray(d, np.float64)) - want) < 1e-3, (name, want)


def test_mode_index_is_numpy_argmax_with_ties():
  """The first index of the maximum, as numpy's argmax: ties (repeated values drawn from a
  few levels), a row of equal entries, −inf and masked rows."""
  rng = np.random.default_rng(3)
  x = rng.integers(0, 4, size=(64, 37)).astype(np.float32)  # many ties
  x[0] = 2.0
  x[1] = -np.inf
  x[2, :5] = G.MASKED_LOGIT
  got = np.asarray(G.mode_index(jnp.asarray(x)))
  assert got.shape == (64, 1) and got.dtype == np.int32
  np.testing.assert_array_equal(got[:, 0], np.argmax(x, axis=-1))
