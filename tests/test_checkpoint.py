"""Checkpoint loading: bad inputs are refused with a message naming the problem and fix;
the orbax cache of converted params round-trips."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gradalign_jax import models
from gradalign_jax.models import checkpoint as ckpt_lib


def _edit_config(path, **changes):
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    raw = json.load(f)
  for k, v in changes.items():
    if v is None:
      raw.pop(k, None)
    else:
      raw[k] = v
  with open(cfg_path, "w") as f:
    json.dump(raw, f)


BAD_CONFIGS = {
    "llama": (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "not a dense Qwen3"),
    "moe": (dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]),
            "mixture-of-experts"),
    "sliding_window": (dict(use_sliding_window=True), "use_sliding_window"),
    "layer_types": (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
             "rope type 'yarn'"),
    "missing_field": (dict(hidden_size=None), "no field 'hidden_size'"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_unsupported_configs_are_refused(name, hf_checkpoint):
  changes, message = BAD_CONFIGS[name]
  path, _ = hf_checkpoint()
  _edit_config(path, **changes)
  with pytest.raises(models.CheckpointError, match=message):
    models.load_pretrained(path)


def test_missing_path(tmp_path):
  with pytest.raises(models.CheckpointError, match="is not a directory"):
    models.load_pretrained(str(tmp_path / "nowhere" / "ckpt"))


def test_missing_config(tmp_path):
  with pytest.raises(models.CheckpointError, match="has no config.json"):
    models.load_pretrained(str(tmp_path))


def test_missing_weights(hf_checkpoint):
  path, _ = hf_checkpoint()
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(models.CheckpointError, match="no model.safetensors or"):
    models.load_pretrained(path)


def test_missing_shard(hf_checkpoint):
  path, _ = hf_checkpoint(max_shard_size="20KB")
  shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
  os.remove(os.path.join(path, shard))
  with pytest.raises(models.CheckpointError, match="missing"):
    models.load_pretrained(path)


def test_shape_mismatch(hf_checkpoint):
  path, _ = hf_checkpoint()
  _edit_config(path, intermediate_size=80)
  with pytest.raises(models.CheckpointError, match=r"mlp\.\w+_proj\.weight has shape"):
    models.load_pretrained(path)


def test_transposed_tensor_is_caught(hf_checkpoint):
  """A tensor of the right size but wrong orientation must not load silently."""
  path, _ = hf_checkpoint(hidden_size=64, intermediate_size=96)
  st = os.path.join(path, "model.safetensors")
  tensors = load_file(st)
  name = "model.layers.0.mlp.down_proj.weight"
  tensors[name] = np.ascontiguousarray(tensors[name].T)
  save_file(tensors, st)
  with pytest.raises(models.CheckpointError, match="down_proj.weight has shape"):
    models.load_pretrained(path)


def test_unused_and_missing_tensors(hf_checkpoint):
  path, _ = hf_checkpoint(num_hidden_layers=2)
  _edit_config(path, num_hidden_layers=1)
  with pytest.raises(models.CheckpointError, match="does not use"):
    models.load_pretrained(path)
  _edit_config(path, num_hidden_layers=3)
  with pytest.raises(models.CheckpointError, match="no tensor model.layers.2"):
    models.load_pretrained(path)


def test_unknown_dtype(hf_checkpoint):
  path, _ = hf_checkpoint()
  with pytest.raises(ValueError, match="unknown dtype 'float8'"):
    models.load_pretrained(path, dtype="float8")


def test_hub_id_without_network(monkeypatch):
  """A hub id that cannot be fetched says so (no network in tests: the download is stubbed)."""
  hub = pytest.importorskip("huggingface_hub")

  def offline(*args, **kwargs):
    raise OSError("offline")

  monkeypatch.setattr(hub, "snapshot_download", offline)
  with pytest.raises(models.CheckpointError, match="could not fetch 'Qwen/Qwen3-0.6B'"):
    models.load_pretrained("Qwen/Qwen3-0.6B")


def test_orbax_cache_roundtrip(hf_checkpoint, tmp_path, monkeypatch):
  path, _ = hf_checkpoint()
  cache = str(tmp_path / "cache")
  cfg, first = models.load_pretrained(path, cache_dir=cache)
  assert len(os.listdir(cache)) == 1

  def no_reads(*args):
    raise AssertionError("the second load read safetensors instead of the cache")

  monkeypatch.setattr(ckpt_lib, "_memmap", no_reads)
  cfg2, second = models.load_pretrained(path, cache_dir=cache)
  assert cfg2 == cfg
  import jax
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_checkpoint_loads(hf_checkpoint, tmp_path):
  """A checkpoint stored in bf16 (as real Qwen3 ships) memory-maps and upcasts exactly."""
  path, model = hf_checkpoint()
  import torch
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  cfg, params = models.load_pretrained(str(tmp_path / "bf16"), dtype="float32")
  emb = model.model.embed_tokens.weight.float().detach().numpy()
  np.testing.assert_array_equal(np.asarray(params["embed_tokens"][...]), emb)


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, tied):
  """Our writer's output is a real HF checkpoint: transformers loads it to the same logits."""
  torch = pytest.importorskip("torch")
  from transformers import Qwen3ForCausalLM

  from gradalign_jax.models import qwen3
  from conftest import hf_logits

  cfg = qwen3.Qwen3Config(vocab_size=90, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=3e4,
                          tie_word_embeddings=tied)
  params = qwen3.init_params(cfg, seed=5)
  path = ckpt_lib.save_pretrained(cfg, params, str(tmp_path / "ours"))
  hf = Qwen3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
  tokens = np.random.default_rng(0).integers(0, 90, (2, 40), dtype=np.int32)
  ours = np.asarray(models.forward(cfg, params, tokens))
  np.testing.assert_allclose(ours, hf_logits(hf, tokens), rtol=1e-4, atol=1e-5)
  cfg2, params2 = models.load_pretrained(path)
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(models.forward(cfg2, params2, tokens)), ours)


