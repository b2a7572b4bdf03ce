"""Sampler benchmark: ours against Hugging Face ``generate`` on the same weights, decode FLOP/s
against this machine's matmul rate, and the cost of branching at depth t.

    PYTHONPATH=. python benchmarks/sampler.py --out=runs/bench_sampler.json

Both sides run on the CPU in one process, one after the other, with the same random Qwen3
(transformers writes it, ``models.load_pretrained`` reads it back). Times over
``--repeats`` runs after a warm-up (ours: compile; HF: first call) are reported as the
*fastest* run: on a machine shared with other jobs the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gradalign_jax import models, sampling

from common import best_time, finish

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

  t_ours = best_time(ours, repeats)
  t_hf = best_time(theirs, repeats)
  n = batch * NEW_TOKENS
  row = dict(model=name, params=cfg.num_params(), batch=batch, new_tokens=NEW_TOKENS,
             ours_tok_s=n / t_ours, hf_tok_s=n / t_hf, ours_s=t_ours, hf_s=t_hf)
  # FLOPs of the whole call: prefill of the prompt once, then the decode steps.
  flops = PROMPT_LEN * _flops_per_token(cfg, PROMPT_LEN / 2) + sum(
      batch * _flops_per_token(cfg, PROMPT_LEN + i) for i in range(NEW_TOKENS - 1))
  row["ours_gflops"] = flops / t_ours / 1e9
  return row


def matmul_peak(tries: int = 10) -> float:
  """fp32 GFLOP/s of jnp.dot on 2048² matrices, fastest of ``tries``."""
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(lambda a, b: jnp.dot(a, b))
  dot(a, b).block_until_ready()
  best = min(_timed(lambda: dot(a, b).block_until_ready()) for _ in range(tries))
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

    out[t] = dict(branch_s=best_time(ours, repeats), reprefill_s=best_time(reprefill, repeats))
  base = out[depths[0]]["branch_s"]
  for t in depths:
    out[t]["ratio"] = out[t]["branch_s"] / base
  return out


def bench_horizon(cfg, params, batch, long_horizon, repeats, one_stage=True):
  """Rollouts that all stop by EOS before 64 tokens, sampled under max_new_tokens=64 and under
  ``long_horizon``, and under ``long_horizon`` with one decode stage (the code before staged
  decode: every step attends to all ``long_horizon`` slots): the same rows (same seed).

  A random model's next-token distribution is near uniform, so V/16 EOS ids stop a row with
  probability ~1/16 a step; the seed is the first whose rows all stop by EOS before 64. The
  three runs alternate, each the fastest of ``repeats`` (load on a shared machine comes and
  goes)."""
  from gradalign_jax.sampling import sampler as sampler_lib
  prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, PROMPT_LEN).tolist()
  eos = tuple(range(cfg.vocab_size // 16))
  short = sampling.SamplingConfig(max_new_tokens=64, eos_ids=eos)
  long = sampling.SamplingConfig(max_new_tokens=long_horizon, eos_ids=eos,
                                 max_cache_len=PROMPT_LEN + long_horizon)
  for seed in range(50):
    ro = sampling.sample(cfg, params, [prompt], short, num_samples=batch, seed=seed)
    if np.all(ro.stop_reason == sampling.STOP_EOS):
      break
  else:
    raise RuntimeError("no seed in 0 … 49 stops every row by EOS before 64 tokens")
  first = sampler_lib.FIRST_WIDTH

  def run(sc, width):
    sampler_lib.FIRST_WIDTH = width
    try:
      t = time.perf_counter()
      out = sampling.sample(cfg, params, [prompt], sc, num_samples=batch, seed=seed)
      np.testing.assert_array_equal(out.lengths, ro.lengths)
      return time.perf_counter() - t
    finally:
      sampler_lib.FIRST_WIDTH = first

  cases = {"short": (short, first), "long": (long, first)}
  if one_stage:  # slow: every step of every row attends to long_horizon slots
    cases["one_stage"] = (long, long_horizon)
  for sc, width in cases.values():
    run(sc, width)  # compile
  times = {k: run(*cases[k]) for k in cases}
  for _ in range(repeats - 1):
    for k in cases:
      times[k] = min(times[k], run(*cases[k]))
  out = dict(batch=batch, seed=seed, long_horizon=long_horizon,
             mean_length=float(ro.lengths.mean()), max_length=int(ro.lengths.max()),
             short_s=times["short"], long_s=times["long"], ratio=times["long"] / times["short"])
  if one_stage:
    out.update(one_stage_s=times["one_stage"], one_stage_ratio=times["one_stage"] / times["short"])
  return out


def branch_memory(cfg, params, requests=(8, 16, 32, 64), m=4, horizon=512):
  """Bytes the compiled branch program allocates (XLA's ``memory_analysis()``: temporaries and
  outputs) for N requests on one source row at N different depths, against N; the prefix it
  returns (one row per distinct source: flat in N) and the new tokens' KV (rows × the first
  stage's slots: grows with N by design); and what a prefix copied per request (the design
  before) would hold."""
  from gradalign_jax.models import cache as cache_lib
  from gradalign_jax.sampling import sampler as sampler_lib
  prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, PROMPT_LEN).tolist()
  sc = sampling.SamplingConfig(max_new_tokens=horizon)
  src = sampling.sample(cfg, params, [prompt], sc, num_samples=1, seed=0)
  kv_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # f32 k and v, one slot
  width = sampler_lib._first_width(horizon)
  rows = []
  for n in requests:
    z = np.zeros(n, np.int32)
    depths = np.arange(n, dtype=np.int32)
    keys = jax.random.split(jax.random.key(0), n * m)
    lowered = sampler_lib._branch_program.lower(
        cfg, sc, m, horizon, width, params, src.state, z, depths, z, keys,
        np.ones(n * m, bool), None, cache_lib.slot_layout(z, depths, m, n * m))
    mem = lowered.compile().memory_analysis()
    prefix = lowered.out_info[1]
    rows.append(dict(requests=n, rows=n * m, temp_bytes=int(mem.temp_size_in_bytes),
                     output_bytes=int(mem.output_size_in_bytes),
                     prefix_bytes=sum(int(x.size) for x in prefix.k + prefix.v) * 4,
                     new_token_kv_bytes=n * m * width * kv_slot,
                     per_request_copy_bytes=n * (src.state.prefix.valid.shape[1]
                                                 + src.state.gen.capacity) * kv_slot))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="JSON file for the results")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--models", default="0.1M,28M")
  ap.add_argument("--batches", default="16,64")
  ap.add_argument("--branch_depths", default="0,64,128,256,448")
  ap.add_argument("--sections", default="generate,branch,horizon",
                  help="what to measure: generate (ours vs HF), branch (cost at depth t), "
                       "horizon (EOS at ~64 tokens under max_new_tokens 4096 vs 64), "
                       "branch_memory (bytes of the branch program against requests on one "
                       "source)")
  ap.add_argument("--long_horizon", type=int, default=4096)
  ap.add_argument("--one_stage_models", default="0.1M",
                  help="models whose horizon row also times the single-stage decode (slow)")
  args = ap.parse_args()
  sections = set(args.sections.split(","))
  import torch
  torch.set_num_threads(os.cpu_count())
  result = dict(machine=_machine(), generate=[])
  peaks = [matmul_peak()]
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      hf, cfg, params = _make_model(name, tmp)
      for batch in map(int, args.batches.split(",")):
        if "horizon" in sections:
          h = bench_horizon(cfg, params, batch, args.long_horizon, args.repeats,
                            one_stage=name in args.one_stage_models.split(","))
          result.setdefault("horizon", []).append(dict(model=name, **h))
          print(f"{name:>5} batch {batch:3d}, rows stop by EOS at {h['mean_length']:.0f} tokens on "
                f"average (max {h['max_length']}): max_new_tokens={args.long_horizon} "
                f"{h['long_s'] * 1e3:.1f} ms, max_new_tokens=64 {h['short_s'] * 1e3:.1f} ms, "
                f"×{h['ratio']:.2f}" + (
                    f"; one decode stage (before): {h['one_stage_s'] * 1e3:.1f} ms, "
                    f"×{h['one_stage_ratio']:.2f}" if "one_stage_s" in h else ""), flush=True)
        if "generate" not in sections:
          continue
        row = bench_generate(name, hf, cfg, params, batch, args.repeats)
        result["generate"].append(row)
        print(f"{name:>5} ({row['params']:,} params) batch {batch:3d}: ours {row['ours_tok_s']:9.0f} "
              f"tok/s, HF {row['hf_tok_s']:8.0f} tok/s, ×{row['ours_tok_s'] / row['hf_tok_s']:.1f}; "
              f"ours {row['ours_gflops']:.1f} GFLOP/s")
      if name == "28M" and "branch" in sections:
        depths = [int(t) for t in args.branch_depths.split(",")]
        br = bench_branch(cfg, params, depths, m=16, new_tokens=32, repeats=args.repeats)
        result["branch_cost_ratio"] = {str(t): v["ratio"] for t, v in br.items()}
        result["branch"] = {str(t): v for t, v in br.items()}
        for t, v in br.items():
          print(f"branch t={t:3d} (M=16, 32 tokens): {v['branch_s'] * 1e3:7.1f} ms "
                f"(×{v['ratio']:.2f} of t=0); re-prefill prompt+t: {v['reprefill_s'] * 1e3:7.1f} ms")
      if name == "28M" and "branch_memory" in sections:
        result["branch_memory"] = branch_memory(cfg, params)
        for r in result["branch_memory"]:
          print(f"branch program, {r['requests']:3d} requests on one source ({r['rows']} rows): "
                f"temporaries {r['temp_bytes'] / 2**20:8.1f} MiB, outputs "
                f"{r['output_bytes'] / 2**20:8.1f} MiB; prefix {r['prefix_bytes'] / 2**20:6.1f} "
                f"MiB; new tokens' KV {r['new_token_kv_bytes'] / 2**20:6.1f} MiB; a prefix "
                f"per request would be {r['per_request_copy_bytes'] / 2**20:6.1f} MiB",
                flush=True)
  # The peak is measured before and after (other jobs on a shared machine slow a run down):
  # the larger of the two makes the fraction conservative.
  peaks.append(matmul_peak())
  peak = max(peaks)
  result["matmul_peak_gflops"] = peak
  result["matmul_peak_gflops_runs"] = peaks
  print(f"fp32 matmul (jnp.dot 2048², best of 10, start/end): "
        f"{peaks[0]:.1f} / {peaks[1]:.1f} GFLOP/s")
  for row in result["generate"]:
    if row["model"] == "28M" and row["batch"] == 64:
      result["decode_flops_fraction"] = row["ours_gflops"] / peak
      print(f"decode FLOP/s fraction of matmul peak (28M, batch 64): "
            f"{result['decode_flops_fraction']:.2f}")
  finish(result, args.out)


if __name__ == "__main__":
  main()
