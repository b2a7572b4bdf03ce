"""Batched student sampling and branching, jit-compiled, with the prompt's KV shared by its rows.

    sampling = SamplingConfig(max_new_tokens=256, temperature=1.0, eos_ids=(eos,))
    ro = sample(cfg, params, prompts, sampling, num_samples=G, seed=0)
    # ro.tokens int32[Q·G, max_new_tokens], ro.logprobs, ro.lengths, ro.stop_reason ...
    br = branch(cfg, params, ro, rows=[3, 3, 7], depths=[5, 5, 0], tokens=[11, 42, 9],
                num_samples=M, seed=1)
    # br: the same fields for the 3·M branched rollouts; br.branch_depth == the depths.

``sample`` prefills each prompt once (questions batched, left-padded to a bucketed length);
the G rows of a question attend to its prompt KV through a ``SharedPrefix`` (no copy per
row). The first token of each row is drawn from the prompt's last logits; the rest are drawn
inside a ``lax.while_loop`` per decode stage (see the cost notes) that stops as soon as every row
has hit EOS or its token limit.

``branch`` starts M rows from each (source rollout, depth t, forced token k): the source's
prompt KV and its generated KV are copied once per distinct source row into a shared
prefix that all the requests on that row attend, each masked to its depth < t (cost
independent of t; no prefill), k is fed as the token at depth t, and the rest is sampled
on-policy with the source's SamplingConfig. The returned rollouts are whole: their
tokens start at depth 0 (the source's first t tokens, then k, then the sampled tail).

Policy: π = softmax(z / T) restricted to ``vocab_mask``, then top-k, then top-p (nucleus: the
smallest set of most probable tokens whose mass reaches p), renormalised (MATH.md). Every
recorded log-probability is log π of that token under this truncated policy; a forced token
is not sampled and records NaN. ``Rollouts.policy`` records the policy.

Draws are by inverse CDF: one uniform per row and token, from the key
fold_in(fold_in(fold_in(key(seed), question_id), g), d) for row g of a question at depth d, so
a row's rollout does not depend on which other questions share the batch or on the bucket
sizes (up to fp reassociation in the matmuls). A branch row's key folds the source row's key,
the branch seed, depth, forced token and its index m < M; repeating a request in one call is
refused (it would repeat the rows).

Cost notes: decode runs in stages whose generated KV is FIRST_WIDTH (64) slots, then ×GROWTH
(4) up to the horizon: a step attends to its prefix and its stage's slots (masked beyond the
current length), a later stage runs only while some row is live (one host sync per stage, a
compiled program per width reached), so rollouts that stop at t tokens pay for under
max(64, 4t) slots whatever max_new_tokens is. A branch's prefix is the source's prompt plus all
its generated slots, copied once per distinct source row (not per request or row: the rows
of every request on it attend it through ``PrefixSlots``), so branching costs the same at any
depth and its memory grows with the new tokens and the distinct sources. top-p sorts the
vocabulary every step; temperature and top-k do not.

Shapes are bucketed (questions, branch requests, a branch's distinct sources and the most
requests on one source to a power of two, prompt length to a power of two ≥ 8), so a sweep
compiles a handful of programs per (model, SamplingConfig, G).

Params laid out on a mesh (``distributed.param_sharding``) are all it takes to run sharded:
``sample`` and ``branch`` read the mesh off the params and lay every KV cache and the decode
state out on it (``distributed.cache_sharding``: kv heads over "model", rows over "data");
XLA partitions the rest. One device (no mesh): the programs are unchanged.

Shape letters: see gradalign_jax/__init__.py (a sample call's J prefix groups are its Q
questions with R = G rows each; a branch call's are its requests, with R = M).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import distributed
from gradalign_jax.gradients import MASKED_LOGIT
from gradalign_jax.models import cache as cache_lib
from gradalign_jax.models import qwen3
from gradalign_jax.shapes import bucket

STOP_EOS, STOP_MAX_TOKENS = 0, 1
STOP_REASONS = ("eos", "max_new_tokens")
_BRANCH_SALT = 0x6272  # separates branch keys from sample keys


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """The sampling policy and stopping rule (hashable: a static jit argument).

  max_new_tokens: horizon in generated tokens (a branched rollout keeps the same horizon,
    counted from depth 0). temperature > 0; top_p in (0, 1] (1 = off); top_k ≥ 0 (0 = off).
  eos_ids: token ids that end a rollout (kept as its last token). pad_id fills tokens after
    the end. max_cache_len: most positions a row may use (prompt + generated); default the
    model's max_position_embeddings.
  """
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  max_cache_len: int | None = None

  def __post_init__(self):
    if isinstance(self.eos_ids, int):
      object.__setattr__(self, "eos_ids", (self.eos_ids,))
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be ≥ 1")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature} must be > 0 (greedy: use a small T)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]; 1 turns it off")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be ≥ 0; 0 turns it off")

  def policy_only(self) -> "SamplingConfig":
    """The fields that define π (temperature, top_p, top_k), the rest at defaults: a static
    jit argument that does not recompile for another horizon or EOS."""
    return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

  def policy(self) -> dict[str, Any]:
    """The sampling policy, as recorded with results."""
    return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                max_new_tokens=self.max_new_tokens, eos_ids=list(self.eos_ids),
                truncated=self.top_p < 1 or self.top_k > 0)


@dataclasses.dataclass
class Rollouts:
  """B rollouts (host numpy arrays) and the device KV state they keep for branching.

  tokens:       int32[B, max_new_tokens] generated ids from depth 0, pad_id after the end.
  logprobs:     float32[B, max_new_tokens] log π of each token under the sampling policy
                (NaN for a forced token and after the end).
  lengths:      int32[B] generated tokens, EOS included.
  stop_reason:  int8[B] STOP_EOS or STOP_MAX_TOKENS (names in STOP_REASONS).
  question:     int32[B] index of the row's prompt in the ``sample`` call that started it.
  question_id:  int32[B] the id folded into the row's key.
  branch_depth: int32[B] depth of the forced token, -1 for an ordinary on-policy rollout.
  source:       int32[B] row of the source Rollouts a branch started from, -1 otherwise.
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  stop_reason: np.ndarray
  question: np.ndarray
  question_id: np.ndarray
  branch_depth: np.ndarray
  source: np.ndarray
  sampling: SamplingConfig
  policy: dict
  state: cache_lib.RolloutState
  keys: np.ndarray  # uint32 key data [B, 2] of each row's stream
  depth0: np.ndarray  # int32[B] depth of the row's first generated slot

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def sequence(self, b: int) -> list[int]:
    """Generated ids of rollout b (no padding)."""
    return self.tokens[b, : self.lengths[b]].tolist()



