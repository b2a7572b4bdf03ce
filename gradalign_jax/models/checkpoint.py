"""Hugging Face Qwen3 checkpoints → (Qwen3Config, nnx.State).

A checkpoint is a local directory with ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` (sharded), or a hub id resolved with ``huggingface_hub``
when the user is online. Tensors are memory-mapped from the safetensors files and put on
their device one at a time (reshape only; the model keeps HF's ``[out, in]`` layout), so
peak host memory is one tensor, not the model. Every checkpoint tensor must be used exactly
once and every parameter found, with the shape the config implies; anything the model does
not implement is refused with a message that says what.

Shape letters: see gradalign_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from gradalign_jax.models import qwen3
from gradalign_jax.models.paths import CheckpointError, resolve_checkpoint_dir
from gradalign_jax.rundir import sha256_file

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}


# ---------------------------------------------------------------------------------------
# Config


def config_from_dict(raw: dict, *, dtype: str = "float32", matmul_precision: str = "default",
                     source: str = "config.json") -> qwen3.Qwen3Config:
  """Qwen3Config from a Hugging Face ``config.json`` dict (transformers 4 or 5 form).

  Defaults for absent fields are transformers' Qwen3Config defaults (head_dim 128,
  rope_theta 10000, rms_norm_eps 1e-6, untied head, no attention bias).
  """
  model_type = raw.get("model_type")
  archs = raw.get("architectures") or []
  if model_type != "qwen3" or (archs and "Qwen3ForCausalLM" not in archs):
    hint = " (Qwen3 mixture-of-experts is not supported)" if model_type == "qwen3_moe" else ""
    raise CheckpointError(
        f"{source}: model_type={model_type!r}, architectures={archs} is not a dense Qwen3 "
        f"checkpoint{hint}; gradalign_jax loads model_type 'qwen3' / Qwen3ForCausalLM only")
  if raw.get("use_sliding_window"):
    raise CheckpointError(f"{source}: use_sliding_window=true is not supported "
                          "(every layer must use full attention)")
  layer_types = raw.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise CheckpointError(f"{source}: layer_types {sorted(set(layer_types))} are not supported; "
                          "only 'full_attention' layers are implemented")
  if raw.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (silu only)")

  rope_theta = raw.get("rope_theta")
  rope = raw.get("rope_parameters") or raw.get("rope_scaling")
  if rope:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise CheckpointError(
          f"{source}: rope type {rope_type!r} (rope scaling) is not implemented; only the default "
          "RoPE is. Remove rope_scaling to run without context extension.")
    rope_theta = rope.get("rope_theta", rope_theta)
  try:
    heads = int(raw["num_attention_heads"])
    return qwen3.Qwen3Config(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or 128),
        rope_theta=float(rope_theta if rope_theta is not None else 10_000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        dtype=dtype,
        matmul_precision=matmul_precision,
    )
  except KeyError as e:
    raise CheckpointError(f"{source} has no field {e.args[0]!r}, which a Qwen3 config needs") from e


def load_config(ckpt_dir: str, *, dtype: str = "float32",
                matmul_precision: str = "default") -> qwen3.Qwen3Config:
  path = os.path.join(ckpt_dir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint at {ckpt_dir} has no config.json")
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  return config_from_dict(raw, dtype=dtype, matmul_precision=matmul_precision, source=path)


# ---------------------------------------------------------------------------------------
# safetensors, memory-mapped


_REWRITE = "download or save the checkpoint again"


def _header_bytes(path: str) -> tuple[bytes, int]:
  """(the JSON header's bytes, the file's size) of a safetensors file; refuses a file too
  short for the header it announces."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 0 or n > size - 8:
      raise CheckpointError(f"{path} is not a whole safetensors file ({size} bytes, header "
                            f"length field {n}): it is truncated or not safetensors; {_REWRITE}")
    return f.read(n), size


def _read_safetensors_header(path: str) -> tuple[int, dict]:
  raw, size = _header_bytes(path)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file "
                          f"is corrupt or not safetensors; {_REWRITE}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: the safetensors header is not a JSON object; {_REWRITE}")
  header.pop("__metadata__", None)
  data = size - 8 - len(raw)
  for name, entry in header.items():
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data):
      raise CheckpointError(f"{path}: tensor {name} has data_offsets {offsets} outside the "
                            f"file's {data} data bytes: the file is truncated or corrupt; "
                            f"{_REWRITE}")
  return 8 + len(raw), header


def fingerprint(path_or_hub_id: str) -> dict[str, str]:
  """What identifies a checkpoint's content, cheaply for multi-GB weights: each
  ``*.safetensors`` file's size, mtime and the sha256 of its header (no tensor bytes read),
  the sha256 of every other file (config, index, tokenizer). {file name: text}."""
  ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
  out = {}
  for name in sorted(os.listdir(ckpt_dir)):
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
      continue
    if name.endswith(".safetensors"):
      raw, size = _header_bytes(path)
      out[name] = (f"size {size}, mtime_ns {os.stat(path).st_mtime_ns}, header "
                   f"{hashlib.sha256(raw).hexdigest()[:16]}")
    else:
      out[name] = sha256_file(path)[:16]
  return out


