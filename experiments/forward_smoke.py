"""Stand-in for the main job until the alignment sweep lands: a short Qwen3 forward pass.

Writes a random tiny Qwen3 checkpoint in Hugging Face layout (or uses --checkpoint), loads
it through the same path real checkpoints use, runs a jit-compiled forward and a KV-cache
prefill + decode, and checks that both give the same logits.

  python -m experiments.forward_smoke --out=runs/smoke
"""

import json
import os
import time

import numpy as np
from absl import app, flags, logging

flags.DEFINE_string("checkpoint", None, "HF Qwen3 checkpoint dir or hub id; default: a random "
                    "tiny model written to --out/random_qwen3")
flags.DEFINE_string("out", "runs/smoke", "output directory")
flags.DEFINE_integer("prompt_len", 64, "tokens in the random prompt")
flags.DEFINE_integer("seed", 0, "seed of the random model and prompt")
FLAGS = flags.FLAGS


def write_random_checkpoint(path: str, seed: int) -> str:
  """A random tiny Qwen3 in HF layout (config.json + model.safetensors), without torch."""
  from gradalign_jax.models import checkpoint, qwen3

  cfg = qwen3.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6)
  return checkpoint.save_pretrained(cfg, qwen3.init_params(cfg, seed), path)


def main(argv):
  del argv
  from gradalign_jax import models

  os.makedirs(FLAGS.out, exist_ok=True)
  ckpt = FLAGS.checkpoint or write_random_checkpoint(
      os.path.join(FLAGS.out, "random_qwen3"), FLAGS.seed)
  cfg, params = models.load_pretrained(ckpt)
  logging.info("loaded %s: %d layers, %.2fM params", ckpt, cfg.num_layers, cfg.num_params() / 1e6)
  tokens = np.random.default_rng(FLAGS.seed).integers(
      0, cfg.vocab_size, (1, FLAGS.prompt_len), dtype=np.int32)
  t0 = time.perf_counter()
  full = np.asarray(models.forward(cfg, params, tokens))
  t_full = time.perf_counter() - t0
  half = FLAGS.prompt_len // 2
  cache = models.init_cache(cfg, 1, FLAGS.prompt_len)
  pos = np.arange(FLAGS.prompt_len, dtype=np.int32)[None]
  ones = np.ones_like(tokens, bool)
  pre, cache = models.forward_cached(cfg, params, tokens[:, :half], pos[:, :half],
                                     ones[:, :half], cache)
  steps = [np.asarray(pre)]
  for t in range(half, FLAGS.prompt_len):
    step, cache = models.forward_cached(cfg, params, tokens[:, t:t + 1], pos[:, t:t + 1],
                                        ones[:, t:t + 1], cache)
    steps.append(np.asarray(step))
  err = float(np.max(np.abs(np.concatenate(steps, axis=1) - full)))
  result = {"checkpoint": ckpt, "params": cfg.num_params(), "prompt_len": FLAGS.prompt_len,
            "forward_seconds_incl_compile": t_full, "cache_vs_full_max_abs_diff": err}
  with open(os.path.join(FLAGS.out, "smoke.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  print("This is a smoke test of the model path only; the alignment sweep is not built yet.")
  if err > 1e-4:
    raise SystemExit(f"KV-cache logits differ from the full forward by {err:.2e}")


if __name__ == "__main__":
  app.run(main)
