"""Qwen3 in JAX: model, checkpoint loading, tokenizer.

    cfg, params = models.load_pretrained(path_or_hub_id, dtype="float32")
    logits = models.forward(cfg, params, tokens)   # int32[B, T] → float32[B, T, V]
    tok = models.load_tokenizer(path_or_hub_id)
"""

from gradalign_jax.models.checkpoint import CheckpointError, load_pretrained
from gradalign_jax.models.qwen3 import (KVCache, Qwen3Config, bind, forward, forward_cached,
                                        init_cache, init_params)
from gradalign_jax.models.tokenizer import (chat_prompt, check_same_vocabulary, encode_chat,
                                            load_tokenizer, vocab_mask)

__all__ = [
    "CheckpointError", "KVCache", "Qwen3Config", "bind", "chat_prompt", "check_same_vocabulary",
    "encode_chat", "forward", "forward_cached", "init_cache", "init_params", "load_pretrained",
    "load_tokenizer", "vocab_mask",
]