# ---------------------------------------------------------------------------------------
# Damaged weights: named with the file (and tensor) and the fix


TINY = models.Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)


def _tiny(path):
  return ckpt_lib.save_pretrained(TINY, models.init_params(TINY, seed=0), str(path))


def _truncate(f):
  data = open(f, "rb").read()
  open(f, "wb").write(data[:len(data) // 2])


def _garbage(f):
  open(f, "wb").write(b"\xff" * 64)


def _bad_header(f):
  data = open(f, "rb").read()
  open(f, "wb").write(data[:8] + b"{" * (int.from_bytes(data[:8], "little")) + data[8:])


def _nan(f):
  tensors = load_file(f)
  tensors["model.layers.0.mlp.up_proj.weight"][3, 1] = np.nan
  save_file(tensors, f)


def _inf(f):
  tensors = load_file(f)
  tensors["model.norm.weight"][0] = np.inf
  save_file(tensors, f)


DAMAGED = [
    ("truncated", _truncate, r"tensor .* has data_offsets .* outside the file's \d+ data bytes"),
    ("garbage", _garbage, r"is not a whole safetensors file \(64 bytes"),
    ("header_not_json", _bad_header, r"the safetensors header is not valid JSON"),
    ("nan", _nan, r"tensor model.layers.0.mlp.up_proj.weight \(.*model.safetensors\) has 1 "
     r"NaN/Inf value\(s\) of 512"),
    ("inf", _inf, r"tensor model.norm.weight .* has 1 NaN/Inf"),
]


@pytest.mark.parametrize("damage,message", [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED])
def test_damaged_weights_are_named(tmp_path, damage, message):
  path = _tiny(tmp_path / "ckpt")
  damage(os.path.join(path, "model.safetensors"))
  with pytest.raises(ckpt_lib.CheckpointError, match=message) as e:
    models.load_pretrained(path)
  assert "model.safetensors" in str(e.value)
  assert "download or save the checkpoint again" in str(e.value)


def test_fingerprint_is_cheap_and_sees_a_replaced_checkpoint(tmp_path):
  path = _tiny(tmp_path / "ckpt")
  first = ckpt_lib.fingerprint(path)
  assert set(first) == {"config.json", "model.safetensors"}
  assert first["model.safetensors"].startswith(
      f"size {os.path.getsize(os.path.join(path, 'model.safetensors'))}, mtime_ns ")
  assert ckpt_lib.fingerprint(path) == first
  ckpt_lib.save_pretrained(TINY, models.init_params(TINY, seed=1), path)  # same shapes
  assert ckpt_lib.fingerprint(path)["model.safetensors"] != first["model.safetensors"]
