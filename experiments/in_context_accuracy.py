"""In-context accuracy: how often each teacher spec's model answers correctly given its context.

For every student, question and teacher spec, the spec's model (``self`` → the student,
``<model>`` → that model) answers the question with the spec's context in its prompt
(``contexts.teacher_prompt``), ``--num_rollouts`` samples each; the student's plain accuracy
(no context) is the baseline row. Contexts are built exactly as in the alignment sweep:
demonstrations from the student's *extra* rollouts (keyed apart from the scored ones by
``alignment_sweep.DEMO_STREAM``), summaries written greedily and cached in
``--out/summaries.json``. With the same flags, the baseline samples are the sweep's on-policy
rollouts and the demo pools are the sweep's. Results go to ``--out``:

  accuracy.parquet, .csv  one row per (student, spec, question): n_samples, n_correct,
                          accuracy, context ("ok" or why the question cannot carry it),
                          prompt_tokens, context_tokens (what the context adds to the plain
                          prompt), prompt_hash, mean_length, n_truncated
  summary.json            per student and spec: accuracy, 95% bootstrap interval over
                          questions, questions with the context, paired difference vs the
                          student's plain accuracy on the same questions
  report.md               the table (rows: specs and "student (no context)"; columns: students)
  in_context_accuracy.png bars per spec and student with their intervals
  parts/                  per-question rows, written atomically: a rerun with the same --out
                          resumes where an interrupted run stopped

The flags are the alignment sweep's (those it has that do not apply here, such as --budget,
are refused). With no flags it runs both bundled toy students on the synthetic task:

  python -m experiments.in_context_accuracy --out=runs/in_context
  python -m experiments.in_context_accuracy --students=Qwen/Qwen3-1.7B \\
      --teachers=self:correct_demo,self:summary,Qwen/Qwen3-8B --task=math \\
      --data=path/to/test.jsonl --num_questions=200 --num_rollouts=8 --max_new_tokens=4096 \\
      --out=runs/in_context_math
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time

import numpy as np
from absl import app, flags, logging

from experiments import alignment_sweep as sweep

# The sweep's flags this script reads; the others are the sweep's alone and refused here.
SHARED_FLAGS = ("students", "teachers", "task", "data", "num_questions", "num_rollouts",
                "temperature", "top_p", "top_k", "max_new_tokens", "thinking", "demo_samples",
                "summary_tokens", "question_batch", "dtype", "seed", "out", "overwrite")
DEFAULT_OUT = "runs/in_context"
for _name in SHARED_FLAGS:
  flags.declare_key_flag(_name)  # listed by this script's --help
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class AccuracyConfig:
  """Everything that determines the results (saved as config.json; a resumed run must match).
  num_rollouts: samples per question and spec; the rest as in alignment_sweep.SweepConfig."""
  students: tuple[str, ...] = ("student_small", "student_large")
  teachers: tuple[str, ...] = sweep.DEFAULT_TEACHERS
  task: str = "synthetic"
  data: str = "synthetic:seed=1,n=256"
  num_questions: int = 16
  num_rollouts: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 48
  thinking: str = "task"
  demo_samples: int = 16
  summary_tokens: int = 32
  question_batch: int = 8
  dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    for name in ("students", "teachers"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not self.students:
      raise ValueError("no student given: pass --students")
    if min(self.num_questions, self.num_rollouts, self.question_batch, self.demo_samples) < 1:
      raise ValueError("need num_questions, num_rollouts, question_batch and demo_samples ≥ 1")

  @classmethod
  def from_flags(cls) -> "AccuracyConfig":
    return cls(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Outcome:
  """The verified samples of one (model, prompt): counts, mean length, truncated samples."""
  n_samples: int
  n_correct: int
  mean_length: float
  n_truncated: int


def answer(cfg: AccuracyConfig, task, model: sweep.Model, prompts: list[list[int]], exs,
           indices: list[int]) -> list[Outcome]:
  """``cfg.num_rollouts`` samples of ``model`` per prompt, verified against its example.

  prompts: Q token-id lists; exs, indices: the Q examples and their dataset indices (the
  sampler's question ids, so a question's samples do not depend on the batch it is in).
  """
  from gradalign_jax import sampling

  g = cfg.num_rollouts
  ro = sampling.sample(model.cfg, model.params, prompts, model.sampling(cfg), num_samples=g,
                       seed=cfg.seed, question_ids=indices, vocab_mask=model.mask)
  out = []
  for j, ex in enumerate(exs):
    rows = range(j * g, (j + 1) * g)
    correct = sum(bool(task.verify(model.decode(ro.sequence(r)), ex)) for r in rows)
    out.append(Outcome(g, int(correct), float(np.mean(ro.lengths[j * g:(j + 1) * g])),
                       int(np.sum(ro.stop_reason[j * g:(j + 1) * g] == sampling.STOP_MAX_TOKENS))))
  return out


def _row(spec: str, answerer: str, i: int, ex, status: str, ids, plain_len: int,
         outcome: Outcome | None) -> dict:
  row = dict(spec=spec, answerer=answerer, question_id=ex.id, question_index=i,
             context=status, prompt_tokens=0 if ids is None else len(ids),
             context_tokens=0 if ids is None else len(ids) - plain_len,
             prompt_hash="" if ids is None else prompt_hash(ids))
  if outcome is None:
    return dict(row, n_samples=0, n_correct=0, accuracy=float("nan"),
                mean_length=float("nan"), n_truncated=0)
  return dict(row, n_samples=outcome.n_samples, n_correct=outcome.n_correct,
              accuracy=outcome.n_correct / outcome.n_samples, mean_length=outcome.mean_length,
              n_truncated=outcome.n_truncated)


def prompt_hash(ids) -> str:
  """A short fingerprint of a prompt's token ids (lets a reader check which context was read)."""
  return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


