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
(experiments/flags.py; --budget and the like are refused). With no flags it runs both
bundled toy students on the synthetic task:

  python -m experiments.in_context_accuracy --out=runs/in_context
  python -m experiments.in_context_accuracy --students=Qwen/Qwen3-1.7B \\
      --teachers=self:correct_demo,self:summary,Qwen/Qwen3-8B --task=math \\
      --data=path/to/test.jsonl --num_questions=200 --num_rollouts=8 --max_new_tokens=4096 \\
      --out=runs/in_context_math
"""

from __future__ import annotations

from absl import logging

from experiments import files
from experiments import flags as flags_lib
from gradalign_jax import pipeline, rundir
from gradalign_jax.analysis import in_context, report

GROUPS = ("contexts",)
flags_lib.use(GROUPS)
DEFAULT_OUT = "runs/in_context"


def settings(**overrides) -> dict:
  """This experiment's settings: the flags (or their defaults), replaced by ``overrides``."""
  return flags_lib.settings(GROUPS, **overrides)


def run(settings: dict, out: str, *, overwrite: bool = False,
        stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the table into ``out`` and writes the outputs.

  settings: from ``settings()``. stop_after: stop after this many question groups of this
  call (to simulate an interruption). Returns the summary dict, or None when stopped early.
  """
  return flags_lib.run_groups(settings, out, pipeline.accuracy_group, finish, overwrite=overwrite,
                              stop_after=stop_after)


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


if __name__ == "__main__":
  flags_lib.run_script(GROUPS, run, DEFAULT_OUT)
