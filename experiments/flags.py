"""The experiments' flags, in groups, and the configs they build.

Each flag is defined once, here (absl flags are process-global, so two scripts defining the
same flag could not be imported together). An experiment names the groups it reads
(``use``): they are listed by its ``--help``, a flag of another group given on its command
line is refused, and ``settings`` collects their values as one flat dict (what ``config.json``
records and a resumed run must match). The ``*_config`` functions turn settings into the
library's frozen configs; building them is the validation, so a bad value is refused before
any model is loaded.

The "distributed" group (``DISTRIBUTED``: --coordinator, --num_processes, --process_id) says
how the processes of one job find each other; every experiment run through ``run_script``
accepts it, and it is not a setting (results do not depend on the number of processes).
"""

from __future__ import annotations

import logging as std_logging
import os
import time

import jax
from absl import app, flags, logging

from experiments import cli
from gradalign_jax import (alignment, compilation, contexts, distill, distributed, gradients,
                           pipeline, rundir, sampling, targeted, tasks, training)
from gradalign_jax.models import checkpoint
from gradalign_jax.models.loaded import ModelCache, resolve_model
from gradalign_jax.tasks.base import fingerprint_source

DEFAULT_TEACHERS = ("teacher", "teacher:correct_demo", "self:correct_demo",
                    "self:correct_and_wrong_demo", "self:summary")

flags.DEFINE_list("students", ["student_small", "student_large"],
                  "student models: bundled toy names, checkpoint directories or hub ids")
flags.DEFINE_list("teachers", list(DEFAULT_TEACHERS),
                  "teacher specs, one per column of results (gradalign_jax/contexts.py): "
                  "self[:context] or <model>[:context]; contexts: correct_demo, "
                  "correct_demo=rollout, correct_and_wrong_demo, summary, summary_by=<model>")
flags.DEFINE_string("task", "synthetic", "task name: synthetic, boolq, mmlu, aime, gsm8k, math")
flags.DEFINE_string("data", "synthetic:seed=1,n=256",
                    "data source: a jsonl/json/parquet file or directory, hf:<name>[:<config>]"
                    ":<split>, or synthetic[:seed=S,n=N]")
flags.DEFINE_integer("num_questions", 16, "questions to use (the first ones of --data)")
flags.DEFINE_integer("num_rollouts", 16, "G: rollouts (samples) per question")
flags.DEFINE_float("temperature", 1.0, "sampling temperature T (π = softmax(z/T))")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling (1 = off)")
flags.DEFINE_integer("top_k", 0, "top-k sampling (0 = off)")
flags.DEFINE_integer("max_new_tokens", 48, "rollout horizon in generated tokens")
flags.DEFINE_enum("thinking", "task", ["task", "on", "off"],
                  "Qwen3 thinking mode of the prompts (task: the task's default)")
flags.DEFINE_integer("budget", 32, "targeted rollouts per question (the default priority: one "
                     "tree for every spec; a teacher priority: this many for each spec's own "
                     "copy of the tree)")
flags.DEFINE_integer("num_continuations", 4, "M: continuations per targeted (node, token) pair")
flags.DEFINE_enum("priority", targeted.IDEAL_ERROR, list(targeted.PRIORITIES),
                  "how targeted rollouts rank (node, token) pairs: ideal_error (the expected "
                  "reduction of the error of ĝ*, student only, one tree for every spec) or "
                  "|d_k| / |p_k − q_k| on each spec's teacher (each spec its own tree)")
flags.DEFINE_integer("rounds", 2, "targeted: rounds, each re-scoring the refreshed tree")
flags.DEFINE_list("directions", list(gradients.DIRECTIONS),
                  "distillation directions in the tables and report; the first is the headline")
flags.DEFINE_integer("demo_samples", 16, "extra student rollouts per question that "
                     "demonstrations are drawn from (never the scored ones); equal to "
                     "--num_rollouts, they reuse its compiled sampler")