def run_group(cfg: AccuracyConfig, task, specs, name: str, student: sweep.Model,
              answerers: dict, examples, indices: list[int], summaries) -> dict[int, list[dict]]:
  """Every row of a fixed group of questions: {dataset index: rows (baseline, then specs)}."""
  from gradalign_jax.analysis.in_context import BASELINE

  think = sweep.thinking(cfg, task)
  exs = [examples[i] for i in indices]
  plain = lambda m, ex: m.encode(task.prompt(m.tok, ex, enable_thinking=think))
  prompts = [plain(student, ex) for ex in exs]
  rows = {i: [] for i in indices}
  for i, ex, ids, o in zip(indices, exs, prompts, answer(cfg, task, student, prompts, exs,
                                                         indices)):
    rows[i].append(_row(BASELINE, name, i, ex, "ok", ids, len(ids), o))
  demo_pools = [None] * len(exs)
  if any(s.needs_rollout_demos for s in specs):
    demo_pools = sweep.sample_demo_pools(cfg, task, student, prompts, exs, indices)
  for spec in specs:
    model = answerers[spec.text]
    built = [sweep.context_prompt(cfg, task, spec, model, ex, think, demo_pools[j],
                                  summaries.get((spec.text, ex.id)))
             for j, ex in enumerate(exs)]
    live = [j for j, (ids, _) in enumerate(built) if ids is not None]
    outcomes = {}
    if live:
      outcomes = dict(zip(live, answer(cfg, task, model, [built[j][0] for j in live],
                                       [exs[j] for j in live], [indices[j] for j in live])))
    who = name if spec.is_self else spec.model
    for j, (i, ex) in enumerate(zip(indices, exs)):
      ids, status = built[j]
      base_len = len(prompts[j]) if model is student else len(plain(model, ex))
      rows[i].append(_row(spec.text, who, i, ex, status, ids, base_len, outcomes.get(j)))
  return rows


