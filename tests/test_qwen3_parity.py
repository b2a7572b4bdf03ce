"""Qwen3 forward vs transformers.Qwen3ForCausalLM on random checkpoints it saved itself."""

import numpy as np
import pytest

from gradalign_jax import models
from gradalign_jax.models import checkpoint as ckpt_lib

from conftest import hf_logits

CASES = {
    "untied_gqa2": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied_gqa1": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
    "gqa4_theta1e6": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6),
    # head_dim (24) independent of hidden_size / heads (64 / 4 = 16)
    "head_dim_24": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=2),
    "attention_bias": dict(attention_bias=True, num_key_value_heads=1),
    "sharded": dict(_shard="20KB", num_hidden_layers=3),
    "transformers4_config": dict(_form="transformers4", rope_theta=5e5),
}


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_parity_long_prompt(name, hf_checkpoint):
  overrides = dict(CASES[name])
  shard, form = overrides.pop("_shard", None), overrides.pop("_form", None)
  path, hf = hf_checkpoint(max_shard_size=shard, config_form=form, **overrides)
  if shard:
    import os
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  cfg, params = models.load_pretrained(path, dtype="float32", matmul_precision="highest")
  assert cfg.rope_theta == overrides.get("rope_theta", 10000.0)
  assert cfg.head_dim == overrides.get("head_dim", 16)
  # Several hundred positions: RoPE errors hide in short prompts.
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 320), dtype=np.int32)
  ours = np.asarray(models.forward(cfg, params, tokens))
  ref = hf_logits(hf, tokens)
  assert ours.shape == ref.shape and ours.dtype == np.float32
  assert _rel_err(ours, ref) <= 1e-4


def test_bf16_weights_close(hf_checkpoint):
  """bf16 weights: logits are still fp32 and within bf16 rounding of the fp32 reference."""
  path, hf = hf_checkpoint()
  cfg, params = models.load_pretrained(path, dtype="bfloat16")
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 64), dtype=np.int32)
  ours = np.asarray(models.forward(cfg, params, tokens))
  assert ours.dtype == np.float32
  err = _rel_err(ours, hf_logits(hf, tokens))
  print(f"bf16 max relative logit error vs fp32 HF: {err:.2e}")
  assert err < 5e-2


def test_config_forms_agree(hf_checkpoint, tmp_path):
  """transformers 4 (top-level rope_theta) and 5 (rope_parameters) configs load alike."""
  p5, model = hf_checkpoint(rope_theta=123456.0)
  from conftest import save_hf_checkpoint
  p4 = save_hf_checkpoint(model, tmp_path / "v4", config_form="transformers4")
  assert ckpt_lib.load_config(p4) == ckpt_lib.load_config(p5)
  assert ckpt_lib.load_config(p4).rope_theta == 123456.0