def safetensors_index(ckpt_dir: str) -> dict[str, tuple[str, int, dict]]:
  """{tensor name: (file, data offset, header entry)} over a single or sharded checkpoint."""
  single = os.path.join(ckpt_dir, "model.safetensors")
  index = os.path.join(ckpt_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(ckpt_dir, name) for name in sorted(set(weight_map.values()))]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
      raise CheckpointError(f"checkpoint at {ckpt_dir}: shard(s) {missing} listed in "
                            "model.safetensors.index.json are missing")
  else:
    raise CheckpointError(f"checkpoint at {ckpt_dir} has no model.safetensors or "
                          "model.safetensors.index.json")
  tensors = {}
  for path in files:
    start, header = _read_safetensors_header(path)
    for name, entry in header.items():
      if name in tensors:
        raise CheckpointError(f"tensor {name} appears in two shards ({tensors[name][0]}, {path})")
      tensors[name] = (path, start, entry)
  return tensors


def _memmap(path: str, start: int, entry: dict) -> np.ndarray:
  if entry["dtype"] not in _ST_DTYPES:
    raise CheckpointError(f"{path}: tensor dtype {entry['dtype']} is not supported "
                          f"({sorted(_ST_DTYPES)} are)")
  dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
  begin, end = entry["data_offsets"]
  shape = tuple(entry["shape"])
  if end - begin != dtype.itemsize * int(np.prod(shape)):
    raise CheckpointError(f"{path}: a tensor's byte range does not match its shape {shape}")
  if not shape or 0 in shape:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


# ---------------------------------------------------------------------------------------
# Name mapping


def hf_name(parts: tuple) -> str:
  """HF tensor name of an NNX parameter path, e.g. ('layers', 3, 'self_attn', 'q_proj')."""
  if parts == ("embed_tokens",):
    return "model.embed_tokens.weight"
  if parts == ("lm_head",):
    return "lm_head.weight"
  if parts == ("norm", "weight"):
    return "model.norm.weight"
  if parts[0] == "layers":
    i, *rest = parts[1:]
    prefix = f"model.layers.{i}."
    if rest[-1] in ("q_bias", "k_bias", "v_bias", "o_bias"):
      return prefix + f"self_attn.{rest[-1][0]}_proj.bias"
    if rest[-1] == "weight":  # norms
      return prefix + ".".join(rest)
    return prefix + ".".join(rest) + ".weight"
  raise KeyError(parts)


def hf_shape(parts: tuple, shape: tuple) -> tuple:
  """The HF tensor shape of a parameter: heads are merged into one axis there."""
  last = parts[-1]
  if last in ("q_proj", "k_proj", "v_proj"):  # [N or K, H, D] here, [X, D] there
    return (shape[0] * shape[1], shape[2])
  if last == "o_proj":  # [D, N, H] here, [D, X] there
    return (shape[0], shape[1] * shape[2])
  if last in ("q_bias", "k_bias", "v_bias"):
    return (shape[0] * shape[1],)
  return tuple(shape)


def param_path(path) -> tuple:
  """The parameter path of a pytree key path, e.g. ('layers', 3, 'self_attn', 'q_proj'): what
  ``hf_name`` and a ``load_pretrained(sharding=f)`` callable receive."""
  out = []
  for k in path:
    key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    if key != "value":
      out.append(key)
  return tuple(out)


# ---------------------------------------------------------------------------------------
# Loading


