"""Is the headline test calibrated? The real pipeline on the toy models under a reward that
ignores the tokens (true g* = 0 everywhere), and under a planted effect of known sign and size.

For each of ``--seeds`` seeds: fresh rollouts (sampler seed ``--seed`` + s) scored with a
reward that is a fresh Bernoulli(``--success_rate``) draw per rollout
(``analysis.calibration.NullRewardTask``), the whole diagnostic (targeted rollouts, leave-one-out
scores), then the report's headline test for every (student, spec): the within-question
difference of the first ``--directions`` entry with its permutation test. The same tables with
``--planted_delta`` added to the incorrect rollouts' scores measure power. Results go to
``--out``:

  seeds.parquet, .csv  one row per (seed, student, spec): the null and planted tests
  summary.json         per student and spec: false_positive_rate (Clopper–Pearson interval),
                       power (the planted effect found with the right sign), the pooled
                       Mann–Whitney's false-positive rate for contrast; the first pair's
                       numbers also at the top level
  report.md            the table, and the null p-values' histogram (p_values.png)
  parts/               one part per seed, written atomically: a rerun resumes

  python -m experiments.null_calibration --out=runs/null_calibration
"""

from __future__ import annotations

import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import files
from experiments import flags as flags_lib
from gradalign_jax import distributed, pipeline, rundir
from gradalign_jax.analysis import calibration, markdown, report

GROUPS = ("targeted", "scoring", "calibration")
flags_lib.use(GROUPS)
DEFAULT_OUT = "runs/null_calibration"
# A quick single-student, single-spec run; the flags change it.
DEFAULTS = dict(students=["student_small"], teachers=["teacher"], num_questions=12,
                num_rollouts=12, max_new_tokens=40, budget=8, question_batch=12,
                directions=["reverse_kl"])


def settings(**overrides) -> dict:
  """This experiment's settings: the flags (or their defaults), replaced by ``overrides``."""
  return flags_lib.settings(GROUPS, **overrides)


def seed_rows(settings: dict, seed: int, specs, task, examples, config, models) -> list[dict]:
  """The null and planted headline tests of one seed, one row per (student, spec)."""
  import dataclasses

  config = dataclasses.replace(config, seed=settings["seed"] + seed)
  direction = config.scoring.directions[0]
  rows = []
  for student in settings["students"]:
    null_task = calibration.NullRewardTask(task, salt=seed, rate=settings["success_rate"])
    tables = pipeline.diagnose(student, specs, examples, null_task, config, models=models)
    for spec in (s.text for s in specs):
      r = tables.rollouts[tables.rollouts["spec"] == spec]
      q = tables.questions[tables.questions["spec"] == spec]
      null = {qid: np.asarray(v) for qid, v in zip(q["question_id"], q[f"null_delta_{direction}"])
              if len(v)}
      row = dict(seed=seed, student=student, spec=spec, n_correct=int(r["correct"].sum()),
                 n_rollouts=len(r), planted_delta=settings["planted_delta"])
      for name, table in (("null", r), ("planted", calibration.plant_effect(
          r, direction, settings["planted_delta"]))):
        test = calibration.headline_test(table, null, direction, seed=seed)
        row.update({f"{name}_{k}": v for k, v in test.items()})
      rows.append(row)
  return rows


def run(settings: dict, out: str, *, overwrite: bool = False,
        stop_after: int | None = None) -> dict | None:
  """Runs (or resumes) every seed into ``out`` and writes the summary and the report. In a
  job of several processes each runs its share of the seeds and process 0 reports (the
  others return None)."""
  config, specs, task, examples = flags_lib.prepare(settings)
  run_dir = rundir.RunDir(out, settings, inputs=flags_lib.inputs(settings, specs),
                          overwrite=overwrite, stop_after=stop_after,
                          processes=distributed.processes())
  models = flags_lib.model_cache(settings["dtype"])
  with run_dir.open():
    todo = run_dir.todo("seeds", [[s] for s in range(settings["seeds"])], label="seeds")
    try:
      for (seed,) in run_dir.progress(run_dir.deal(todo), label="null calibration",
                                      unit="seeds"):
        run_dir.write_parts("seeds", {seed: {"seeds": seed_rows(settings, seed, specs, task,
                                                                 examples, config, models)}})
    except rundir.Interrupt:
      return None
    if not run_dir.gather():
      return None  # not process 0: its share is written
    return finish(settings, run_dir)


