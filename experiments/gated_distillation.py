"""Does alignment predict what helps? Trains the toy student by on-policy distillation in arms
that differ only in which tokens' loss is kept, and compares held-out accuracy.

Every arm: each step, --question_batch questions × --num_rollouts on-policy rollouts of the
current student (T = 1, untruncated), one optax adam step; the per-token loss is the full-
vocabulary reverse KL(p_θ‖q) to the teacher (GKD's default, gradient through p_θ only),
summed over the kept tokens and divided by the batch's valid tokens. The arms
(gradalign_jax/distill.py):

  all_tokens         every generated token
  incorrect_only     the tokens of rollouts the verifier marks wrong
  alignment_gated    tokens whose estimated alignment cos(ĝ*, d_reverse_kl) at their prefix
                     node is > 0: the diagnostic (targeted rollouts, --budget per question,
                     on the current student) refreshed every --refresh_every steps; a token
                     whose prefix node has no estimate (not scored, or not informative) is
                     dropped (--uncovered_tokens=keep keeps it)
  proxy_<name>       one arm per cheap proxy of gradalign_jax/proxies.py (student_entropy,
                     kl_pq, abs_p_minus_q, teacher_logprob): the top tokens of the batch by
                     that score, as many as alignment_gated kept at that step of that seed
  random_fraction    as many tokens, chosen uniformly at random (sparsity without selection)
  covered_random     as many tokens, chosen uniformly among the covered ones (prefix node
                     scored and informative: the tokens alignment_gated chooses among, at a
                     few early branching positions), all of them if fewer; runs its own
                     diagnostic. alignment_gated − covered_random is what alignment's sign
                     adds beyond position/coverage
  reinforce          no distillation: policy gradient of the verifier's reward with a
                     per-question mean baseline, on the same rollouts

Arms of one seed share the initial student, the questions of each step and the sampler
seeds; --train_seeds runs per arm; held-out accuracy (--eval_data × --eval_samples at T = 1)
every --eval_every steps. Outputs in --out:

  curves.parquet  one row per (arm, seed, step): accuracy (NaN where not evaluated),
                  kept_fraction, covered_fraction, train_reward, loss
  compute.parquet one row per (arm, seed): rollouts, tokens through each model, seconds
  summary.json    {"arms": {arm: {final_accuracy, ci_low, ci_high, p_vs_all_tokens,
                  num_seeds, kept_fraction, rollouts, forward_tokens, ...}}, ...}
  report.md       the answers, the table, curves.png (mean ± 95% t interval per arm)
  parts/          one part per (arm, seed): a rerun skips the finished ones

  python -m experiments.gated_distillation --out=runs/gated_distillation
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
from absl import logging

from experiments import files
from experiments import flags as flags_lib
from gradalign_jax import contexts, distill, distributed, rundir, training
from gradalign_jax.analysis import report
from gradalign_jax.analysis import training as analysis
from gradalign_jax.models.loaded import ModelCache
from gradalign_jax.tasks.base import fingerprint_source

GROUPS = ("targeted", "scoring", "training")
flags_lib.use(GROUPS)
DEFAULT_OUT = "runs/gated_distillation"
# Sized to fit ~30 minutes on 2 shared CPU cores: all_tokens moves student_small's held-out
# accuracy from ~0.44 to ~0.7 in 30 steps at this learning rate.
DEFAULTS = dict(students=["student_small"], teachers=["teacher"],
                data="synthetic:seed=1,n=1024", num_questions=1024, question_batch=8,
                num_rollouts=8, max_new_tokens=48, budget=16, rounds=1, permutations=0,
                directions=["reverse_kl"])


def settings(**overrides) -> dict:
  """This experiment's settings: the flags (or their defaults), replaced by ``overrides``."""
  return flags_lib.settings(GROUPS, **overrides)


