"""Sampler benchmark: ours against Hugging Face ``generate`` on the same weights, decode FLOP/s
against this machine's matmul rate, and the cost of branching at depth t.

    PYTHONPATH=. python benchmarks/sampler.py --out=runs/bench_sampler.json

Both sides run on the CPU in one process, one after the other, with the same random Qwen3
(transformers writes it, ``models.load_pretrained`` reads it back). Times are medians of
``--repeats`` runs after a warm-up (ours: compile; HF: first call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import models, sampling

MODELS = {  # HF Qwen3Config kwargs
    "0.1M": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True),
    "28M": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                tie_word_embeddings=False),
}
PROMPT_LEN = 16
NEW_TOKENS = 64


def _machine() -> dict:
  cpu = "unknown"
  if os.path.exists("/proc/cpuinfo"):
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  import torch
  return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(),
              jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
              load_avg_start=list(os.getloadavg()))


def _median_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _make_model(name: str, tmp: str):
  import torch
  from transformers import Qwen3Config, Qwen3ForCausalLM
  torch.manual_seed(0)
  hf = Qwen3ForCausalLM(Qwen3Config(max_position_embeddings=2048, **MODELS[name])).eval()
  path = os.path.join(tmp, name)
  hf.save_pretrained(path, safe_serialization=True)
  cfg, params = models.load_pretrained(path)
  return hf, cfg, params


def _flops_per_token(cfg, context: int) -> float:
  """Matmul FLOPs of one token attending to ``context`` earlier slots (embedding lookup free)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  proj = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
  attn = 2 * cfg.num_heads * h * context  # q·k and p·v
  return 2.0 * (cfg.num_layers * (proj + attn) + cfg.vocab_size * d)


def bench_generate(name, hf, cfg, params, batch, repeats):
  import torch
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, cfg.vocab_size, PROMPT_LEN).tolist()
  sc = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS)  # no EOS: every row makes 64 tokens

  def ours():
    ro = sampling.sample(cfg, params, [prompt], sc, num_samples=batch, seed=0)
    assert int(ro.lengths.min()) == NEW_TOKENS

  ids = torch.tensor([prompt] * batch)

  def theirs():
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                        top_p=1.0, temperature=1.0, max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS, use_cache=True, pad_token_id=0)
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS

  t_ours = _median_time(ours, repeats)
  t_hf = _median_time(theirs, max(1, repeats // 2))
  n = batch * NEW_TOKENS
  row = dict(model=name, params=cfg.num_params(), batch=batch, new_tokens=NEW_TOKENS,
             ours_tok_s=n / t_ours, hf_tok_s=n / t_hf, ours_s=t_ours, hf_s=t_hf)
  # FLOPs of the whole call: prefill of the prompt once, then the decode steps.
  flops = PROMPT_LEN * _flops_per_token(cfg, PROMPT_LEN / 2) + sum(
      batch * _flops_per_token(cfg, PROMPT_LEN + i) for i in range(NEW_TOKENS - 1))
  row["ours_gflops"] = flops / t_ours / 1e9
  return row


def matmul_peak(repeats) -> float:
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(lambda a, b: jnp.dot(a, b))
  best = min(_timed(lambda: dot(a, b).block_until_ready()) for _ in range(repeats + 1))
  return 2 * n ** 3 / best / 1e9


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bench_branch(cfg, params, depths, m, new_tokens, repeats):
  """Branch M rows at depth t of one 512-token rollout; re-prefilling prompt + t for contrast."""
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, cfg.vocab_size, PROMPT_LEN).tolist()
  sc = sampling.SamplingConfig(max_new_tokens=512)
  src = sampling.sample(cfg, params, [prompt], sc, num_samples=1, seed=0)
  assert src.lengths[0] == 512
  out = {}
  for t in depths:
    def ours():
      br = sampling.branch(cfg, params, src, [0], [t], [7], num_samples=m, seed=1,
                           max_branch_tokens=new_tokens)
      assert br.lengths.min() == t + new_tokens

    prefix = prompt + src.sequence(0)[:t] + [7]
    sc_re = sampling.SamplingConfig(max_new_tokens=new_tokens - 1)

    def reprefill():
      sampling.sample(cfg, params, [prefix], sc_re, num_samples=m, seed=1)

    out[t] = dict(branch_s=_median_time(ours, repeats), reprefill_s=_median_time(reprefill, repeats))
  base = out[depths[0]]["branch_s"]
  for t in depths:
    out[t]["ratio"] = out[t]["branch_s"] / base
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="JSON file for the results")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--models", default="0.1M,28M")
  ap.add_argument("--batches", default="16,64")
  ap.add_argument("--branch_depths", default="0,64,128,256,448")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  result = dict(machine=_machine(), generate=[])
  peak = matmul_peak(args.repeats)
  print(f"fp32 matmul (jnp.dot 2048²): {peak:.1f} GFLOP/s")
  result["matmul_peak_gflops"] = peak
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      hf, cfg, params = _make_model(name, tmp)
      for batch in map(int, args.batches.split(",")):
        row = bench_generate(name, hf, cfg, params, batch, args.repeats)
        result["generate"].append(row)
        print(f"{name:>5} ({row['params']:,} params) batch {batch:3d}: ours {row['ours_tok_s']:9.0f} "
              f"tok/s, HF {row['hf_tok_s']:8.0f} tok/s, ×{row['ours_tok_s'] / row['hf_tok_s']:.1f}; "
              f"ours {row['ours_gflops']:.1f} GFLOP/s")
        if name == "28M" and batch == 64:
          result["decode_flops_fraction"] = row["ours_gflops"] / peak
      if name == "28M":
        depths = [int(t) for t in args.branch_depths.split(",")]
        br = bench_branch(cfg, params, depths, m=16, new_tokens=32, repeats=args.repeats)
        result["branch_cost_ratio"] = {str(t): v["ratio"] for t, v in br.items()}
        result["branch"] = {str(t): v for t, v in br.items()}
        for t, v in br.items():
          print(f"branch t={t:3d} (M=16, 32 tokens): {v['branch_s'] * 1e3:7.1f} ms "
                f"(×{v['ratio']:.2f} of t=0); re-prefill prompt+t: {v['reprefill_s'] * 1e3:7.1f} ms")
  if "decode_flops_fraction" in result:
    print(f"decode FLOP/s fraction of matmul peak (28M, batch 64): "
          f"{result['decode_flops_fraction']:.2f}")
  result["machine"]["load_avg_end"] = list(os.getloadavg())
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