def _cache_key(ckpt_dir: str, cfg: qwen3.Qwen3Config, tensors: dict) -> str:
  h = hashlib.sha1()
  h.update(json.dumps([os.path.abspath(ckpt_dir), dataclasses.asdict(cfg)]).encode())
  for path in sorted({t[0] for t in tensors.values()}):
    st = os.stat(path)
    h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def load_pretrained(path_or_hub_id: str, dtype: str = "float32", *,
                    matmul_precision: str = "default",
                    sharding: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None,
                    cache_dir: str | None = None) -> tuple[qwen3.Qwen3Config, nnx.State]:
  """Loads a Qwen3 checkpoint: ``cfg, params = load_pretrained(path, dtype="float32")``.

  Args:
    path_or_hub_id: local HF checkpoint directory, or a hub id (needs huggingface_hub, online).
    dtype: weight dtype, "float32" | "bfloat16" | "float16"; logits are fp32 regardless.
    matmul_precision: "default" | "high" | "highest" (use "highest" for fp32 parity on GPU/TPU).
    sharding: optional ``f(param_path, shape) -> Sharding`` (e.g.
      ``distributed.param_sharding(mesh)``): each device reads its slice of each tensor from
      the memory-mapped file (no whole copy on one device first); the orbax cache, when used,
      restores into the same shardings. None (the default): each tensor on the default device.
    cache_dir: optional directory for an orbax cache of the converted params; the second load
      of the same checkpoint and dtype restores from it.
  Returns:
    (Qwen3Config, nnx.State) for ``models.forward`` / ``qwen3.bind``.
  """
  ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
  cfg = load_config(ckpt_dir, dtype=dtype, matmul_precision=matmul_precision)
  tensors = safetensors_index(ckpt_dir)
  abstract = qwen3.abstract_params(cfg)

  cache_path = None
  if cache_dir is not None:
    cache_path = os.path.abspath(os.path.join(cache_dir, _cache_key(ckpt_dir, cfg, tensors)))
    if os.path.isdir(cache_path):
      import orbax.checkpoint as ocp
      target = abstract
      if sharding is not None:  # orbax reads each device's slice into its shard
        target = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                              sharding=sharding(param_path(p), x.shape)),
            abstract)
      with ocp.StandardCheckpointer() as ckptr:
        return cfg, ckptr.restore(cache_path, target)

  used = set()

  def load_one(path, leaf):
    parts = param_path(path)
    name = hf_name(parts)
    if name not in tensors:
      raise CheckpointError(f"checkpoint at {ckpt_dir} has no tensor {name} "
                            f"(needed for {'.'.join(map(str, parts))})")
    used.add(name)
    array = _memmap(*tensors[name])
    expected = hf_shape(parts, leaf.shape)
    if tuple(array.shape) != expected:
      raise CheckpointError(
          f"checkpoint at {ckpt_dir}: {name} has shape {list(array.shape)} but config.json "
          f"implies {list(expected)}; is config.json the one these weights were saved with?")
    view = np.asarray(array).reshape(leaf.shape)  # still memory-mapped: nothing read yet

    def read(index=()):
      part = view[index].astype(leaf.dtype, copy=False)  # reads this slice's bytes only
      if not np.isfinite(part).all():
        bad = int(part.size - np.isfinite(part).sum())
        raise CheckpointError(
            f"checkpoint at {ckpt_dir}: tensor {name} ({tensors[name][0]}) has {bad} NaN/Inf "
            f"value(s) of {part.size} read; the weights are corrupt (or overflowed when saved "
            f"in a narrower dtype): {_REWRITE}")
      return part

    target = sharding(parts, leaf.shape) if sharding is not None else None
    if target is None:
      return jax.device_put(read())
    # Each device gets its own slice straight from the memory map (no whole copy on any one
    # device); a slice several devices hold (replication) is read once.
    slices = {}

    def shard(index):
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in slices:
        slices[key] = read(index)
      return slices[key]

    return jax.make_array_from_callback(leaf.shape, target, shard)

  params = jax.tree_util.tree_map_with_path(load_one, abstract)
  unused = sorted(set(tensors) - used)
  if cfg.tie_word_embeddings and "lm_head.weight" in unused:
    # Some exporters write the tied head anyway; it must then equal the embedding.
    emb, head = (np.asarray(_memmap(*tensors[n])) for n in ("model.embed_tokens.weight",
                                                            "lm_head.weight"))
    if emb.shape != head.shape or not np.array_equal(emb, head):
      raise CheckpointError(f"checkpoint at {ckpt_dir}: tie_word_embeddings=true but "
                            "lm_head.weight differs from model.embed_tokens.weight")
    unused.remove("lm_head.weight")
  if unused:
    raise CheckpointError(
        f"checkpoint at {ckpt_dir} has {len(unused)} tensor(s) the Qwen3 model does not use, "
        f"e.g. {unused[:5]}; is config.json (num_hidden_layers, attention_bias, "
        "tie_word_embeddings) the one these weights were saved with?")
  if cache_path is not None:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(cache_path, params)
  return cfg, params


def save_pretrained(cfg: qwen3.Qwen3Config, params: nnx.State, path: str,
                    extra_config: dict | None = None) -> str:
  """Writes ``params`` as a Hugging Face Qwen3 checkpoint (config.json + model.safetensors).

  The inverse of ``load_pretrained``: transformers' Qwen3ForCausalLM loads the result, and
  so does this library, through the same path as any real checkpoint. Tensors are stored in
  ``cfg.dtype``; ``extra_config`` adds fields to config.json (e.g. eos_token_id).
  """
  from safetensors.numpy import save_file

  tensors = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = param_path(key_path)
    tensors[hf_name(parts)] = np.ascontiguousarray(
        np.asarray(leaf).reshape(hf_shape(parts, leaf.shape)))
  raw = {
      "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
      "max_position_embeddings": cfg.max_position_embeddings, "use_sliding_window": False,
      "torch_dtype": cfg.dtype,
  }
  raw.update(extra_config or {})
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(raw, f, indent=2)
  return path