def run(cfg: AccuracyConfig, out: str, *, overwrite: bool = False,
        stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the table into ``out`` and writes the outputs.

  stop_after: stop after this many question groups of this call (to simulate an
  interruption). Returns the summary dict, or None when stopped early.
  """
  from gradalign_jax import contexts, tasks

  specs = contexts.parse_specs(cfg.teachers)
  if overwrite:
    shutil.rmtree(out, ignore_errors=True)
  task = tasks.get_task(cfg.task)
  examples = task.load(cfg.data, limit=cfg.num_questions)
  if not examples:
    raise ValueError(f"--data={cfg.data!r} gave no questions")
  sweep.save_config(cfg, out)
  models = sweep.Models(cfg.dtype)
  cache = contexts.SummaryCache(os.path.join(out, "summaries.json"))
  think = sweep.thinking(cfg, task)
  start, groups_done = time.time(), 0
  for name in cfg.students:
    student = models.get(name, name)
    answerers = {s.text: student if s.is_self else models.get(s.model, name) for s in specs}
    sweep.check_lengths(student, {ex.id: student.encode(task.prompt(student.tok, ex,
                                                                     enable_thinking=think))
                                  for ex in examples}, cfg.max_new_tokens, "student")
    tag = sweep.student_tag(name)
    groups = [list(range(lo, min(lo + cfg.question_batch, len(examples))))
              for lo in range(0, len(examples), cfg.question_batch)]
    todo = [grp for grp in groups
            if not all(os.path.isdir(sweep.part_dir(out, tag, i)) for i in grp)]
    if len(todo) < len(groups):
      logging.info("%s: %d of %d question groups already done in %s; resuming", name,
                   len(groups) - len(todo), len(groups), out)
    if not todo:
      continue
    summaries = sweep.generate_summaries(cfg, task, specs, name, models, examples, cache)
    for n, grp in enumerate(todo):
      if stop_after is not None and groups_done >= stop_after:
        return None
      t0 = time.time()
      results = run_group(cfg, task, specs, name, student, answerers, examples, grp, summaries)
      for i, rows in results.items():
        if not os.path.isdir(sweep.part_dir(out, tag, i)):
          sweep.write_part(out, tag, i, {"accuracy": [dict(r, student=name) for r in rows]})
      groups_done += 1
      accs = {}
      for rows in results.values():
        for r in rows:
          accs.setdefault(r["spec"], []).append(r["accuracy"])
      logging.info("%s: questions %d–%d done (%d/%d groups, %.1f s; %.0f s elapsed, ~%.0f s "
                   "left for this student); accuracy %s", name, grp[0], grp[-1], n + 1,
                   len(todo), time.time() - t0, time.time() - start,
                   (len(todo) - n - 1) * (time.time() - t0),
                   ", ".join(f"{s} {np.nanmean(a):.2f}" if np.isfinite(a).any() else f"{s} n/a"
                             for s, a in accs.items()))
  return finish(cfg, out, len(examples), time.time() - start)


def finish(cfg: AccuracyConfig, out: str, num_examples: int, seconds: float) -> dict:
  """Writes accuracy.parquet/.csv, summary.json, report.md and the plot from the parts."""
  import pandas as pd

  from experiments.files import save_figure, write_text
  from gradalign_jax.analysis import in_context, report

  parts = [pd.read_parquet(os.path.join(sweep.part_dir(out, sweep.student_tag(s), i),
                                        "accuracy.parquet"))
           for s in cfg.students for i in range(num_examples)]
  table = pd.concat(parts, ignore_index=True)
  first = ["student", "spec", "question_id", "question_index"]
  table = table[first + [c for c in table.columns if c not in first]]
  table.to_parquet(os.path.join(out, "accuracy.parquet"))
  table.to_csv(os.path.join(out, "accuracy.csv"), index=False)
  config = dict(dataclasses.asdict(cfg), num_questions_loaded=num_examples, seconds=seconds)
  summary = in_context.summarize(table, config, seed=cfg.seed)
  with open(os.path.join(out, "summary.json"), "w") as f:
    f.write(report.to_json(summary))
  png = "in_context_accuracy.png"
  save_figure(in_context.plot_accuracy(summary), os.path.join(out, png))
  write_text(os.path.join(out, "report.md"), in_context.render_report(summary, png))
  logging.info("wrote %s (report.md, summary.json, accuracy.parquet/.csv, %s)", out, png)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  from gradalign_jax import contexts

  foreign = sorted(f.name for f in FLAGS.flags_by_module_dict().get(sweep.__name__, [])
                   if f.name not in SHARED_FLAGS and f.present)
  if foreign:
    raise app.UsageError(f"alignment_sweep flags that in_context_accuracy does not use: "
                         f"--{', --'.join(foreign)}; drop them (--help lists this script's)")
  try:
    cfg = AccuracyConfig.from_flags()
    run(cfg, FLAGS.out, overwrite=FLAGS.overwrite)
  except (contexts.SpecError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  print(f"report: {os.path.join(FLAGS.out, 'report.md')}")


if __name__ == "__main__":
  FLAGS.set_default("out", DEFAULT_OUT)  # only when run as the script: the sweep keeps its own
  app.run(main)
