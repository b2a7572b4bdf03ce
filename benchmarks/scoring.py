"""Tree scoring at real sizes: ``alignment.score_tree`` (student + teacher logits at every scored
node, then the final pass) against one forward of the same rollouts through both models.

    PYTHONPATH=. python benchmarks/scoring.py --out=runs/bench_scoring.json

The tree is G rollouts of L tokens that share only their first token (the issue's shape: the
tree has ~G·L unique nodes and barely any sharing, so the two forwards are the floor). Both
sides run in one process, one after the other, with a narrow random Qwen3 (vocab 1024, hidden
256, MLP 768, 2 layers, 4/2 heads of 64) as student and another seed of it as teacher. Times
are the fastest of ``--repeats`` runs after a warm-up (compilation excluded): on a shared
machine the minimum is the least disturbed. ``logits`` is the tree's student + teacher logits
alone (``scoring.node_logit_chunks``), ``score_tree`` adds the final pass.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np

from gradalign_jax import alignment, models, scoring, tree

from common import best_time, finish

CFG = models.Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=64)
QUESTION_LEN, CONTEXT_LEN = 32, 32


def run_case(g: int, length: int, repeats: int, chunk_nodes: int) -> dict:
  rng = np.random.default_rng(length + g)
  s_params, t_params = models.init_params(CFG, seed=1), models.init_params(CFG, seed=2)
  question = rng.integers(0, CFG.vocab_size, QUESTION_LEN).tolist()
  teacher_prompt = rng.integers(0, CFG.vocab_size, CONTEXT_LEN).tolist() + question
  first = int(rng.integers(CFG.vocab_size))
  rollouts = [[first] + rng.integers(0, CFG.vocab_size, length - 1).tolist() for _ in range(g)]
  t = tree.PrefixTree()
  for i, r in enumerate(rollouts):
    t.add(r, i % 2)
  student = scoring.PromptedModel(CFG, s_params, question)
  teacher = scoring.PromptedModel(CFG, t_params, teacher_prompt)

  def logits():
    for chunk in scoring.node_logit_chunks(t, student, teacher, chunk_nodes):
      jax.block_until_ready((chunk.student, chunk.teacher))

  def score():
    alignment.score_tree(t, student, teacher, chunk_nodes=chunk_nodes)

  s_tok = np.asarray([question + r for r in rollouts], np.int32)
  t_tok = np.asarray([teacher_prompt + r for r in rollouts], np.int32)

  def forwards():
    jax.block_until_ready((models.forward(CFG, s_params, s_tok),
                           models.forward(CFG, t_params, t_tok)))

  row = dict(g=g, length=length, unique_nodes=int(np.sum(t.arrays().child_count > 0)),
             forwards_s=best_time(forwards, repeats), logits_s=best_time(logits, repeats),
             score_tree_s=best_time(score, repeats))
  row["ratio"] = row["score_tree_s"] / row["forwards_s"]
  row["logits_ratio"] = row["logits_s"] / row["forwards_s"]
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="JSON file for the results")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--lengths", default="128,256,512,1024,2048", help="L values at G = --g")
  ap.add_argument("--g", type=int, default=16)
  ap.add_argument("--wide", default="32:1024", help="extra G:L cases, comma-separated")
  ap.add_argument("--chunk_nodes", type=int, default=256)
  args = ap.parse_args()
  cases = [(args.g, int(n)) for n in args.lengths.split(",")]
  cases += [tuple(map(int, c.split(":"))) for c in args.wide.split(",") if c]
  result = dict(machine=dict(platform=platform.platform(), cores=os.cpu_count(),
                             jax=jax.__version__, load_avg_start=list(os.getloadavg())),
                chunk_nodes=args.chunk_nodes, rows=[])
  print("| G | L | unique nodes | score_tree | logits only | two forwards | ratio | logits ratio |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for g, length in cases:
    r = run_case(g, length, args.repeats, args.chunk_nodes)
    result["rows"].append(r)
    print(f"| {g} | {length} | {r['unique_nodes']:,} | {r['score_tree_s']:.2f} s | "
          f"{r['logits_s']:.2f} s | {r['forwards_s']:.2f} s | {r['ratio']:.2f}× | "
          f"{r['logits_ratio']:.2f}× |", flush=True)
  finish(result, args.out)
  print(f"load average start {result['machine']['load_avg_start']}, end "
        f"{result['machine']['load_avg_end']}")


if __name__ == "__main__":
  main()