def policy_logprobs(logits: jax.Array, sampling: SamplingConfig,
                    vocab_mask: jax.Array | None = None) -> jax.Array:
  """log π over the vocab: f32[..., V] → f32[..., V], −inf outside the policy's support.

  Order as Hugging Face: temperature, then top-k, then top-p on the renormalised result.
  """
  z = logits.astype(jnp.float32) / sampling.temperature
  if vocab_mask is not None:
    z = jnp.where(vocab_mask, z, -jnp.inf)
  if 0 < sampling.top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, sampling.top_k)[0][..., -1:]
    z = jnp.where(z >= kth, z, -jnp.inf)
  logp = jax.nn.log_softmax(z, axis=-1)
  if sampling.top_p < 1:
    desc = -jnp.sort(-logp, axis=-1)
    p = jnp.exp(desc)
    kept = (jnp.cumsum(p, axis=-1) - p) < sampling.top_p  # mass before it is short of p
    threshold = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    logp = jax.nn.log_softmax(jnp.where(logp >= threshold, logp, -jnp.inf), axis=-1)
  return logp


def as_policy(policy: "SamplingConfig | float") -> SamplingConfig:
  """The sampling policy π (temperature, top-p, top-k; ``SamplingConfig.policy_only``) from a
  SamplingConfig or a bare temperature (untruncated)."""
  if isinstance(policy, SamplingConfig):
    return policy.policy_only()
  return SamplingConfig(temperature=float(policy))


