"""Qwen3 (dense) in Flax NNX, with a pure functional entry point and a KV-cache path.

Shape letters: see gradalign_jax/__init__.py.

Weights keep the Hugging Face orientation (``[out, in]``) so a checkpoint tensor is
memory-mapped straight to its device with a reshape, never a transpose; the einsums
contract over the last axis of both operands.

Numerics follow ``transformers.Qwen3ForCausalLM``: RMSNorm in fp32 then cast back and
scaled by the weight, q/k RMSNorm over the head dim *before* split-half RoPE, softmax in
fp32, SiLU-gated MLP. Logits are always produced in fp32 (``preferred_element_type``),
whatever the weight dtype.

The cached path reads and writes a ``KVCache`` and attends a ``SharedPrefix`` (both in
``models/cache.py``): every row writes at one shared slot index, ragged rows are a validity
mask plus per-row RoPE positions, and a prefix is seen by a group of rows without a copy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gradalign_jax.models.cache import KVCache, SharedPrefix

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_PRECISIONS = {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}


def resolve_dtype(dtype: Any) -> jnp.dtype:
  """Returns the jnp dtype for "float32" | "bfloat16" | "float16" (or a dtype object)."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  name = jnp.dtype(dtype).name
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """Architecture of a dense Qwen3 model (hashable: it is a static jit argument).

  ``dtype`` is the weight/activation dtype. ``matmul_precision`` is passed to every
  matmul: "default" is fast; "highest" is needed for fp32 parity with PyTorch on GPU/TPU,
  whose default fp32 matmuls use reduced-precision (TF32/bf16) passes. CPU is exact anyway.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"
  matmul_precision: str = "default"

  def __post_init__(self):
    resolve_dtype(self.dtype)
    if self.matmul_precision not in _PRECISIONS:
      raise ValueError(f"unknown matmul_precision {self.matmul_precision!r}; "
                       f"use one of {sorted(_PRECISIONS)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def jnp_dtype(self):
    return resolve_dtype(self.dtype)

  @property
  def precision(self):
    return _PRECISIONS[self.matmul_precision]

  def num_params(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * h
    if self.attention_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads) + d
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * layer + d + head


# ---------------------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x²) + eps) in fp32, cast back, times the weight (as HF Qwen3RMSNorm)."""

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Split-half rotary embedding. x: [B, T, *, H]; positions: int32[B, T]."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def _einsum_by_reduction(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.einsum(eq, a, b)`` as a broadcast multiply and a sum, in fp32.

  For one query token the attention einsums are B·K tiny matrix-vector products, which XLA
  on CPU runs as that many separate dot calls; a fused multiply-reduce is one loop.
  """
  ins, out = eq.split("->")
  la, lb = ins.split(",")
  letters = list(dict.fromkeys(la + lb))

  def expand(x, labels):
    order = [c for c in letters if c in labels]
    x = jnp.transpose(x.astype(jnp.float32), [labels.index(c) for c in order])
    return x.reshape([x.shape[order.index(c)] if c in labels else 1 for c in letters])

  r = jnp.sum(expand(a, la) * expand(b, lb),
              axis=tuple(i for i, c in enumerate(letters) if c not in out))
  kept = [c for c in letters if c in out]
  return jnp.transpose(r, [kept.index(c) for c in out])


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Attention(nnx.Module):
  """Grouped-query attention with per-head q/k RMSNorm before RoPE."""

  def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
    d, n, k, h, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype
    self.cfg = cfg
    self.q_proj = nnx.Param(_normal(rngs, (n, h, d), dt))
    self.k_proj = nnx.Param(_normal(rngs, (k, h, d), dt))
    self.v_proj = nnx.Param(_normal(rngs, (k, h, d), dt))
    self.o_proj = nnx.Param(_normal(rngs, (d, n, h), dt))
    if cfg.attention_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), dt))
      self.k_bias = nnx.Param(jnp.zeros((k, h), dt))
      self.v_bias = nnx.Param(jnp.zeros((k, h), dt))
      self.o_bias = nnx.Param(jnp.zeros((d,), dt))
    self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
    self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dt)

  def __call__(self, x, positions, mask, kv=None, write_at=None, prefix=None):
    """x: [B, T, D]; positions: int32[B, T]; mask: bool[B, T, S].

    Without a cache S == T. With ``kv = (k_cache, v_cache, layer)`` ([L, B, S, K, H] each)
    the new keys/values are written in place at (``layer``, slot ``write_at``) and attention
    runs over this layer's S slots. ``prefix = (k, v, shared)`` (this layer's [J, P, K, H]
    keys/values of a ``SharedPrefix``) adds P slots that rows [j·R, (j+1)·R) all see,
    R = B // J, or the rows ``shared.slots`` names, uncopied.
    Returns (out [B, T, D], (k_cache, v_cache) or None).
    """
    cfg, prec = self.cfg, self.cfg.precision
    b, t, d = x.shape
    n, nkv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Projections as 2-D matmuls over flattened heads (X = N·H or K·H; the reshapes of the
    # weights are free): with the head axes apart XLA on CPU re-lays a weight out every call.
    proj = lambda w, heads: jnp.einsum("BTD,XD->BTX", x, w.reshape(heads * h, d),
                                       precision=prec).reshape(b, t, heads, h)
    q = proj(self.q_proj[...], n)
    k = proj(self.k_proj[...], nkv)
    v = proj(self.v_proj[...], nkv)
    if cfg.attention_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    q = rope(self.q_norm(q), positions, cfg.rope_theta)
    k = rope(self.k_norm(k), positions, cfg.rope_theta)
    if kv is not None:
      k_all, v_all, layer = kv
      # Writing into the all-layer buffer (not a per-layer copy re-stacked afterwards) lets
      # XLA update the cache in place inside a decode loop.
      at = (layer, 0, write_at, 0, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
      v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
      kv = (k_all, v_all)
      k, v = k_all[layer], v_all[layer]
    a = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, a, h)
    neg = jnp.finfo(jnp.float32).min
    if t == 1:  # decode step: matrix-vector products, fused (see _einsum_by_reduction)
      dot = _einsum_by_reduction
    else:
      dot = functools.partial(jnp.einsum, precision=prec, preferred_element_type=jnp.float32)
    if prefix is None and t > 1:
      # Batch axes leading (B, K) so XLA's CPU backend runs batched GEMMs instead of
      # re-laying out operands per (row, head): 2-3x faster prefill and scoring at small H.
      qh, kh, vh = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      scores = dot("BKATH,BKSH->BKATS", qh, kh) * (h ** -0.5)
      scores = jnp.where(mask[:, None, None], scores, neg)
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
      out = dot("BKATS,BKSH->BKATH", probs, vh).transpose(0, 3, 1, 2, 4).astype(v.dtype)
    elif prefix is None:
      scores = dot("BTKAH,BSKH->BKATS", q, k) * (h ** -0.5)
      scores = jnp.where(mask[:, None, None], scores, neg)
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
      out = dot("BKATS,BSKH->BTKAH", probs, v).astype(v.dtype)
    else:
      scores = dot("BTKAH,BSKH->BKATS", q, k) * (h ** -0.5)
      scores = jnp.where(mask[:, None, None], scores, neg)
      pk, pv, pre = prefix
      j, p = pre.valid.shape
      # The rows of prefix j laid out as [J, R] (queries gathered when slots name them: the
      # prefix KV is read in place, never copied per row), scores gathered back per row.
      slots = pre.slots
      q_groups = (q.reshape(j, b // j, *q.shape[1:]) if slots is None
                  else jnp.take(q, slots.rows, axis=0))
      pscores = dot("JRTKAH,JPKH->JRKATP", q_groups, pk) * (h ** -0.5)
      pscores = jnp.where(pre.visible()[:, :, None, None, None], pscores, neg)
      pscores = pscores.reshape(-1, *pscores.shape[2:])
      if slots is not None:
        pscores = jnp.take(pscores, slots.slot, axis=0)
      both = jnp.concatenate([pscores, scores], axis=-1)
      probs = jax.nn.softmax(both, axis=-1).astype(v.dtype)
      pprobs = probs[..., :p]
      if slots is not None:
        pprobs = jnp.take(pprobs, slots.rows.reshape(-1), axis=0)
      pprobs = pprobs.reshape(j, -1, *pprobs.shape[1:])
      pout = dot("JRKATP,JPKH->JRTKAH", pprobs, pv).reshape(-1, t, cfg.num_kv_heads, a, h)
      if slots is not None:
        pout = jnp.take(pout, slots.slot, axis=0)
      out = (pout + dot("BKATS,BSKH->BTKAH", probs[..., p:], v)).astype(v.dtype)
    out = jnp.einsum("BTX,DX->BTD", out.reshape(b, t, n * h), self.o_proj[...].reshape(d, n * h),
                     precision=prec)
    if cfg.attention_bias:
      out = out + self.o_bias[...]
    return out, kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate x) * up x)."""

  def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype
    self.precision = cfg.precision
    self.gate_proj = nnx.Param(_normal(rngs, (f, d), dt))
    self.up_proj = nnx.Param(_normal(rngs, (f, d), dt))
    self.down_proj = nnx.Param(_normal(rngs, (d, f), dt))

  def __call__(self, x):
    p = self.precision
    gate = jnp.einsum("BTD,FD->BTF", x, self.gate_proj[...], precision=p)
    up = jnp.einsum("BTD,FD->BTF", x, self.up_proj[...], precision=p)
    return jnp.einsum("BTF,DF->BTD", jax.nn.silu(gate) * up, self.down_proj[...], precision=p)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, mask, kv=None, write_at=None, prefix=None):
    attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, write_at, prefix)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen3(nnx.Module):
  """Qwen3 causal LM. Parameter names mirror the HF checkpoint (see checkpoint.py)."""

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.jnp_dtype))
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.jnp_dtype))

  def hidden(self, tokens, positions, mask, cache: KVCache | None = None,
             prefix: SharedPrefix | None = None):
    """Final-normed hidden states [B, T, D] (and the updated cache's (k, v), if any)."""
    x = jnp.take(self.embed_tokens[...], tokens, axis=0)
    kv = None if cache is None else (cache.k, cache.v)
    for i, layer in enumerate(self.layers):
      layer_prefix = None if prefix is None else (prefix.k[i], prefix.v[i], prefix)
      x, kv = layer(x, positions, mask, None if kv is None else (*kv, i),
                    None if cache is None else cache.length, layer_prefix)
    return self.norm(x), kv

  def logits(self, h: jax.Array) -> jax.Array:
    """fp32 logits [..., V] from hidden states [..., D]."""
    w = self.embed_tokens[...] if self.cfg.tie_word_embeddings else self.lm_head[...]
    return jnp.einsum("...D,VD->...V", h, w, precision=self.cfg.precision,
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens, positions=None, token_valid=None, cache: KVCache | None = None,
               chunk_mask=None, attend_mask=None, prefix: SharedPrefix | None = None):
    """tokens, positions: int32[B, T]; token_valid: bool[B, T] (False = padding).

    ``chunk_mask`` bool[B, T, T] says which tokens of this chunk each token sees (default
    causal; a tree-structured mask scores many branches of a prefix tree in one chunk).
    Without a cache attention is among the chunk's tokens. With a cache the chunk is
    written at slots [cache.length, cache.length + T) and also sees every valid earlier
    slot, or only those where ``attend_mask`` bool[B, T, S] (S = cache capacity) is True
    (a tree appended to the cache chunk by chunk: each node sees only its ancestors).
    ``prefix`` (needs a cache) is a segment seen by every token of its row group (or of the
    rows its ``PrefixSlots`` name), before the cache's slots. Returns (logits f32[B, T, V], updated cache or None).
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if token_valid is None:
      token_valid = jnp.ones((b, t), bool)
    if chunk_mask is None:
      chunk_mask = jnp.tril(jnp.ones((t, t), bool))[None]
    chunk_mask = jnp.broadcast_to(chunk_mask, (b, t, t)) & token_valid[:, None, :]
    if cache is None:
      if prefix is not None:
        raise ValueError("a SharedPrefix is attended through a cache; pass cache= as well")
      h, _ = self.hidden(tokens, positions, chunk_mask)
      return self.logits(h), None
    if cache.capacity < t:
      raise ValueError(f"chunk of {t} tokens does not fit a cache of {cache.capacity} slots")
    earlier = (jnp.arange(cache.capacity) < cache.length)[None, :] & cache.valid  # [B, S]
    earlier = jnp.broadcast_to(earlier[:, None, :], (b, t, cache.capacity))
    if attend_mask is not None:
      earlier = earlier & attend_mask
    mask = jax.lax.dynamic_update_slice(earlier, chunk_mask, (0, 0, cache.length))
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid, cache.length, axis=1)
    if prefix is not None and prefix.slots is None and b % prefix.valid.shape[0]:
      raise ValueError(f"{b} rows cannot be split evenly among {prefix.valid.shape[0]} prefixes")
    if prefix is not None and prefix.slots is not None and prefix.slots.slot.shape[0] != b:
      raise ValueError(f"the prefix's PrefixSlots place {prefix.slots.slot.shape[0]} rows but "
                       f"the chunk has {b}: build the slots for this batch (cache.slot_layout)")
    h, (k, v) = self.hidden(tokens, positions, mask, cache, prefix)
    cache = KVCache(k=k, v=v, valid=valid, length=cache.length + t)
    return self.logits(h), cache


# ---------------------------------------------------------------------------------------
# Pure functional entry points


@functools.lru_cache(maxsize=None)
def graphdef(cfg: Qwen3Config) -> nnx.GraphDef:
  """The NNX graph definition for ``cfg`` (abstract init: no weights are allocated)."""
  abstract = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)[0]


def abstract_params(cfg: Qwen3Config) -> nnx.State:
  """ShapeDtypeStructs of every parameter, without allocating them."""
  return nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))[1]


def init_params(cfg: Qwen3Config, seed: int = 0) -> nnx.State:
  """Random parameters (normal, std 0.02; norms at 1), for tests and benchmarks."""
  return nnx.split(Qwen3(cfg, rngs=nnx.Rngs(seed)))[1]


def bind(cfg: Qwen3Config, params: nnx.State) -> Qwen3:
  """The NNX module for ``params`` (cheap; usable inside jit)."""
  return nnx.merge(graphdef(cfg), params)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: Qwen3Config, params: nnx.State, tokens: jax.Array) -> jax.Array:
  """Full causal forward, no cache. tokens: int32[B, T] (no padding) → float32[B, T, V]."""
  return bind(cfg, params)(tokens)[0]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def forward_cached(cfg: Qwen3Config, params: nnx.State, tokens: jax.Array,
                   positions: jax.Array, token_valid: jax.Array, cache: KVCache):
  """One cached chunk (prefill or a decode step). The cache is donated.

  tokens, positions: int32[B, T]; token_valid: bool[B, T]. Returns (f32[B, T, V], cache).
  """
  return bind(cfg, params)(tokens, positions, token_valid, cache)