def _p_value_figure(seeds) -> Figure:
  fig = Figure(figsize=(5.5, 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.hist(seeds["null_p_permutation"].dropna(), bins=np.linspace(0, 1, 21), color="#4c72b0",
          edgecolor="white")
  ax.axhline(len(seeds) / 20, color="black", lw=0.8, ls="--", label="uniform (calibrated)")
  ax.set_xlabel("within-question permutation p under the null reward")
  ax.set_ylabel("seeds × (student, spec)")
  ax.legend(fontsize=8)
  return fig


def finish(settings: dict, run_dir: rundir.RunDir) -> dict:
  seeds = run_dir.merge(["seeds"], settings["seeds"], ["seeds"])["seeds"]
  files.save_table(seeds, run_dir.file("seeds.parquet"))
  files.save_table(seeds, run_dir.file("seeds.csv"))
  pairs = {}
  for (student, spec), group in seeds.groupby(["student", "spec"], sort=False):
    pairs.setdefault(student, {})[spec] = calibration.summarize(group, settings["alpha"])
  first = next(iter(next(iter(pairs.values())).values()))
  summary = dict(first, config=settings, students=pairs)
  files.write_text(run_dir.file("summary.json"), report.to_json(summary))
  files.save_figure(_p_value_figure(seeds), run_dir.file("p_values.png"))
  files.write_text(run_dir.file("report.md"), _render(summary))
  logging.info("false-positive rate %.3f [%.3f, %.3f] over %d seeds; power %.2f at Δ = %g",
               first["false_positive_rate"], first["false_positive_ci_low"],
               first["false_positive_ci_high"], first["num_seeds"], first["power"],
               first["planted_delta"])
  return summary


def _render(summary: dict) -> str:
  a = summary["alpha"]
  rows = []
  for student, specs in summary["students"].items():
    for spec, s in specs.items():
      rows.append([student, spec, str(s["num_seeds"]), f"{s['questions_per_seed']:.1f}",
                   f"{s['false_positive_rate']:.3f} [{s['false_positive_ci_low']:.3f}, "
                   f"{s['false_positive_ci_high']:.3f}]",
                   f"{s['power']:.2f} [{s['power_ci_low']:.2f}, {s['power_ci_high']:.2f}]",
                   f"{s['min_detectable_median']:.3f}",
                   f"{s['pooled_false_positive_rate']:.3f}"])
  lines = ["# Null calibration of the headline test", "",
           f"Reward: a fresh Bernoulli({summary['config']['success_rate']}) draw per rollout, "
           "independent of its tokens (true g* = 0). Headline test: the within-question "
           f"difference (incorrect − correct) of {summary['config']['directions'][0]} with a "
           f"permutation test at α = {a}, on leave-one-out rollout scores. Power: the same "
           f"tables with Δ = {summary['planted_delta']} added to the incorrect rollouts' scores, "
           "found significant with the right sign. Intervals: Clopper–Pearson 95%.", ""]
  lines += markdown._table(["student", "spec", "seeds", "questions with both kinds (mean)",
                            "false-positive rate", "power", "detectable abs Δ (median)",
                            "pooled Mann–Whitney false-positive rate (secondary)"], rows)
  lines += ["![null p-values](p_values.png)", "", "## Settings", ""]
  lines += [f"- {k}: {markdown._config_value(v)}" for k, v in summary["config"].items()]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  flags_lib.run_script(GROUPS, run, DEFAULT_OUT, DEFAULTS)