def policy_logits(logits: jax.Array, sampling: SamplingConfig,
                  vocab_mask: jax.Array | None = None) -> jax.Array:
  """log π (``policy_logprobs``) as finite logits: f32[..., V], −1e30 (``MASKED_LOGIT``)
  outside the support instead of −inf, so the masked softmaxes of ``gradients`` give π
  exactly (0 off the support) and 0 · logit stays 0. What scoring and targeting read as the
  student's logits (MATH.md: with top-p/top-k, π is the truncated, renormalised policy)."""
  logp = policy_logprobs(logits, sampling, vocab_mask)
  return jnp.where(jnp.isfinite(logp), logp, MASKED_LOGIT)


def in_support(policy_logits_: jax.Array) -> jax.Array:
  """bool[..., V]: the rows of ``policy_logits`` output inside the sampling support S_u."""
  return policy_logits_ > MASKED_LOGIT / 2


def _blocks(v: int) -> int:
  """The largest divisor of v that is ≤ √v: the two-level inverse-CDF draw's block count."""
  return max(c for c in range(1, int(v ** 0.5) + 1) if v % c == 0)


def _uniforms(keys: jax.Array, depth: jax.Array) -> jax.Array:
  """The uniform of each row's draw at each depth: keys [B]; depth int32[B, W] → f32[B, W]."""
  one = lambda k, d: jax.random.uniform(jax.random.fold_in(k, d), (), jnp.float32)
  return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(keys, depth)