def _check(s: dict):
  if len(s["students"]) != 1 or len(s["teachers"]) != 1:
    raise ValueError(f"gated distillation trains one student from one teacher; got "
                     f"--students={','.join(s['students'])} --teachers="
                     f"{','.join(s['teachers'])}")
  if (s["temperature"], s["top_p"], s["top_k"]) != (1.0, 1.0, 0):
    raise ValueError("gated distillation samples, distils and evaluates at T = 1 without "
                     "truncation (the loss and the proxies read the raw logits): drop "
                     "--temperature, --top_p and --top_k")
  spec = contexts.parse_spec(s["teachers"][0])
  if spec.is_self:
    # The loss would read the frozen initial student as teacher while the diagnostic scores
    # the current student against itself (d_reverse_kl ≡ 0: alignment_gated keeps nothing).
    raise ValueError(f"--teachers={spec.text}: self-distillation has no teacher to distil "
                     "from here; pass a teacher model (e.g. --teachers=teacher)")
  if spec.context != "none":
    raise ValueError(f"--teachers={spec.text}: the training teacher reads the student's prompt "
                     "as it is; pass a model without a context (e.g. --teachers=teacher)")
  return spec


def run(s: dict, out: str, *, overwrite: bool = False) -> dict:
  """Trains every (arm, seed) that lacks a part in ``out``, then writes the outputs."""
  if distributed.processes().count > 1:
    # The proxy arms read alignment_gated's kept fractions, so (arm, seed) runs are not
    # independent units to deal out; one process (with --model_parallel) runs them all.
    raise ValueError("gated_distillation runs as one process: launch it without "
                     "--num_processes / a multi-process launcher")
  spec = _check(s)
  tcfg = flags_lib.training_config(s)
  config, specs, task, pool = flags_lib.prepare(s)
  evals = task.load(s["eval_data"])
  shared = {ex.question for ex in evals} & {ex.question for ex in pool}
  if shared:
    raise ValueError(f"{len(shared)} held-out questions of --eval_data={s['eval_data']} are "
                     f"also in --data={s['data']} (e.g. {sorted(shared)[0]!r}): pick disjoint "
                     "sources")
  inputs = flags_lib.inputs(s, specs)
  inputs[f"--eval_data={s['eval_data']}"] = fingerprint_source(s["eval_data"])
  run_dir = rundir.RunDir(out, s, inputs=inputs, overwrite=overwrite)
  models = ModelCache(s["dtype"])
  name = s["students"][0]
  student = models.get(name, name)
  teacher = models.get(spec.model, name)
  trainer = training.Trainer(student, teacher, task, pool, evals, tcfg, config)
  with run_dir.open():
    start = time.time()
    for arm in tcfg.ordered_arms():
      for (seed,) in run_dir.todo(arm, [[i] for i in range(tcfg.seeds)], label=arm):
        fractions = None
        if arm in distill.FRACTION_ARMS:
          gated = pd.read_parquet(os.path.join(run_dir.part_dir("alignment_gated", seed),
                                               "curves.parquet"))
          fractions = gated.sort_values("step")["kept_fraction"].to_numpy()[1:]
        t0 = time.time()
        result = training.train_arm(trainer, arm, seed, fractions)
        rows = [dict(arm=arm, seed=seed, **r) for r in result.curve]
        run_dir.write_parts(arm, {seed: {"curves": rows,
                                         "compute": [dict(arm=arm, seed=seed,
                                                          **result.compute)]}})
        logging.info("%s seed %d done in %.0f s: held-out accuracy %.3f → %.3f, kept %.3f "
                     "(%.0f s elapsed)", arm, seed, time.time() - t0, rows[0]["accuracy"],
                     rows[-1]["accuracy"], np.nanmean([r["kept_fraction"] for r in rows]),
                     time.time() - start)
    return finish(s, run_dir, time.time() - start, teacher.ref)


def finish(s: dict, run_dir: rundir.RunDir, seconds: float, teacher: str) -> dict:
  arms = training.TrainConfig(arms=s["arms"]).ordered_arms()
  merged = run_dir.merge(arms, s["train_seeds"], ["curves", "compute"])
  curves, compute = merged["curves"], merged["compute"]
  files.save_table(curves, run_dir.file("curves.parquet"))
  files.save_table(compute, run_dir.file("compute.parquet"))
  summary = analysis.summarize(curves, compute)
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  summary.update(config=s, teacher=teacher, wall_seconds=seconds, load_average=load)
  files.write_text(run_dir.file("summary.json"), report.to_json(summary))
  files.save_figure(analysis.curves_figure(curves), run_dir.file("curves.png"))
  files.write_text(run_dir.file("report.md"),
                   analysis.report_markdown(summary, s, seconds, load, teacher))
  for line in analysis.verdicts(summary):
    logging.info("%s", line)
  return summary


if __name__ == "__main__":
  flags_lib.run_script(GROUPS, run, DEFAULT_OUT, DEFAULTS)
