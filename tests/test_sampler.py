"""The sampler against the model's own full forward: distributions (chi-square), recorded
log-probabilities, branching, seeds, ragged prompts and EOS, and its error messages."""

import jax
import numpy as np
import pytest
from scipy import stats

from gradalign_jax import sampling
from gradalign_jax.models import cache as cache_lib
from gradalign_jax.models import qwen3
from gradalign_jax.sampling import sampler as sampler_lib
from gradalign_jax.shapes import bucket

CFG = qwen3.Qwen3Config(vocab_size=24, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def _spread_params(seed=0, scale=40.0):
  """Random params with logits spread enough that T, top-p and top-k visibly matter."""
  params = qwen3.init_params(CFG, seed)
  params["lm_head"] = params["lm_head"].replace(params["lm_head"][...] * scale)
  return params


PARAMS = _spread_params()


def _full_logits(seq, width=32):
  """Full-forward logits of seq (right-padded to one width: causal, so one compile)."""
  padded = np.zeros((1, width), np.int32)
  padded[0, :len(seq)] = seq
  return np.asarray(qwen3.forward(CFG, PARAMS, padded))[0, :len(seq)].astype(np.float64)


def _reference_policy(logits, temperature=1.0, top_p=1.0, top_k=0):
  """softmax(z/T), then top-k, then top-p, renormalised: numpy, independent of the sampler."""
  z = logits / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_k:
    p = np.where(p >= np.sort(p)[::-1][top_k - 1], p, 0.0)
    p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for i in order:
      keep[i] = True
      mass += p[i]
      if mass >= top_p:
        break
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return p


POLICIES = {
    "plain": dict(),
    "temperature_0.5": dict(temperature=0.5),
    "temperature_2": dict(temperature=2.0),
    "top_p_0.7": dict(top_p=0.7),
    "top_k_4_t1.5": dict(top_k=4, temperature=1.5),
}
PROMPT = [3, 1, 4, 1, 5]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_first_token_distribution_matches_policy(name):
  kw = POLICIES[name]
  n = 4096
  ro = sampling.sample(CFG, PARAMS, [PROMPT], sampling.SamplingConfig(max_new_tokens=1, **kw),
                       num_samples=n, seed=11)
  counts = np.bincount(ro.tokens[:, 0], minlength=CFG.vocab_size)
  expected = _reference_policy(_full_logits(PROMPT)[-1], **kw)
  assert counts[expected == 0].sum() == 0, "sampled outside the truncated support"
  support = expected > 0
  # Pool the rarest tokens so every chi-square cell expects ≥ 5 draws.
  rare = support & (expected * n < 5)
  obs = np.append(counts[support & ~rare], counts[rare].sum())
  exp = np.append(expected[support & ~rare], expected[rare].sum()) * n
  obs, exp = obs[exp > 0], exp[exp > 0]
  assert stats.chisquare(obs, exp).pvalue > 1e-3
  if kw:  # the knob changed the distribution: the untempered, untruncated one is rejected
    plain = _reference_policy(_full_logits(PROMPT)[-1])
    assert stats.chisquare(counts, plain * n + 1e-9).pvalue < 1e-6
  np.testing.assert_allclose(ro.logprobs[:, 0], np.log(expected[ro.tokens[:, 0]]), atol=1e-4)


def _check_logprobs(ro, prompts, forced_before=None, **policy):
  """Every recorded log-prob equals the reference policy of the full forward's logits.

  Forced tokens record NaN: the row's own (branch_depth) and forced_before[b], an earlier
  branch's forced depth inherited from the source (-1: none).
  """
  for b in range(len(ro)):
    prompt = prompts[ro.question[b]]
    seq = prompt + ro.sequence(b)
    logits = _full_logits(seq)
    for d in range(ro.lengths[b]):
      if d == ro.branch_depth[b] or (forced_before is not None and d == forced_before[b]):
        assert np.isnan(ro.logprobs[b, d])
        continue
      pol = _reference_policy(logits[len(prompt) + d - 1], **policy)
      np.testing.assert_allclose(ro.logprobs[b, d], np.log(pol[seq[len(prompt) + d]]),
                                 atol=2e-4, err_msg=f"row {b} depth {d}")
    assert np.all(ro.tokens[b, ro.lengths[b]:] == ro.sampling.pad_id)
    assert np.all(np.isnan(ro.logprobs[b, ro.lengths[b]:]))


RAGGED = [[7], [2, 9, 4, 4, 1, 0, 3, 8, 8, 2, 5], [6, 6, 1, 12]]
COMMON = sampling.SamplingConfig(max_new_tokens=9, eos_ids=(0,))  # one compile, many tests


@pytest.fixture(scope="module")
def common():
  return sampling.sample(CFG, PARAMS, RAGGED, COMMON, num_samples=3, seed=5)


@pytest.mark.parametrize("policy", [dict(), dict(temperature=0.7, top_k=6)], ids=["plain", "t07_k6"])
def test_ragged_prompts_logprobs_and_eos(policy):
  eos = (0, 1, 2)  # common enough that most rows stop early, some run to the horizon
  cfg_s = sampling.SamplingConfig(max_new_tokens=10, eos_ids=eos, pad_id=23, **policy)
  ro = sampling.sample(CFG, PARAMS, RAGGED, cfg_s, num_samples=6, seed=3)
  assert len(ro) == 18 and list(ro.question) == [0] * 6 + [1] * 6 + [2] * 6
  _check_logprobs(ro, RAGGED, **policy)
  for b in range(len(ro)):
    gen = ro.sequence(b)
    assert not set(gen[:-1]) & set(eos), "generation continued past an EOS"
    if ro.stop_reason[b] == sampling.STOP_EOS:
      assert gen[-1] in eos
    else:
      assert len(gen) == 10 and gen[-1] not in eos
  assert set(ro.stop_reason) == {sampling.STOP_EOS, sampling.STOP_MAX_TOKENS}
  assert ro.policy["top_k"] == policy.get("top_k", 0) and ro.policy["eos_ids"] == list(eos)


def test_seeds_reproduce_and_rows_do_not_depend_on_the_batch(common):
  a = sampling.sample(CFG, PARAMS, RAGGED, COMMON, num_samples=3, seed=5)
  np.testing.assert_array_equal(a.tokens, common.tokens)
  np.testing.assert_array_equal(a.logprobs, common.logprobs)
  c = sampling.sample(CFG, PARAMS, RAGGED, COMMON, num_samples=3, seed=6)
  assert not np.array_equal(c.tokens, common.tokens)
  # The same questions (same ids) in another order draw the same rollouts.
  moved = sampling.sample(CFG, PARAMS, [RAGGED[2], RAGGED[0], RAGGED[1]], COMMON,
                          num_samples=3, seed=5, question_ids=[2, 0, 1])
  np.testing.assert_array_equal(moved.tokens, common.tokens[np.r_[6:9, 0:6]])


def test_branch_bookkeeping_and_logprobs(common):
  ro = common
  long_rows = [b for b in range(len(ro)) if ro.lengths[b] >= 4]
  r1, r2 = long_rows[0], long_rows[-1]
  rows, depths, forced = [r1, r1, r2, r2], [0, 3, 2, ro.lengths[r2] - 1], [5, 0, 7, 19]
  br = sampling.branch(CFG, PARAMS, ro, rows, depths, forced, num_samples=3, seed=2)
  assert len(br) == 12
  for i, (r, t, k) in enumerate(zip(rows, depths, forced)):
    for b in range(3 * i, 3 * i + 3):
      assert br.source[b] == r and br.branch_depth[b] == t and br.question[b] == ro.question[r]
      assert br.sequence(b)[:t] == ro.sequence(r)[:t] and br.tokens[b, t] == k
      np.testing.assert_array_equal(br.logprobs[b, :t], ro.logprobs[r, :t])
      assert br.lengths[b] <= 9
  assert br.sequence(3)[3:] == [0] and br.stop_reason[3] == sampling.STOP_EOS  # forced EOS
  _check_logprobs(br, RAGGED)
  # A branch of a branch (its own KV holds depths ≥ its branch depth; its prefix the rest).
  deeper = sampling.branch(CFG, PARAMS, br, [6, 7], [1, 4], [9, 9], num_samples=2, seed=3)
  assert deeper.sequence(0)[:1] == br.sequence(6)[:1]
  assert deeper.sequence(2)[:4] == br.sequence(7)[:4]
  inherited = br.branch_depth[deeper.source]
  _check_logprobs(deeper, RAGGED,
                  forced_before=np.where(inherited < deeper.branch_depth, inherited, -1))
  # Same request, same seed → same rows; the M rows of one request differ.
  again = sampling.branch(CFG, PARAMS, ro, rows, depths, forced, num_samples=3, seed=2)
  np.testing.assert_array_equal(again.tokens, br.tokens)


@jax.jit
def _step_from_branch_prefix(params, state, rows, depths, forced, layout):
  """Each request's M rows fed its forced token over the prefix ``branch`` builds."""
  prefix, _ = cache_lib.branch_prefix(state, layout)
  m = layout.row_slot.shape[0] // rows.shape[0]
  pos = np.repeat(state.prompt_len[rows] + depths, m)[:, None]
  n = pos.shape[0]
  return qwen3.bind(CFG, params)(np.repeat(forced, m)[:, None], pos, np.ones((n, 1), bool),
                                 cache_lib.init_cache(CFG, n, 1), prefix=prefix)[0]


def test_slot_layout_hand_worked():
  """Requests (5, d1), (2, d0), (5, d3), M = 2, in a batch of 8 rows (one padding request)."""
  lay = cache_lib.slot_layout(np.array([5, 2, 5]), np.array([1, 0, 3]), 2, 8)
  np.testing.assert_array_equal(lay.sources, [2, 5])
  np.testing.assert_array_equal(lay.slot_rows, [[2, 3, 0, 0], [0, 1, 4, 5]])
  np.testing.assert_array_equal(lay.slot_depth, [[0, 0, -1, -1], [1, 1, 3, 3]])
  np.testing.assert_array_equal(lay.row_slot, [4, 5, 0, 1, 6, 7, 0, 0])


BRANCH_REQUESTS = {  # rows, depths (clipped to the row's length - 1), forced tokens, M
    "three_sources": ([1, 4, 7, 7, 4], [0, 1, 5, 0, 7], [13, 17, 2, 5, 0], 1),
    "one_source_many_depths": ([4] * 6, [0, 1, 2, 3, 4, 5], [3, 3, 3, 9, 9, 9], 2),
    "uneven_sources_m3": ([2, 8, 2, 5, 2], [1, 0, 3, 2, 0], [6, 6, 6, 1, 11], 3),
}


@pytest.mark.parametrize("case", sorted(BRANCH_REQUESTS))
def test_branch_prefix_gives_the_full_forward_logits(case, common):
  """The KV a branch starts from, fed the forced token, gives a fresh forward's logits; the
  requests on one source share one prefix row of the source's KV."""
  ro = common
  rows, depths, forced, m = (np.asarray(x) for x in BRANCH_REQUESTS[case])
  depths = np.minimum(depths, ro.lengths[rows] - 1)
  layout = cache_lib.slot_layout(rows, depths, int(m), len(rows) * int(m))
  distinct = sorted(set(rows.tolist()))
  assert len(layout.sources) == bucket(len(distinct)) and set(layout.sources) == set(distinct)
  logits = _step_from_branch_prefix(PARAMS, ro.state, rows, depths, forced.astype(np.int32),
                                    layout)
  for i, (r, depth) in enumerate(zip(rows, depths)):
    seq = RAGGED[ro.question[r]] + ro.sequence(r)[:depth] + [int(forced[i])]
    for b in range(i * m, (i + 1) * m):
      np.testing.assert_allclose(np.asarray(logits[b, 0]), _full_logits(seq)[-1],
                                 rtol=1e-5, atol=1e-5)


def test_requests_share_their_source_prefix(common):
  """Requests on one source row reference one copy of its KV (the prefix grows with the
  distinct sources, not the requests), and sampling is unchanged: the rows equal those of
  one call per request, each with its own copy of the source's prefix (the earlier design),
  also for a branch of a branch."""
  ro = common
  r1, r2 = np.argsort(-ro.lengths, kind="stable")[:2]
  rows = [r1] * 5 + [r2, r2]
  depths = [0, 1, 2, 3, 1, 0, ro.lengths[r2] - 1]
  forced = [4, 4, 4, 4, 7, 9, 2]
  br = sampling.branch(CFG, PARAMS, ro, rows, depths, forced, num_samples=2, seed=4)
  assert br.state.prefix.k[0].shape[0] == 2  # two distinct sources, seven requests
  # Rows 6 and 9 were branched at depth 3 and 1: depth 1 is before one, at the other.
  rows2, forced2 = [0, 3, 3, 6, 9], [5, 5, 6, 5, 5]
  depths2 = np.minimum([0, 1, 2, 1, 1], br.lengths[rows2] - 1)
  deeper = sampling.branch(CFG, PARAMS, br, rows2, depths2, forced2, num_samples=2, seed=5)
  assert deeper.state.prefix.k[0].shape[0] == 4  # four distinct sources
  for whole, src, call_rows, call_depths, call_forced, seed in (
      (br, ro, rows, depths, forced, 4), (deeper, br, rows2, depths2, forced2, 5)):
    for i, req in enumerate(zip(call_rows, call_depths, call_forced)):
      alone = sampling.branch(CFG, PARAMS, src, *([x] for x in req), num_samples=2, seed=seed)
      # A request's keys fold only its own (row, depth, token, m): alone it draws the same.
      sl = slice(2 * i, 2 * i + 2)
      np.testing.assert_array_equal(whole.tokens[sl], alone.tokens)
      np.testing.assert_array_equal(whole.lengths[sl], alone.lengths)
      np.testing.assert_allclose(whole.logprobs[sl], alone.logprobs, rtol=1e-5, atol=1e-6)
  _check_logprobs(br, RAGGED)


def test_shared_prefix_rows_match_full_forward():
  """J = 2 prompts in a SharedPrefix, R rows each continuing differently, chunk of 3 tokens."""
  prompts = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
  conts = np.array([[9, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 20]], np.int32)  # R = 2

  @jax.jit
  def run(params):
    model = qwen3.bind(CFG, params)
    _, pc = model(prompts, np.tile(np.arange(4), (2, 1)), np.ones((2, 4), bool),
                  cache_lib.init_cache(CFG, 2, 4))
    prefix = cache_lib.SharedPrefix(k=pc.k, v=pc.v, valid=pc.valid)
    return model(conts, np.tile(np.arange(4, 7), (4, 1)), np.ones((4, 3), bool),
                 cache_lib.init_cache(CFG, 4, 3), prefix=prefix)[0]

  logits = run(PARAMS)
  for b in range(4):
    np.testing.assert_allclose(np.asarray(logits[b]),
                               _full_logits(list(prompts[b // 2]) + list(conts[b]))[4:],
                               rtol=1e-5, atol=1e-5)


def test_prefix_slots_rows_match_full_forward():
  """Rows naming their prefix through PrefixSlots (uneven: 1 row on prompt 0, 3 on prompt 1,
  one of which sees only its first 2 tokens), a chunk of 3 tokens each."""
  prompts = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
  conts = np.array([[9, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 20]], np.int32)
  slots = cache_lib.PrefixSlots(rows=np.array([[1, 0, 0], [0, 2, 3]], np.int32),
                                cut=np.array([[4, 0, 0], [4, 4, 2]], np.int32),
                                slot=np.array([3, 0, 4, 5], np.int32))
  start = np.array([4, 4, 4, 2])

  @jax.jit
  def run(params, slots):
    model = qwen3.bind(CFG, params)
    _, pc = model(prompts, np.tile(np.arange(4), (2, 1)), np.ones((2, 4), bool),
                  cache_lib.init_cache(CFG, 2, 4))
    prefix = cache_lib.SharedPrefix(k=pc.k, v=pc.v, valid=pc.valid, slots=slots)
    return model(conts, start[:, None] + np.arange(3), np.ones((4, 3), bool),
                 cache_lib.init_cache(CFG, 4, 3), prefix=prefix)[0]

  logits = run(PARAMS, slots)
  for b, (q, n) in enumerate(zip([1, 0, 1, 1], start)):
    np.testing.assert_allclose(np.asarray(logits[b]),
                               _full_logits(list(prompts[q][:n]) + list(conts[b]))[n:],
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="PrefixSlots place 3 rows but the chunk has 4"):
    run(PARAMS, cache_lib.PrefixSlots(rows=slots.rows, cut=slots.cut, slot=slots.slot[:3]))


def test_buckets_share_compiled_programs():
  cfg_s = sampling.SamplingConfig(max_new_tokens=2, top_k=5)  # used nowhere else
  before = sampler_lib._sample_program._cache_size()
  for prompts in ([[1, 2, 3], [4], [5, 6]], [[1, 2, 3, 4, 5], [6], [7] * 8, [2, 3]]):
    sampling.sample(CFG, PARAMS, prompts, cfg_s, num_samples=2, seed=0)
  # 3 and 4 questions share the bucket of 4; prompt lengths 3 … 8 the bucket of 8.
  assert sampler_lib._sample_program._cache_size() == before + 1


@pytest.mark.parametrize("case, match", [
    ("prompt_too_long", "needs 70 cache positions but the cache holds 64"),
    ("forced_token_outside_vocab", "forced token 24 is outside the vocabulary"),
    ("depth_beyond_length", r"depth (\d+) is beyond source row \d+'s length \1"),
    ("bad_top_p", "top_p=0 must be in"),
])
def test_clear_errors(case, match, common):
  with pytest.raises(ValueError, match=match):
    if case == "prompt_too_long":
      sampling.sample(CFG, PARAMS, [[1] * 61], COMMON, num_samples=1)
    elif case == "bad_top_p":
      sampling.SamplingConfig(top_p=0)
    else:
      row = int(np.argmax(common.lengths >= 4))
      depth, tok = (0, 24) if case == "forced_token_outside_vocab" else (common.lengths[row], 3)
      sampling.branch(CFG, PARAMS, common, [row], [depth], [tok], num_samples=2)


def test_vocab_mask_is_never_sampled():
  mask = np.ones(CFG.vocab_size, bool)
  mask[16:] = False
  ro = sampling.sample(CFG, PARAMS, RAGGED, COMMON, num_samples=32, seed=0, vocab_mask=mask)
  assert ro.tokens.max() < 16 and ro.policy["vocab_masked"]
  with pytest.raises(ValueError, match="masked out by vocab_mask"):
    sampling.branch(CFG, PARAMS, ro, [0], [1], [20], num_samples=1, vocab_mask=mask)


@pytest.fixture
def one_stage(monkeypatch):
  """The decode as it was before stages: one loop over a cache of every slot."""
  monkeypatch.setattr(sampler_lib, "FIRST_WIDTH", 1 << 30)


def test_staged_decode_equals_one_loop_over_every_slot(request):
  """Decode grows its KV by stages (64, 256, then the horizon here: lengths 5 … 300 cross both
  boundaries); tokens, log-probs and a branch from the result equal the old single loop."""
  sc = sampling.SamplingConfig(max_new_tokens=300, eos_ids=(2,), max_cache_len=400)
  prompts = [[3, 1, 4, 1, 5], [2, 7]]

  def run():
    ro = sampling.sample(CFG, PARAMS, prompts, sc, num_samples=8, seed=3)
    br = sampling.branch(CFG, PARAMS, ro, [9, 13], [3, 70], [4, 5], num_samples=2, seed=1)
    return ro, br

  grown = sampler_lib._grow_program._cache_size()
  staged = run()
  assert sampler_lib._grow_program._cache_size() > grown  # later stages ran
  request.getfixturevalue("one_stage")
  single = run()
  lengths = staged[0].lengths
  assert lengths.min() < 64 < 70 < lengths.max()  # crosses the stages (and the branch at 70)
  for got, want in zip(staged, single):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-6, atol=1e-6)


def test_short_rollouts_ignore_the_horizon():
  """Rows that stop by EOS before 64 tokens come out the same under a horizon of 64 and 4096
  (the latter decodes over a 64-slot cache until they stop)."""
  prompts = [[3, 1, 4, 1, 5], [2, 7]]
  short, long = (sampling.sample(CFG, PARAMS, prompts, sampling.SamplingConfig(
      max_new_tokens=n, eos_ids=(2,), max_cache_len=4200), num_samples=8, seed=3)
      for n in (64, 4096))
  done = (short.stop_reason == sampling.STOP_EOS)
  assert done.sum() >= 6 and not done.all()
  np.testing.assert_array_equal(short.lengths[done], long.lengths[done])
  np.testing.assert_array_equal(short.tokens[done], long.tokens[done, :64])
  np.testing.assert_allclose(short.logprobs[done], long.logprobs[done, :64], rtol=1e-6, atol=1e-6)