flags.DEFINE_integer("summary_tokens", 32, "most tokens of a generated summary")
flags.DEFINE_integer("question_batch", 8, "questions sampled together (fixed groups of the "
                     "dataset order, so results do not depend on where a run was resumed)")
flags.DEFINE_float("teacher_temperature", 1.0, "T_τ: the teacher's q = softmax(z_τ / T_τ) "
                   "(1 = the teacher model as it is; --temperature is the student's only)")
flags.DEFINE_float("jsd_beta", 0.5, "β of the JSD direction (and of the jsd priority)")
flags.DEFINE_integer("topk", 20, "k of the top-k reverse-KL directions")
flags.DEFINE_integer("chunk_nodes", 256, "nodes per scoring chunk (memory: chunk × vocab)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "weight dtype")
flags.DEFINE_integer("seed", 0, "seed of every random draw")
flags.DEFINE_integer("seeds", 200, "calibration: independent repetitions (a fresh null reward "
                     "and fresh rollouts each)")
flags.DEFINE_float("success_rate", 0.5, "calibration: P(reward = 1) of the reward that ignores "
                   "the tokens")
flags.DEFINE_float("planted_delta", 0.3, "calibration: the difference (incorrect − correct) "
                   "added to the incorrect rollouts' scores to measure power")
flags.DEFINE_float("alpha", 0.05, "calibration: the test's level")
flags.DEFINE_integer("permutations", 500, "random relabellings of each question's rewards, "
                     "scores recomputed, behind the within-question permutation test (0: none)")
flags.DEFINE_list("arms", list(distill.ARMS),
                  "training: arms of gated_distillation (gradalign_jax/distill.py ARMS and "
                  "ARM_DOCS); the proxy, random_fraction and covered_random arms need "
                  "alignment_gated, whose kept fraction they copy; covered_random draws that "
                  "many uniformly among the covered tokens (those with an alignment estimate)")
flags.DEFINE_integer("train_seeds", 5, "training: independent runs per arm (seed s: the order "
                     "of the training questions and every sampler draw; arms of a seed share them)")
flags.DEFINE_integer("steps", 30, "training: optimizer steps per run (each: --question_batch "
                     "questions × --num_rollouts on-policy rollouts)")
flags.DEFINE_float("learning_rate", 3e-4, "training: optax adam's learning rate")
flags.DEFINE_integer("refresh_every", 1, "training: the alignment estimate is refreshed (the "
                     "diagnostic with its targeted rollouts on the current student) every this "
                     "many steps; the training questions change at the same pace, so a stale "
                     "estimate is looked up in the same question's last tree")
flags.DEFINE_enum("uncovered_tokens", "drop", ["drop", "keep"],
                  "training: alignment_gated's rule for a token whose prefix node was not scored "
                  "or is not informative (no estimate): drop (not kept) or keep")
flags.DEFINE_integer("eval_every", 5, "training: steps between held-out evaluations")
flags.DEFINE_string("eval_data", "synthetic:seed=2,n=128", "training: the fixed held-out "
                    "questions (same forms as --data; questions also in --data are refused)")
flags.DEFINE_integer("eval_samples", 4, "training: samples per held-out question at T = 1")
flags.DEFINE_string("out", None, "output directory (reruns resume from its parts/)")
flags.DEFINE_bool("overwrite", False, "start over instead of resuming: delete the run in --out "
                  "once every other flag is checked (a directory that is not a run is refused)")
flags.DEFINE_string("coordinator", None, "distributed: host:port of process 0's coordination "
                    "service, the same on every process (default: $GRADALIGN_JAX_COORDINATOR, "
                    "else detected on TPU pods and SLURM, else one process)")
flags.DEFINE_integer("num_processes", None, "distributed: processes in the job (default: "
                     "$GRADALIGN_JAX_NUM_PROCESSES, else detected, else 1)", lower_bound=1)
flags.DEFINE_integer("process_id", None, "distributed: this process's index, 0 … "
                     "num_processes − 1; process 0 checks --out, merges and writes the report "
                     "(default: $GRADALIGN_JAX_PROCESS_ID, else detected, else 0)", lower_bound=0)
flags.DEFINE_integer("model_parallel", 1, "devices: split each model over this many of a "
                     "process's devices (tensor parallel, distributed.py's 'model' axis, e.g. 8 "
                     "for a Qwen3-8B teacher on a TPU v5e-8 worker); the process's other devices "
                     "split the sampler's rows ('data'). A process with one device ignores it",
                     lower_bound=1)
FLAGS = flags.FLAGS
# From here on, key flags this module declares (``use``) belong to the experiment calling it.
flags.disclaim_key_flags()

GROUPS = {
    "models": ("students", "teachers", "dtype"),
    "data": ("task", "data", "num_questions", "question_batch", "seed"),
    "sampling": ("num_rollouts", "temperature", "top_p", "top_k", "max_new_tokens"),
    "contexts": ("thinking", "demo_samples", "summary_tokens"),
    "targeted": ("budget", "num_continuations", "priority", "rounds"),
    "scoring": ("directions", "teacher_temperature", "jsd_beta", "topk", "chunk_nodes",
                "permutations"),
    "calibration": ("seeds", "success_rate", "planted_delta", "alpha"),
    "training": ("arms", "train_seeds", "steps", "learning_rate", "refresh_every",
                 "uncovered_tokens", "eval_every", "eval_data", "eval_samples"),
}
ALWAYS = ("models", "data", "sampling")  # every experiment reads these
# The order settings are recorded in (config.json, the report's settings table).
ORDER = ("students", "teachers", "task", "data", "num_questions", "num_rollouts", "temperature",
         "top_p", "top_k", "max_new_tokens", "thinking", "budget", "num_continuations", "priority",
         "rounds", "directions", "teacher_temperature", "demo_samples", "summary_tokens",
         "question_batch", "jsd_beta", "topk", "chunk_nodes", "permutations", "dtype", "seed",
         "seeds", "success_rate", "planted_delta", "alpha", "arms", "train_seeds", "steps",
         "learning_rate", "refresh_every", "uncovered_tokens", "eval_every", "eval_data",
         "eval_samples")
OUTPUT = ("out", "overwrite")
# Where the work runs, not what it computes: not settings (config.json does not record them).
DISTRIBUTED = ("coordinator", "num_processes", "process_id", "model_parallel")


def _names(groups) -> list[str]:
  unknown = set(groups) - set(GROUPS)
  if unknown:
    raise ValueError(f"unknown flag groups {sorted(unknown)}; choose from {list(GROUPS)}")
  chosen = {n for g in set(ALWAYS) | set(groups) for n in GROUPS[g]}
  return [n for n in ORDER if n in chosen]


def use(groups) -> None:
  """Declares the flags of ``groups`` (and the ones every experiment reads) as the script's
  key flags: its ``--help`` lists them. Call at import."""
  for name in _names(groups) + list(OUTPUT) + list(DISTRIBUTED):
    flags.declare_key_flag(name)


def refuse_others(groups) -> None:
  """Raises ValueError naming any flag given on the command line that ``groups`` do not read."""
  mine = set(_names(groups)) | set(OUTPUT)
  ours = {n for names in GROUPS.values() for n in names}
  foreign = sorted(n for n in ours - mine if FLAGS[n].present)
  if foreign:
    raise ValueError(f"flags this experiment does not use: --{', --'.join(foreign)}; drop "
                     "them (--help lists its flags)")


def settings(groups, **overrides) -> dict:
  """The flat settings of ``groups``: parsed flag values (their defaults before parsing),
  replaced by ``overrides`` (tests and notebooks); lists become tuples. Validated by building
  every config they feed."""
  names = _names(groups)
  unknown = sorted(set(overrides) - set(names))
  if unknown:
    raise ValueError(f"unknown settings {unknown}; this experiment reads {names}")
  out = {}
  for n in names:
    value = overrides[n] if n in overrides else (FLAGS[n].value if FLAGS.is_parsed()
                                                 else FLAGS[n].default)
    out[n] = tuple(value) if isinstance(value, (list, tuple)) else value
  if not out["students"]:
    raise ValueError("no student given: pass --students")
  if out["num_questions"] < 1:
    raise ValueError(f"num_questions={out['num_questions']} must be ≥ 1")
  if "budget" in out and out["num_rollouts"] < 2:
    raise ValueError(f"num_rollouts={out['num_rollouts']} must be ≥ 2: a tree needs a branch")
  if "seeds" in out and not (out["seeds"] >= 1 and 0 < out["success_rate"] < 1
                            and 0 < out["alpha"] < 1):
    raise ValueError("need seeds ≥ 1, success_rate and alpha in (0, 1) (got "
                     f"{out['seeds']}, {out['success_rate']}, {out['alpha']})")
  if "arms" in out:
    training_config(out)
  contexts.parse_specs(out["teachers"])
  diagnose_config(out)
  return out


def prepare(s: dict):
  """(DiagnoseConfig, teacher specs, task, examples) of the settings: everything checked and
  the data loaded before any model is."""
  config = diagnose_config(s)
  specs = contexts.parse_specs(s["teachers"])
  task = tasks.get_task(s["task"])
  examples = task.load(s["data"], limit=s["num_questions"])
  if not examples:
    raise ValueError(f"--data={s['data']!r} gave no questions")
  return config, specs, task, examples


def inputs(s: dict, specs) -> dict:
  """Fingerprints of what the settings name but do not contain: the data source and every
  checkpoint (students, teachers, summarisers), as ``config.json`` records them."""
  refs = {(m, student) for student in s["students"]
          for m in [student] + [x for spec in specs for x in (spec.model, spec.summarizer) if x]}
  out = {f"--data={s['data']}": fingerprint_source(s["data"])}
  for path in sorted({resolve_model(m, student) for m, student in refs}):
    out[f"checkpoint {path}"] = checkpoint.fingerprint(path)
  return out


def model_cache(dtype: str) -> ModelCache:
  """The run's models, laid out over this process's devices when it has more than one
  (``distributed.make_mesh(model=--model_parallel)``, the rest of its devices on "data");
  one device: the unsharded path, exactly as before."""
  if len(jax.local_devices()) == 1:
    return ModelCache(dtype)
  mesh = distributed.make_mesh(model=FLAGS.model_parallel)
  logging.info("models laid out over %d devices: data=%d × model=%d", mesh.size,
               mesh.shape[distributed.DATA], mesh.shape[distributed.MODEL])
  return ModelCache(dtype, mesh=mesh)


def run_groups(s: dict, out: str, step: pipeline.Step, finish, *, overwrite: bool = False,
               stop_after: int | None = None):
  """Runs (or resumes) ``step`` (``pipeline.resume``) over every student and question group
  into the run directory ``out``, then ``finish(s, run_dir, questions loaded, seconds)``
  writes the outputs, under the directory's lock. Nothing is written (nor, with
  ``overwrite``, deleted) before the settings, ``out``, the data and every checkpoint have
  been checked. Returns finish's result, or None when stopped after ``stop_after`` groups.
  In a job of several processes (``distributed.initialize``) each does its share of the
  groups and only process 0 calls ``finish``, once all are done; the others return None."""
  config, specs, task, examples = prepare(s)
  run_dir = rundir.RunDir(out, s, inputs=inputs(s, specs), overwrite=overwrite,
                          stop_after=stop_after, processes=distributed.processes())
  models = model_cache(s["dtype"])
  setups = [pipeline.setup(name, specs, task, examples, config, models)
            for name in s["students"]]
  with run_dir.open():
    start = time.time()
    try:
      if not pipeline.resume(run_dir, setups, task, examples, config, step):
        return None  # not process 0: its share is written
    except rundir.Interrupt:
      return None
    return finish(s, run_dir, len(examples), time.time() - start)


def main_function(groups, run):
  """The absl main of an experiment: ``run(settings, out, overwrite=...)`` with the flags of
  ``groups``; a bad setting, file or directory ends it with a short message naming it
  (``cli.fail``, exit status 1). It first starts the job's processes from the distributed
  flags (``distributed.initialize``); a process that fails tells the others, which stop
  too instead of waiting for it."""

  def main(argv):
    # JAX logs each platform it probes and does not find (e.g. TPU) at INFO, which absl shows.
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
    if len(argv) > 1:
      cli.fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    try:
      procs = distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    except (ValueError, RuntimeError) as e:  # JAX's start-up errors are RuntimeErrors
      cli.fail(f"starting the job's processes: {e}")
    compilation.enable()  # a rerun or a resumed run skips compiles
    try:
      refuse_others(groups)
      run(settings(groups), FLAGS.out, overwrite=FLAGS.overwrite)
    except ValueError as e:  # SpecError, CheckpointError, TaskDataError, RunDirError, ...
      procs.report_failure(str(e))
      cli.fail(str(e) if procs.count == 1 else f"process {procs.index}: {e}")
    except distributed.ProcessFailed as e:
      cli.fail(str(e))
    except BaseException as e:
      procs.report_failure(f"{type(e).__name__}: {e}")
      raise
    if procs.lead:
      print(f"report: {os.path.join(FLAGS.out, 'report.md')}")
    else:
      print(f"process {procs.index} of {procs.count}: its share is written; process 0 "
            f"writes {os.path.join(FLAGS.out, 'report.md')}")

  return main


def run_script(groups, run, default_out: str, defaults: dict | None = None) -> None:
  """Runs an experiment as a script (``main_function``); ``defaults``: this script's own
  defaults for some of its flags."""
  # Only as the script: other experiments imported in the same process keep theirs.
  for name, value in dict(defaults or {}, out=default_out).items():
    FLAGS.set_default(name, value)
  app.run(main_function(groups, run))


def sampling_config(s: dict) -> sampling.SamplingConfig:
  """The student's policy (each model's EOS ids are filled in by the pipeline)."""
  return sampling.SamplingConfig(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                                 top_p=s["top_p"], top_k=s["top_k"])


def targeted_config(s: dict) -> targeted.TargetedConfig:
  return targeted.TargetedConfig(budget=s["budget"], num_continuations=s["num_continuations"],
                                 priority=s["priority"], rounds=s["rounds"],
                                 jsd_beta=s["jsd_beta"])


def scoring_config(s: dict) -> alignment.ScoringConfig:
  return alignment.ScoringConfig(directions=s["directions"], chunk_nodes=s["chunk_nodes"],
                                 jsd_beta=s["jsd_beta"], topk=s["topk"],
                                 permutations=s["permutations"],
                                 teacher_temperature=s["teacher_temperature"])


def context_config(s: dict) -> contexts.ContextConfig:
  return contexts.ContextConfig(thinking=s.get("thinking", "task"),
                                demo_samples=s.get("demo_samples", 16),
                                summary_tokens=s.get("summary_tokens", 32))


def training_config(s: dict) -> training.TrainConfig:
  """The gated-distillation training run's config (validated by building it)."""
  return training.TrainConfig(arms=s["arms"], seeds=s["train_seeds"], steps=s["steps"],
                             learning_rate=s["learning_rate"], refresh_every=s["refresh_every"],
                             uncovered_tokens=s["uncovered_tokens"], eval_every=s["eval_every"],
                             eval_samples=s["eval_samples"])


def diagnose_config(s: dict) -> pipeline.DiagnoseConfig:
  """The pipeline's config; groups the settings lack keep the library's defaults."""
  parts = {}
  if "budget" in s:
    parts["targeted"] = targeted_config(s)
  if "directions" in s:
    parts["scoring"] = scoring_config(s)
  return pipeline.DiagnoseConfig(num_rollouts=s["num_rollouts"],
                                 question_batch=s["question_batch"], seed=s["seed"],
                                 sampling=sampling_config(s), contexts=context_config(s),
                                 **parts)
