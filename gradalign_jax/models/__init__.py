"""Qwen3 in JAX: model, checkpoint loading, tokenizer, KV cache.

    cfg, params = models.load_pretrained(path_or_hub_id, dtype="float32")
    logits = models.forward(cfg, params, tokens)   # int32[B, T] → float32[B, T, V]
    tok = models.load_tokenizer(path_or_hub_id)

Names are imported on first use (PEP 562), so ``models.tokenizer`` and the tasks that build
prompts with it load without jax; ``models.forward`` imports the model (and jax) when read.
"""

from __future__ import annotations

import importlib

# public name → submodule that defines it
_EXPORTS = {
    "CheckpointError": "paths",
    "KVCache": "cache",
    "Qwen3Config": "qwen3",
    "bind": "qwen3",
    "chat_prompt": "tokenizer",
    "check_same_vocabulary": "tokenizer",
    "encode_chat": "tokenizer",
    "forward": "qwen3",
    "forward_cached": "qwen3",
    "init_cache": "cache",
    "init_params": "qwen3",
    "load_pretrained": "checkpoint",
    "load_tokenizer": "tokenizer",
    "vocab_mask": "tokenizer",
}

# read as attributes too (``models.qwen3.Qwen3``), as when this file imported them eagerly
_SUBMODULES = ("cache", "checkpoint", "paths", "qwen3", "tokenizer")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value  # later reads skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