def _draw(logp: jax.Array, u: jax.Array):
  """Inverse-CDF draw per row. logp f32[B, V]; u f32[B] uniforms in [0, 1).

  One uniform per row (not V Gumbels: the random bits cost more than a small model's
  step) and a two-level CDF (the masses of Z = _blocks(V) blocks, then one block's V / Z
  tokens), so no length-V scan.
  A token of probability 0 is never drawn. Returns (token int32[B], its log π f32[B]).
  """
  b, v = logp.shape
  z = _blocks(v)
  blocks = jnp.exp(logp).reshape(b, z, v // z)
  cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, Z]
  target = u * cdf[:, -1]
  zi = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), z - 1)
  before = jnp.where(zi > 0, jnp.take_along_axis(cdf, jnp.maximum(zi - 1, 0)[:, None], 1)[:, 0],
                     0.0)
  inner = jnp.take_along_axis(blocks, zi[:, None, None], axis=1)[:, 0]  # [B, V / Z]
  j = jnp.sum(jnp.cumsum(inner, axis=-1) <= (target - before)[:, None], axis=-1)
  last = jnp.max(jnp.where(inner > 0, jnp.arange(v // z), 0), axis=-1)  # rounding guard
  tok = (zi * (v // z) + jnp.minimum(j, last)).astype(jnp.int32)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _is_eos(tok: jax.Array, sampling: SamplingConfig) -> jax.Array:
  if not sampling.eos_ids:
    return jnp.zeros(tok.shape, bool)
  return jnp.isin(tok, jnp.asarray(sampling.eos_ids, jnp.int32))


# Decode grows the generated KV by stages: widths FIRST_WIDTH, ×GROWTH, …, up to the horizon.
# A step attends over its stage's width, so a row that stops at t tokens pays for < GROWTH·t
# slots (at least FIRST_WIDTH), not for max_new_tokens; a stage is one compiled program.
FIRST_WIDTH, GROWTH = 64, 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Decoding:
  """The decode loop's carry. Buffer slot i of row b holds its token at depth depth0[b] + i.

  step int32[]: slots written − 1; tokens int32[B, W] and logprobs f32[B, W] (W = the call's
  slots); count int32[B]; finished bool[B]; gen: KVCache, L × [B, K, W', H], W' the stage's width.
  """
  step: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  count: jax.Array
  finished: jax.Array
  gen: cache_lib.KVCache


def _start(cfg, sampling, first_tok, first_lp, limit, active, n_slots, width,
           mesh) -> _Decoding:
  """Slot 0 holds first_tok / first_lp ([B]); limit int32[B] most tokens a row may hold;
  active bool[B] (False = padding row). mesh: the params' (rows over "data", kv heads over
  "model"), or None."""
  b = first_tok.shape[0]
  return cache_lib.constrain(mesh, _Decoding(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((b, n_slots), sampling.pad_id, jnp.int32).at[:, 0].set(first_tok),
      logprobs=jnp.full((b, n_slots), jnp.nan, jnp.float32).at[:, 0].set(first_lp),
      count=active.astype(jnp.int32),
      finished=~active | _is_eos(first_tok, sampling) | (limit <= 1),
      gen=cache_lib.init_cache(cfg, b, width)))


def _decode(model, sampling, vocab_mask, prefix, base_pos, limit, keys, depth0,
            carry: _Decoding) -> _Decoding:
  """Decode steps while a row is live and the stage's width (carry.gen's) has room.

  base_pos int32[B] position of slot 0; limit int32[B]; keys [B]; depth0 int32[B].
  """
  width = carry.gen.capacity
  # This stage's uniforms at once: threefry per step inside the loop costs a small model 10%.
  u_all = _uniforms(keys, depth0[:, None] + jnp.arange(width, dtype=jnp.int32)[None])

  def cond(c):
    return (c.step < width - 1) & ~jnp.all(c.finished)

  def body(c):
    i = c.step
    live = ~c.finished
    tok = jax.lax.dynamic_slice_in_dim(c.tokens, i, 1, axis=1)
    logits, gen = model(tok, (base_pos + i)[:, None], live[:, None], c.gen, prefix=prefix)
    logp = policy_logprobs(logits[:, 0], sampling, vocab_mask)
    u = jax.lax.dynamic_index_in_dim(u_all, i + 1, axis=1, keepdims=False)
    nxt, lp = _draw(logp, u)
    nxt = jnp.where(live, nxt, sampling.pad_id)
    lp = jnp.where(live, lp, jnp.nan)
    count = c.count + live
    return _Decoding(
        step=i + 1, tokens=jax.lax.dynamic_update_slice_in_dim(c.tokens, nxt[:, None], i + 1, 1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(c.logprobs, lp[:, None], i + 1, 1),
        count=count, finished=c.finished | (live & (_is_eos(nxt, sampling) | (count >= limit))),
        gen=gen)

  return jax.lax.while_loop(cond, body, carry)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "width", "mesh"))
def _grow_program(cfg, sampling, width, mesh, params, prefix, base_pos, limit, keys, depth0, carry,
                  vocab_mask):
  """The next stage: the generated KV padded to ``width`` slots, then decode on."""
  def pad(x, axis):  # the slot axis to width
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, width - x.shape[axis])
    return jnp.pad(x, widths)
  gen = carry.gen
  k, v = cache_lib.map_kv(pad, gen.k, gen.v)
  gen = cache_lib.constrain(mesh, cache_lib.KVCache(
      k=k, v=v, length=gen.length,
      valid=jnp.pad(gen.valid, ((0, 0), (0, width - gen.capacity)))))
  return _decode(qwen3.bind(cfg, params), sampling, vocab_mask, prefix, base_pos, limit, keys,
                 depth0, dataclasses.replace(carry, gen=gen))


def _stages(cfg, sampling, mesh, params, prefix, base_pos, limit, keys, depth0, carry,
            vocab_mask, n_slots) -> _Decoding:
  """Runs the later stages while some row is live (one host sync per stage)."""
  while carry.gen.capacity < n_slots and not bool(jnp.all(carry.finished)):
    width = min(n_slots, carry.gen.capacity * GROWTH)
    carry = _grow_program(cfg, sampling, width, mesh, params, prefix, base_pos, limit, keys, depth0,
                          carry, vocab_mask)
  return carry


def _first_width(n_slots: int) -> int:
  return min(n_slots, FIRST_WIDTH)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "group_size", "width", "mesh"))
def _sample_program(cfg, sampling, group_size, width, mesh, params, prompt_tok, prompt_pos,
                    prompt_valid, keys, active, vocab_mask):
  """Prefill Q left-padded prompts once, then sample group_size rows from each (first stage)."""
  model = qwen3.bind(cfg, params)
  nq, p = prompt_tok.shape
  logits, pcache = model(prompt_tok, prompt_pos, prompt_valid,
                         cache_lib.init_cache(cfg, nq, p, mesh))
  prefix = cache_lib.SharedPrefix(k=pcache.k, v=pcache.v, valid=pcache.valid)
  logp = jnp.repeat(policy_logprobs(logits[:, -1], sampling, vocab_mask), group_size, axis=0)
  b = nq * group_size
  first_tok, first_lp = _draw(logp, _uniforms(keys, jnp.zeros((b, 1), jnp.int32))[:, 0])
  prompt_len = jnp.repeat(jnp.sum(prompt_valid, axis=1, dtype=jnp.int32), group_size)
  n = sampling.max_new_tokens
  limit = jnp.full((b,), n, jnp.int32)
  carry = _start(cfg, sampling, first_tok, first_lp, limit, active, n, width, mesh)
  carry = _decode(model, sampling, vocab_mask, prefix, prompt_len, limit, keys,
                  jnp.zeros((b,), jnp.int32), carry)
  return carry, prefix, prompt_len, limit


@functools.partial(jax.jit,
                   static_argnames=("cfg", "sampling", "group_size", "n_slots", "width", "mesh"))
def _branch_program(cfg, sampling, group_size, n_slots, width, mesh, params, state, rows, depths,
                    forced, keys, active, vocab_mask, layout):
  """M = group_size rows per (source row, depth, forced token), from the source's KV (first
  stage). layout: ``cache_lib.SlotLayout`` of the requests' distinct sources (one prefix
  each)."""
  model = qwen3.bind(cfg, params)
  prefix, prefix_pos = cache_lib.constrain(mesh, cache_lib.branch_prefix(state, layout))
  rep = lambda x: jnp.repeat(x, group_size)
  prompt_len = rep(jnp.take(state.prompt_len, rows))
  depth0 = rep(depths)
  limit = jnp.minimum(n_slots, sampling.max_new_tokens - depth0)
  b = rows.shape[0] * group_size
  carry = _start(cfg, sampling, rep(forced), jnp.full((b,), jnp.nan, jnp.float32), limit,
                 active, n_slots, width, mesh)
  carry = _decode(model, sampling, vocab_mask, prefix, prompt_len + depth0, limit, keys, depth0,
                  carry)
  return carry, prefix, prefix_pos, prompt_len, depth0, limit


@jax.jit
def _sample_keys(seed, question_ids, row_ids):
  base = jax.random.key(seed)
  return jax.vmap(lambda q, r: jax.random.fold_in(jax.random.fold_in(base, q), r))(
      question_ids, row_ids)


@jax.jit
def _branch_keys(seed, source_keys, depths, tokens, m):
  def one(key, d, k, i):
    for x in (_BRANCH_SALT, seed, d, k, i):
      key = jax.random.fold_in(key, x)
    return key
  return jax.vmap(one)(jax.random.wrap_key_data(source_keys), depths, tokens, m)


def _capacity(cfg: qwen3.Qwen3Config, sampling: SamplingConfig) -> int:
  return sampling.max_cache_len or cfg.max_position_embeddings


def _finish(toks, lps, count, eos_ids) -> np.ndarray:
  last = np.take_along_axis(toks, np.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
  return np.where(np.isin(last, list(eos_ids)) & (count > 0), STOP_EOS,
                  STOP_MAX_TOKENS).astype(np.int8)


def sample(cfg: qwen3.Qwen3Config, params, prompts: Sequence[Sequence[int]],
           sampling: SamplingConfig, *, num_samples: int, seed: int = 0,
           question_ids: Sequence[int] | None = None,
           vocab_mask: np.ndarray | None = None) -> Rollouts:
  """Samples ``num_samples`` rollouts from each prompt (rows q·G … q·G + G − 1 are prompt q).

  prompts: Q lists of token ids (ragged). question_ids: ints folded into the keys (default
  0 … Q − 1; pass dataset indices so a question's rollouts do not depend on its batch).
  vocab_mask: bool[V], False = never sampled (e.g. Qwen3's padded vocab rows).
  """
  prompts = [list(map(int, p)) for p in prompts]
  nq, g = len(prompts), int(num_samples)
  if nq == 0 or g < 1:
    raise ValueError(f"need at least one prompt and num_samples ≥ 1 (got {nq}, {g})")
  cap = _capacity(cfg, sampling)
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if len(p) + sampling.max_new_tokens > cap:
      raise ValueError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={sampling.max_new_tokens} it "
          f"needs {len(p) + sampling.max_new_tokens} cache positions but the cache holds {cap} "
          f"(SamplingConfig.max_cache_len or the model's max_position_embeddings): shorten the "
          f"prompt or lower max_new_tokens")
    _check_tokens(p, cfg, f"prompt {i}")
  qids = np.arange(nq) if question_ids is None else np.asarray(question_ids, np.int64)
  if qids.shape != (nq,):
    raise ValueError(f"question_ids has shape {qids.shape}; expected ({nq},)")
  qb, pb = bucket(nq), bucket(max(map(len, prompts)), 8)
  tok = np.full((qb, pb), sampling.pad_id, np.int32)
  pos = np.zeros((qb, pb), np.int32)
  valid = np.zeros((qb, pb), bool)
  for i, p in enumerate(prompts + [[sampling.pad_id]] * (qb - nq)):
    tok[i, pb - len(p):], pos[i, pb - len(p):], valid[i, pb - len(p):] = p, np.arange(len(p)), True
  all_qids = np.concatenate([qids, np.full(qb - nq, -1)]).astype(np.int32)
  keys = _sample_keys(int(seed) % 2**31, np.repeat(all_qids, g),
                      np.tile(np.arange(g, dtype=np.int32), qb))
  active = np.arange(qb * g) < nq * g
  mask = _mask_arg(vocab_mask, cfg)
  n = sampling.max_new_tokens
  mesh = distributed.mesh_of(params)
  carry, prefix, prompt_len, limit = _sample_program(
      cfg, sampling, g, _first_width(n), mesh, params, tok, pos, valid, keys, active, mask)
  depth0 = jnp.zeros_like(prompt_len)
  carry = _stages(cfg, sampling, mesh, params, prefix, prompt_len, limit, keys, depth0, carry,
                  mask, n)
  state = cache_lib.RolloutState(prefix=prefix, prefix_pos=jnp.asarray(pos), gen=carry.gen,
                                 base_pos=prompt_len, prompt_len=prompt_len)
  b = nq * g
  toks, lps, count = (np.asarray(x)[:b] for x in (carry.tokens, carry.logprobs, carry.count))
  return Rollouts(
      tokens=toks, logprobs=lps, lengths=count, stop_reason=_finish(toks, lps, count,
                                                                    sampling.eos_ids),
      question=np.repeat(np.arange(nq, dtype=np.int32), g),
      question_id=np.repeat(qids.astype(np.int32), g),
      branch_depth=np.full(b, -1, np.int32), source=np.full(b, -1, np.int32),
      sampling=sampling, policy=_policy(sampling, vocab_mask), state=state,
      keys=np.asarray(jax.random.key_data(keys))[:b], depth0=np.zeros(b, np.int32))


def branch(cfg: qwen3.Qwen3Config, params, source: Rollouts, rows: Sequence[int],
           depths: Sequence[int], tokens: Sequence[int], num_samples: int, *, seed: int = 0,
           vocab_mask: np.ndarray | None = None,
           max_branch_tokens: int | None = None) -> Rollouts:
  """Targeted rollouts: for each request i, ``num_samples`` rows continue source row
  ``rows[i]`` after its first ``depths[i]`` tokens, with ``tokens[i]`` forced at that depth
  and the rest sampled on-policy (the source's SamplingConfig and horizon).

  Rows of the result: request i's M rows are i·M … i·M + M − 1. No prompt or prefix is
  recomputed; the cost does not depend on the depths. max_branch_tokens (static) caps the
  tokens a branch row adds, forced one included (default: up to the horizon).
  vocab_mask should be the one the source was sampled with.
  """
  rows, depths, forced = (np.asarray(x, np.int64).reshape(-1) for x in (rows, depths, tokens))
  n, m = rows.shape[0], int(num_samples)
  if n == 0 or m < 1 or depths.shape[0] != n or forced.shape[0] != n:
    raise ValueError(f"rows, depths and tokens must have one entry per request (got "
                     f"{rows.shape[0]}, {depths.shape[0]}, {forced.shape[0]}) and num_samples ≥ 1")
  sampling = source.sampling
  seen = set()
  for i, (r, t, k) in enumerate(zip(rows, depths, forced)):
    if not 0 <= r < len(source):
      raise ValueError(f"branch request {i}: source row {r} is not in 0 … {len(source) - 1}")
    if not 0 <= t < source.lengths[r]:
      raise ValueError(
          f"branch request {i}: depth {t} is beyond source row {r}'s length "
          f"{source.lengths[r]} (a branch replaces the token at depth t, so 0 ≤ t < length)")
    _check_tokens([k], cfg, f"branch request {i}: forced token", vocab_mask)
    if (r, t, k) in seen:
      raise ValueError(f"branch request {i} repeats ({r}, {t}, {k}); ask for more num_samples "
                       f"instead (same seed, same request → same rows)")
    seen.add((r, t, k))
  n_slots = min(sampling.max_new_tokens, max_branch_tokens or sampling.max_new_tokens)
  nb = bucket(n)  # request counts share a few compiled programs (powers of two)
  pad = nb - n
  rows_b = np.concatenate([rows, np.zeros(pad, np.int64)]).astype(np.int32)
  depths_b = np.concatenate([depths, np.zeros(pad, np.int64)]).astype(np.int32)
  forced_b = np.concatenate([forced, np.zeros(pad, np.int64)]).astype(np.int32)
  keys = _branch_keys(int(seed) % 2**31, np.repeat(source.keys[rows_b], m, axis=0),
                      np.repeat(depths_b, m),
                      np.repeat(forced_b, m), np.tile(np.arange(m, dtype=np.int32), nb))
  active = np.arange(nb * m) < n * m
  mask = _mask_arg(vocab_mask, cfg)
  mesh = distributed.mesh_of(params)
  carry, prefix, prefix_pos, prompt_len, depth0, limit = _branch_program(
      cfg, sampling, m, n_slots, _first_width(n_slots), mesh, params, source.state, rows_b,
      depths_b, forced_b, keys, active, mask, cache_lib.slot_layout(rows, depths, m, nb * m))
  base_pos = prompt_len + depth0
  carry = _stages(cfg, sampling, mesh, params, prefix, base_pos, limit, keys, depth0, carry,
                  mask, n_slots)
  state = cache_lib.RolloutState(prefix=prefix, prefix_pos=prefix_pos, gen=carry.gen,
                                 base_pos=base_pos, prompt_len=prompt_len)
  b = n * m
  toks, lps, count = (np.asarray(x)[:b] for x in (carry.tokens, carry.logprobs, carry.count))
  src = np.repeat(rows, m)
  t0 = np.repeat(depths, m)
  width = sampling.max_new_tokens
  full_t = np.full((b, width), sampling.pad_id, np.int32)
  full_lp = np.full((b, width), np.nan, np.float32)
  for j in range(b):
    t, c = t0[j], count[j]
    full_t[j, :t], full_lp[j, :t] = source.tokens[src[j], :t], source.logprobs[src[j], :t]
    full_t[j, t:t + c], full_lp[j, t:t + c] = toks[j, :c], lps[j, :c]
  return Rollouts(
      tokens=full_t, logprobs=full_lp, lengths=(t0 + count).astype(np.int32),
      stop_reason=_finish(toks, lps, count, sampling.eos_ids),
      question=source.question[src], question_id=source.question_id[src],
      branch_depth=t0.astype(np.int32), source=src.astype(np.int32), sampling=sampling,
      policy=_policy(sampling, vocab_mask), state=state,
      keys=np.asarray(jax.random.key_data(keys))[:b], depth0=t0.astype(np.int32))


def _check_tokens(ids, cfg, what, vocab_mask=None):
  for k in ids:
    if not 0 <= k < cfg.vocab_size:
      raise ValueError(f"{what} {k} is outside the vocabulary [0, {cfg.vocab_size})")
    if vocab_mask is not None and not vocab_mask[k]:
      raise ValueError(f"{what} {k} is masked out by vocab_mask (a padded vocab row)")


def _mask_arg(vocab_mask, cfg):
  if vocab_mask is None:
    return None
  vocab_mask = np.asarray(vocab_mask, bool)
  if vocab_mask.shape != (cfg.vocab_size,):
    raise ValueError(f"vocab_mask has shape {vocab_mask.shape}; expected ({cfg.vocab_size},)")
  return vocab_mask


def _policy(sampling, vocab_mask):
  return dict(sampling.policy(), vocab_masked=vocab_mask is not None)
