"""The main job: how well each distillation gradient aligns with the ideal one, per teacher.

For every student and question: G rollouts from the student (prompt prefilled once), verified
and folded into a prefix tree; targeted rollouts branched from cached prefixes where the
estimate matters most (the budget split across teacher specs, each choosing pairs by its
own priority; all of them refine the one shared tree); then, per teacher spec, student and
teacher logits at every node, the ideal direction ĝ* and every distillation direction,
their cosines and the covariates. The work is ``gradalign_jax.pipeline``; this script adds
flags, the run directory and the files. Results go to ``--out``:

  nodes.parquet       one row per (student, spec, question, scored node): covariates, every
                      direction's cosine/dot/norm, Q̂ of the children with Wilson intervals
  rollouts.parquet    one row per on-policy rollout and spec: correct, its path's aggregates
                      (sums that combine exactly), per-token cosines for the token view
  questions.parquet   one row per (student, spec, question): accuracy, context status, means
  summary.json        per student and spec: correct / incorrect / all blocks, tests, findings
  report.md           the correct-vs-incorrect comparison, covariates, findings, plots
  tokens.html         the token explorer: pick a student, question and two specs, click a
                      token for its node (one offline page; report.md links it)
  parts/              per-question results, written atomically: a rerun with the same --out
                      resumes where an interrupted run stopped and gives identical tables

With no flags it runs both bundled toy students against the toy teacher and the
self-distillation contexts on the synthetic task (a few minutes on a laptop CPU):

  python -m experiments.alignment_sweep --out=runs/sweep
  python -m experiments.alignment_sweep --students=Qwen/Qwen3-1.7B \\
      --teachers=self:correct_demo,Qwen/Qwen3-8B --task=math --data=path/to/test.jsonl \\
      --num_questions=200 --num_rollouts=32 --max_new_tokens=4096 --out=runs/math
"""

from __future__ import annotations

from absl import logging

from experiments import files
from experiments import flags as flags_lib
from gradalign_jax import pipeline, rundir
from gradalign_jax.analysis import markdown, plots, report, token_view

GROUPS = ("contexts", "targeted", "scoring")
flags_lib.use(GROUPS)
DEFAULT_OUT = "runs/sweep"


def settings(**overrides) -> dict:
  """This experiment's settings: the flags (or their defaults), replaced by ``overrides``."""
  return flags_lib.settings(GROUPS, **overrides)


def run(settings: dict, out: str, *, overwrite: bool = False,
        stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) the sweep into ``out`` and writes the tables and the report.

  settings: from ``settings()``. stop_after: stop after this many question groups of this
  call (tests simulate an interruption with it). Returns the summary dict, or None when
  stopped early.
  """
  return flags_lib.run_groups(settings, out, pipeline.diagnose_group, finish, overwrite=overwrite,
                              stop_after=stop_after)


def finish(settings: dict, run_dir: rundir.RunDir, num_questions: int, seconds: float) -> dict:
  """Writes the tables, summary.json, report.md, the plots and the token view."""
  tables = pipeline.Tables(directions=settings["directions"], **run_dir.merge(
      [rundir.tag(s) for s in settings["students"]], num_questions, pipeline.TABLES))
  for name in pipeline.TABLES:
    files.save_table(getattr(tables, name), run_dir.file(f"{name}.parquet"))
  flat = [c for c in tables.rollouts.columns if not c.startswith("path_")
          and c not in ("tokens", "token_text", "node_ids")]
  files.save_table(tables.rollouts[flat], run_dir.file("rollouts.csv"))
  files.save_table(tables.questions, run_dir.file("questions.csv"))
  summary = tables.summary(dict(settings, num_questions_loaded=num_questions, seconds=seconds))
  files.write_text(run_dir.file("summary.json"), report.to_json(summary))
  primary = tables.directions[0]
  figures = {"correct_vs_incorrect.png": plots.plot_correct_vs_incorrect(summary),
             "by_depth.png": plots.plot_alignment_by_depth(tables.nodes, primary),
             "directions.png": plots.plot_directions(summary),
             "covariates.png": plots.plot_covariates(tables.nodes, primary)}
  for name, fig in figures.items():
    files.save_figure(fig, run_dir.file(name))
  files.write_text(run_dir.file("report.md"),
                   markdown.render(summary, list(figures), explorer="tokens.html"))
  files.write_text(run_dir.file("tokens.html"), token_view.render(
      tables.nodes, tables.rollouts, tables.questions, summary, primary))
  logging.info("wrote %s (report.md, summary.json, tables, plots, tokens.html)", run_dir.path)
  return summary


if __name__ == "__main__":
  flags_lib.run_script(GROUPS, run, DEFAULT_OUT)
