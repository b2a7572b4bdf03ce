"""In-context accuracy: how often each teacher spec's model answers correctly given its context.

For every student, question and teacher spec, the spec's model (``self`` → the student,
``<model>`` → that model) answers the question with the spec's context in its prompt
(``contexts.teacher_prompt``), ``--num_rollouts`` samples each; the student's plain accuracy
(no context) is the baseline row. Contexts are built exactly as in the alignment sweep
(``pipeline.accuracy_group``): demonstrations from the student's *extra* rollouts (keyed
apart from the scored ones by ``pipeline.DEMO_STREAM``), summaries written greedily and
cached in
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

The flags are the alignment sweep's minus the targeted-rollout and scoring groups
(experiments/flags.py; --budget and the like are refused). With no flags it runs both bundled toy students on the synthetic task:

  python -m experiments.in_context_accuracy --out=runs/in_context
  python -m experiments.in_context_accuracy --students=Qwen/Qwen3-1.7B \\
      --teachers=self:correct_demo,self:summary,Qwen/Qwen3-8B --task=math \\
      --data=path/to/test.jsonl --num_questions=200 --num_rollouts=8 --max_new_tokens=4096 \\
      --out=runs/in_context_math
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, logging

from experiments import files
from experiments import flags as flags_lib
from gradalign_jax import contexts, pipeline, rundir, tasks
from gradalign_jax.analysis import in_context, report
from gradalign_jax.models.loaded import ModelCache

GROUPS = ("contexts",)
flags_lib.use(GROUPS)
DEFAULT_OUT = "runs/in_context"
FLAGS = flags_lib.FLAGS


def settings(**overrides) -> dict:
  """This experiment's settings: the flags (or their defaults), replaced by ``overrides``."""
  return flags_lib.settings(GROUPS, **overrides)


def run(settings: dict, out: str, *, overwrite: bool = False,
        stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the table into ``out`` and writes the outputs.

  settings: from ``settings()``. stop_after: stop after this many question groups of this
  call (to simulate an interruption). Returns the summary dict, or None when stopped early.
  """
  config = flags_lib.diagnose_config(settings)
  specs = contexts.parse_specs(settings["teachers"])
  task = tasks.get_task(settings["task"])
  examples = task.load(settings["data"], limit=settings["num_questions"])
  if not examples:
    raise ValueError(f"--data={settings['data']!r} gave no questions")
  run_dir = rundir.RunDir(out, settings, overwrite=overwrite, stop_after=stop_after)
  models = ModelCache(settings["dtype"])
  cache = contexts.SummaryCache(run_dir.file("summaries.json"))
  groups = pipeline.groups_of(len(examples), config.question_batch)
  start = time.time()
  try:
    for name in settings["students"]:
      setup = pipeline.setup(name, specs, task, examples, config, models)
      todo = run_dir.todo(rundir.tag(name), groups, label=name)
      if not todo:
        continue
      summaries = pipeline.write_summaries(setup, task, examples, cache, config)
      for group in run_dir.progress(todo, label=name):
        rows = pipeline.accuracy_group(setup, task, examples, group, summaries, config)
        run_dir.write_parts(rundir.tag(name), {i: {"accuracy": r} for i, r in rows.items()})
        accs = {}
        for r in (r for group_rows in rows.values() for r in group_rows):
          accs.setdefault(r["spec"], []).append(r["accuracy"])
        logging.info("%s accuracy: %s", name, ", ".join(
            f"{s} {np.nanmean(a):.2f}" if np.isfinite(a).any() else f"{s} n/a"
            for s, a in accs.items()))
  except rundir.Interrupt:
    return None
  return finish(settings, run_dir, len(examples), time.time() - start)


def finish(settings: dict, run_dir: rundir.RunDir, num_questions: int, seconds: float) -> dict:
  """Writes accuracy.parquet/.csv, summary.json, report.md and the plot from the parts."""
  table = run_dir.merge([rundir.tag(s) for s in settings["students"]], num_questions,
                        ["accuracy"])["accuracy"]
  files.save_table(table, run_dir.file("accuracy.parquet"))
  files.save_table(table, run_dir.file("accuracy.csv"))
  config = dict(settings, num_questions_loaded=num_questions, seconds=seconds)
  summary = in_context.summarize(table, config, seed=settings["seed"])
  files.write_text(run_dir.file("summary.json"), report.to_json(summary))
  png = "in_context_accuracy.png"
  files.save_figure(in_context.plot_accuracy(summary), run_dir.file(png))
  files.write_text(run_dir.file("report.md"), in_context.render_report(summary, png))
  logging.info("wrote %s (report.md, summary.json, accuracy.parquet/.csv, %s)", run_dir.path,
               png)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  try:
    flags_lib.refuse_others(GROUPS)
    run(settings(), FLAGS.out, overwrite=FLAGS.overwrite)
  except ValueError as e:  # contexts.SpecError is one
    raise app.UsageError(str(e)) from None
  print(f"report: {os.path.join(FLAGS.out, 'report.md')}")


if __name__ == "__main__":
  FLAGS.set_default("out", DEFAULT_OUT)  # only as the script: others keep their own
  app.run(main)
