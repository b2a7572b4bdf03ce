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


# Queries per (row, kv head) up to which attention is a fused multiply-reduce rather than a
# dot: a decode step's few queries (A·T = 2-4) make B·K tiny matrix-vector products, which
# XLA on CPU runs as that many dot calls, slower than one fused loop over the slots.
_REDUCE_QUERIES = 8


def _scores(q: jax.Array, k: jax.Array, precision) -> jax.Array:
  """q [X, K, M, H] · k [X, K, H, S] over H: f32[X, K, M, S] (X: rows or prefixes; keys
  slot-minor, ``cache.K_SLOTS``, so the multiply-reduce runs across slots)."""
  if q.shape[2] <= _REDUCE_QUERIES:
    return jnp.sum(q.astype(jnp.float32)[..., None] * k.astype(jnp.float32)[:, :, None],
                   axis=-2)
  return jnp.einsum("XKMH,XKHS->XKMS", q, k, precision=precision,
                    preferred_element_type=jnp.float32)


def _mix(probs: jax.Array, v: jax.Array, precision) -> jax.Array:
  """probs [X, K, M, S] · v [X, K, S, H] over S: f32[X, K, M, H]."""
  if probs.shape[2] <= _REDUCE_QUERIES:
    return jnp.sum(probs.astype(jnp.float32)[..., None] * v.astype(jnp.float32)[:, :, None],
                   axis=-2)
  return jnp.einsum("XKMS,XKSH->XKMH", probs, v, precision=precision,
                    preferred_element_type=jnp.float32)


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

    Without a cache S == T. With ``kv = (k_cache, v_cache)``, this layer's buffers (keys
    [B, K, H, S], values [B, K, S, H]: ``cache.K_SLOTS``), the chunk's keys/values are written
    at slot ``write_at`` and attention runs over the S slots. ``prefix = (k, v, shared)``
    (this layer's keys [J, K, H, P] and values [J, K, P, H] of a ``SharedPrefix``) adds P
    slots that rows [j·R, (j+1)·R) all see, R = B // J, or the rows ``shared.slots`` names,
    uncopied. Returns (out [B, T, D], the updated (k_cache, v_cache), or the chunk's keys
    [B, K, H, T] and values [B, K, T, H]).
    """
    cfg, prec = self.cfg, self.cfg.precision
    b, t, d = x.shape
    n, nkv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    a = n // nkv
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
    # Keys and values head-major as in the cache, keys [B, K, H, T] and values [B, K, T, H]:
    # attention reads them with no transpose.
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    if kv is not None:
      # The layer's own buffer, updated in place (a decode loop carries it without a copy),
      # then read whole: no slice of a shared all-layer buffer to materialise each step.
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, write_at))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, write_at, 0))
    # The A query heads of a kv head and the T tokens are its M = A·T queries: [B, K, M, H].
    qh = q.reshape(b, t, nkv, a, h).transpose(0, 2, 3, 1, 4).reshape(b, nkv, a * t, h)
    scale, neg = h ** -0.5, jnp.finfo(jnp.float32).min
    scores = _scores(qh, k, prec).reshape(b, nkv, a, t, -1) * scale
    scores = jnp.where(mask[:, None, None], scores, neg)  # [B, K, A, T, S]
    if prefix is None:
      probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
      out = _mix(probs.reshape(b, nkv, a * t, -1), v, prec)
    else:
      pk, pv, pre = prefix
      j, p = pre.valid.shape
      # The rows of prefix j gathered as [J, R] (when slots name them) and folded into its
      # queries, [J, K, R·A·T, H]: the prefix KV is read in place, never copied per row.
      slots = pre.slots
      groups = (qh.reshape(j, b // j, nkv, a * t, h) if slots is None
                else jnp.take(qh, slots.rows, axis=0))
      r = groups.shape[1]
      fold = lambda x: x.transpose(0, 2, 1, 3, 4).reshape(j, nkv, r * a * t, x.shape[-1])
      unfold = lambda x: x.reshape(j, nkv, r, a * t, x.shape[-1]).transpose(0, 2, 1, 3, 4)
      pscores = unfold(_scores(fold(groups), pk, prec) * scale).reshape(j, r, nkv, a, t, p)
      pscores = jnp.where(pre.visible()[:, :, None, None, None], pscores, neg)
      pscores = pscores.reshape(j * r, nkv, a, t, p)
      if slots is not None:  # back to batch rows
        pscores = jnp.take(pscores, slots.slot, axis=0)
      probs = jax.nn.softmax(jnp.concatenate([pscores, scores], axis=-1), axis=-1)
      probs = probs.astype(v.dtype).reshape(b, nkv, a * t, -1)
      pprobs = probs[..., :p]
      pprobs = (pprobs.reshape(j, r, nkv, a * t, p) if slots is None
                else jnp.take(pprobs, slots.rows, axis=0))
      out = unfold(_mix(fold(pprobs), pv, prec)).reshape(j * r, nkv, a * t, h)
      if slots is not None:
        out = jnp.take(out, slots.slot, axis=0)
      out = out + _mix(probs[..., p:], v, prec)
    out = out.astype(v.dtype).reshape(b, nkv, a, t, h).transpose(0, 3, 1, 2, 4)
    out = jnp.einsum("BTX,DX->BTD", out.reshape(b, t, n * h), self.o_proj[...].reshape(d, n * h),
                     precision=prec)
    if cfg.attention_bias:
      out = out + self.o_bias[...]
    return out, (k, v)


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
    attn, new_kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, write_at, prefix)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), new_kv


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
    """Final-normed hidden states [B, T, D] and each layer's (k, v): its updated cache
    buffers (keys [B, K, H, S], values [B, K, S, H]) with a cache, else the chunk's."""
    x = jnp.take(self.embed_tokens[...], tokens, axis=0)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      layer_kv = None if cache is None else (cache.k[i], cache.v[i])
      layer_prefix = None if prefix is None else (prefix.k[i], prefix.v[i], prefix)
      x, (k, v) = layer(x, positions, mask, layer_kv, None if cache is None else cache.length,
                        layer_prefix)
      new_k.append(k)
      new_v.append(v)
    return self.norm(x), (tuple(new_k), tuple(new_v))

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
