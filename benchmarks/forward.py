"""Forward-pass throughput: gradalign_jax's jitted Qwen3 forward vs transformers (PyTorch).

Both load the same random checkpoint (written by transformers) and run the same
[batch, seq] forward in fp32 on this machine's CPU; we report tokens/s (median of --repeats
timed runs after warm-up / compilation) and the max relative logit difference.

  python benchmarks/forward.py --out=runs/bench_forward.json
"""

import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("out", None, "write the results as JSON here")
flags.DEFINE_integer("repeats", 5, "timed runs per measurement (median reported)")
FLAGS = flags.FLAGS

CONFIGS = {
    # ~35K parameters: as small as the toy students.
    "35K": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    # ~28M: a narrow Qwen3 with a small vocabulary.
    "28M": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64),
}
SHAPES = [(1, 512), (8, 256)]


def machine() -> str:
  return f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, " \
         f"load avg {os.getloadavg()[0]:.2f} at start"


def median_time(fn, repeats):
  fn()  # warm-up (and compilation)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  import jax
  import torch
  from transformers import Qwen3Config, Qwen3ForCausalLM

  from gradalign_jax import models

  rows = []
  for name, kw in CONFIGS.items():
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(max_position_embeddings=2048, **kw)).eval().float()
    with tempfile.TemporaryDirectory() as d:
      hf.save_pretrained(d)
      cfg, params = models.load_pretrained(d)
    for b, t in SHAPES:
      tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
      tt = torch.as_tensor(tokens, dtype=torch.long)

      def ours():
        return jax.block_until_ready(models.forward(cfg, params, tokens))

      def ref():
        with torch.inference_mode():
          return hf(tt).logits

      diff = float(np.max(np.abs(np.asarray(ours()) - ref().numpy())) /
                   np.max(np.abs(ref().numpy())))
      t_ours, t_ref = median_time(ours, FLAGS.repeats), median_time(ref, FLAGS.repeats)
      rows.append({"model": name, "params": cfg.num_params(), "batch": b, "seq": t,
                   "ours_tok_s": b * t / t_ours, "torch_tok_s": b * t / t_ref,
                   "speedup": t_ref / t_ours, "max_rel_logit_diff": diff})
      r = rows[-1]
      print(f"{name:>5} ({r['params'] / 1e6:6.2f}M) B={b:<2} T={t:<4} ours {r['ours_tok_s']:10.0f} "
            f"tok/s  torch {r['torch_tok_s']:10.0f} tok/s  x{r['speedup']:.2f}  "
            f"rel diff {diff:.1e}")
  result = {"machine": machine(), "jax": jax.__version__, "torch": torch.__version__,
            "forward": rows}
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
