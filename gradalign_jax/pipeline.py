"""The diagnostic for a group of questions, end to end, in memory.

    from gradalign_jax import pipeline, tasks
    task = tasks.get_task("synthetic")
    examples = task.load("synthetic:seed=1,n=256", limit=4)
    tables = pipeline.diagnose("student_small", ["teacher", "self:correct_demo"], examples, task)
    tables.rollouts          # pandas DataFrames: .nodes, .rollouts, .questions
    tables.summary()         # what summary.json holds

``diagnose`` = for each group of ``question_batch`` questions: ``sample_group`` (G rollouts
per question, the prompt prefilled once, verified into a prefix tree), ``sample_demo_pools``
(extra rollouts that rollout demonstrations come from), ``teacher_prompts`` (each spec's
model reading its context before the question), ``spend_targeted_budget`` (branches from
cached prefixes where the estimate matters most) and ``score_specs`` (the final pass of every
spec on the refreshed tree, as table rows). Each step is a function a researcher can call
alone. The experiments add only flags, run directories and files; results depend only on
the settings, the question's dataset index and the seed, never on the group a question ran in
or on where a run was resumed.

Column schemas: ``analysis/tables.py``. Shape letters: gradalign_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from gradalign_jax import alignment, contexts, rundir, sampling, scoring, targeted, tasks
from gradalign_jax.analysis import report, tables
from gradalign_jax.models.loaded import LoadedModel, ModelCache
from gradalign_jax.shapes import bucket
from gradalign_jax.tasks.base import Example, Task

_log = logging.getLogger(__name__)

# Demo rollouts fold the question's dataset index + this into their keys: streams apart from
# the scored rollouts, which use the plain index.
DEMO_STREAM = 1 << 20
TABLES = ("nodes", "rollouts", "questions")


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
  """Everything that decides the diagnostic's numbers, one frozen config per concern.

  num_rollouts: G, on-policy rollouts (samples) per question; ``diagnose`` needs ≥ 2 (a tree
    needs a branch).
  question_batch: questions sampled together; fixed groups of the data order.
  seed: every random draw (rollouts, demos, targeted branches).
  sampling: the student's policy and horizon (its ``eos_ids``/``pad_id`` are replaced by each
    model's own).
  targeted: the targeted-rollout budget per question, split over the teacher specs; each
    spec ranks (node, token) pairs by ``priority`` on its own teacher, all refine one tree.
  scoring: the directions reported and the final pass's chunking.
  contexts: thinking mode, demo samples, summary length.
  """
  num_rollouts: int = 16
  question_batch: int = 8
  seed: int = 0
  sampling: sampling.SamplingConfig = sampling.SamplingConfig(max_new_tokens=48)
  targeted: targeted.TargetedConfig = targeted.TargetedConfig(budget=32)
  scoring: alignment.ScoringConfig = alignment.ScoringConfig()
  contexts: contexts.ContextConfig = contexts.ContextConfig()

  def __post_init__(self):
    if self.num_rollouts < 1 or self.question_batch < 1:
      raise ValueError(f"need num_rollouts ≥ 1 and question_batch ≥ 1 (got "
                       f"{self.num_rollouts}, {self.question_batch})")


@dataclasses.dataclass
class Setup:
  """One student with its teacher specs: ``name`` (the student as given), ``student``, and
  ``teachers[spec.text]``, the model that reads that spec's context (the student for
  ``self``); ``models`` loads any other model a step needs (summarisers)."""
  name: str
  student: LoadedModel
  specs: list[contexts.TeacherSpec]
  teachers: dict[str, LoadedModel]
  models: ModelCache


def check_prompt_lengths(model: LoadedModel, prompts: dict[str, list[int]], extra: int,
                         what: str) -> None:
  """Refuses, before any work, a prompt that cannot fit the model's positions."""
  cap = model.cfg.max_position_embeddings
  for qid, ids in prompts.items():
    if len(ids) + extra > cap:
      raise ValueError(
          f"{what} prompt of question {qid!r} has {len(ids)} tokens; with {extra} generated "
          f"tokens it needs {len(ids) + extra} positions but {model.ref} has {cap} "
          "(max_position_embeddings): lower --max_new_tokens, or drop long questions from "
          "--data")


def check_sampled(ro: sampling.Rollouts, model: LoadedModel, exs: Sequence[Example],
                  stage: str) -> None:
  """Refuses rollouts drawn from non-finite logits (a sampled token whose log π is NaN):
  they would read as short wrong answers. Rows q·G … q·G + G − 1 are question exs[q]."""
  live = np.arange(ro.logprobs.shape[1])[None] < ro.lengths[:, None]
  bad = np.flatnonzero((live & ~np.isfinite(ro.logprobs)).any(axis=1))
  if len(bad):
    ex = exs[int(ro.question[bad[0]])]
    raise alignment.NonFiniteError(
        f"{model.ref}: non-finite logits while sampling {stage} of question {ex.id!r}; nothing "
        f"of its question group was written. The weights are corrupt or overflow in "
        f"{model.cfg.dtype}: check the checkpoint, or try --dtype=float32")


def student_prompt(model: LoadedModel, task: Task, example: Example,
                   config: DiagnoseConfig) -> list[int]:
  """The plain prompt ids of ``example`` for ``model`` (no context)."""
  think = config.contexts.enable_thinking(task)
  return model.encode(task.prompt(model.tok, example, enable_thinking=think))


def setup(student: str, teacher_specs: Sequence[str | contexts.TeacherSpec], task: Task,
          examples: Sequence[Example], config: DiagnoseConfig,
          models: ModelCache | None = None) -> Setup:
  """Loads the student, every spec's model and summariser, and checks them before any work:
  teacher and student share a vocabulary, and every prompt leaves room for the horizon."""
  models = models or ModelCache()
  specs = [s if isinstance(s, contexts.TeacherSpec) else contexts.parse_spec(s)
           for s in teacher_specs]
  model = models.get(student, student)
  teachers = {}
  for spec in specs:
    teachers[spec.text] = model if spec.is_self else models.get(spec.model, student)
    if spec.summarizer is not None:
      models.get(spec.summarizer, student)  # loaded now: a bad checkpoint fails before any work
    scoring.check_compatible(model.cfg, teachers[spec.text].cfg, model.tok,
                             teachers[spec.text].tok)
  check_prompt_lengths(model, {ex.id: student_prompt(model, task, ex, config)
                               for ex in examples}, config.sampling.max_new_tokens, "student")
  return Setup(student, model, specs, teachers, models)


def write_summaries(run: Setup, task: Task, examples: Sequence[Example],
                    cache: contexts.SummaryCache, config: DiagnoseConfig,
                    indices: Sequence[int] | None = None) -> dict[tuple[str, str], str]:
  """{(spec text, question id): summary} for the summary specs, generating (greedily, in
  groups of ``question_batch``) what ``cache`` lacks and saving it."""
  indices = list(range(len(examples))) if indices is None else list(indices)
  out = {}
  for spec in run.specs:
    if spec.summarizer is None:
      continue
    writer = run.models.get(spec.summarizer, run.name)
    missing = [i for i, ex in enumerate(examples)
               if cache.get(writer.ref, ex, task.reference_response(ex)) is None]
    if missing:
      _log.info("%s: writing %d summaries with %s", spec.text, len(missing), writer.ref)
      prompts = [writer.encode(contexts.summary_prompt(task, writer.tok, examples[i]))
                 for i in missing]
      scfg = writer.sampling_config(config.sampling, config.contexts.summary_tokens, greedy=True)
      for lo in range(0, len(missing), config.question_batch):
        idx = missing[lo:lo + config.question_batch]
        ro = sampling.sample(writer.cfg, writer.params, prompts[lo:lo + len(idx)], scfg,
                             num_samples=1, seed=config.seed,
                             question_ids=[indices[i] for i in idx], vocab_mask=writer.mask)
        check_sampled(ro, writer, [examples[i] for i in idx], "a summary")
        for j, i in enumerate(idx):
          text = writer.tok.decode(ro.sequence(j), skip_special_tokens=True).strip()
          cache.put(writer.ref, examples[i], task.reference_response(examples[i]), text)
      cache.save()
    for ex in examples:
      out[(spec.text, ex.id)] = cache.get(writer.ref, ex, task.reference_response(ex))
  return out


# ---------------------------------------------------------------------------------------
# The steps of one group


@dataclasses.dataclass
class Group:
  """A group of questions sampled together: ``indices`` (dataset indices, the sampler's
  question ids), ``examples``, the student's ``prompts``, each question's ``pools[j]`` (its
  tree and the sampler batches behind it) and ``reward_fns[j]`` (generated ids → 0/1);
  ``spec_pools[spec text]``: a spec's own copies of the pools (teacher priorities only)."""
  indices: list[int]
  examples: list[Example]
  prompts: list[list[int]]
  pools: list[targeted.RolloutPool]
  reward_fns: list[Callable]
  spec_pools: dict[str, list[targeted.RolloutPool]] = dataclasses.field(default_factory=dict)

  def pools_of(self, spec_text: str) -> list[targeted.RolloutPool]:
    """The pools a spec is scored on: its own copies, or the shared ones."""
    return self.spec_pools.get(spec_text, self.pools)


def sample_group(run: Setup, task: Task, examples: Sequence[Example], indices: Sequence[int],
                 config: DiagnoseConfig) -> Group:
  """G on-policy rollouts per question (each prompt prefilled once), verified into trees."""
  student, g = run.student, config.num_rollouts
  exs = [examples[i] for i in indices]
  prompts = [student_prompt(student, task, ex, config) for ex in exs]
  ro = sampling.sample(student.cfg, student.params, prompts,
                       student.sampling_config(config.sampling), num_samples=g,
                       seed=config.seed, question_ids=list(indices), vocab_mask=student.mask)
  check_sampled(ro, student, exs, "on-policy rollouts")
  reward_fns = [lambda ids, ex=ex: float(task.verify(student.decode(ids), ex)) for ex in exs]
  pools = []
  for j in range(len(exs)):
    pool = targeted.RolloutPool()
    rows = list(range(j * g, (j + 1) * g))
    pool.add(ro, [reward_fns[j](tuple(ro.sequence(r))) for r in rows], rows)
    pools.append(pool)
  return Group(list(indices), exs, prompts, pools, reward_fns)


def sample_demo_pools(student: LoadedModel, task: Task, exs: Sequence[Example],
                      prompts: Sequence[list[int]], indices: Sequence[int],
                      config: DiagnoseConfig) -> list[contexts.DemoPool]:
  """The DemoPool of each question: ``contexts.demo_samples`` extra student rollouts keyed by
  dataset index + DEMO_STREAM (never the scored rollouts), decoded and verified."""
  n = config.contexts.demo_samples
  dro = sampling.sample(student.cfg, student.params, list(prompts),
                        student.sampling_config(config.sampling), num_samples=n,
                        seed=config.seed, question_ids=[DEMO_STREAM + i for i in indices],
                        vocab_mask=student.mask)
  check_sampled(dro, student, exs, "demonstration rollouts")
  pools = []
  for j, ex in enumerate(exs):
    texts = [student.decode(dro.sequence(r)) for r in range(j * n, (j + 1) * n)]
    pools.append(contexts.DemoPool(tuple(texts), tuple(bool(task.verify(t, ex)) for t in texts)))
  return pools


def context_prompt(spec: contexts.TeacherSpec, model: LoadedModel, task: Task,
                   example: Example, config: DiagnoseConfig, demos=None,
                   summary: str | None = None) -> tuple[list[int] | None, str]:
  """(prompt ids, "ok") of ``model`` reading the spec's context before ``example``, or
  (None, why) when the question cannot carry that context. Refuses a prompt that leaves no
  room for the horizon."""
  think = config.contexts.enable_thinking(task)
  try:
    text = contexts.teacher_prompt(spec, task, model.tok, example, think, demos, summary)
  except contexts.ContextUnavailable as e:
    return None, str(e)
  ids = model.encode(text)
  check_prompt_lengths(model, {example.id: ids}, config.sampling.max_new_tokens,
                       f"teacher ({spec.text})")
  return ids, "ok"


@dataclasses.dataclass
class TeacherPrompts:
  """Per spec text, one entry per question of a group: ``models[spec][j]`` the teacher
  reading its context (None when unavailable) and ``status[spec][j]`` ("ok" or why not)."""
  models: dict[str, list[scoring.PromptedModel | None]]
  status: dict[str, list[str]]


def teacher_prompts(run: Setup, task: Task, group: Group, config: DiagnoseConfig,
                    summaries: dict, demo_pools: Sequence | None = None) -> TeacherPrompts:
  """Every spec's teacher for every question of the group (``demo_pools`` from
  ``sample_demo_pools`` when a spec needs rollout demonstrations)."""
  demo_pools = demo_pools or [None] * len(group.examples)
  out = TeacherPrompts({}, {})
  for spec in run.specs:
    model = run.teachers[spec.text]
    out.models[spec.text], out.status[spec.text] = [], []
    for j, ex in enumerate(group.examples):
      ids, why = context_prompt(spec, model, task, ex, config, demo_pools[j],
                                summaries.get((spec.text, ex.id)))
      out.models[spec.text].append(
          None if ids is None else scoring.PromptedModel(model.cfg, model.params, ids, model.tok))
      out.status[spec.text].append(why)
  return out


def scoring_shapes(config: DiagnoseConfig) -> scoring.Shapes:
  """Padding for every scoring pass of a run, fixed by the settings (so results never depend
  on which questions came first): prompts padded to ≥ 64 tokens, the stack of ancestor slots
  to the horizon (no scored node is deeper) and full chunks, so each model compiles one
  scoring program per prompt bucket and stack window (on small models compilation is most of
  the run time). Windows start at a quarter of the stack and at 256 slots: three programs at
  most, and one (the whole stack) under a horizon of 256 tokens or less."""
  capacity = bucket(config.sampling.max_new_tokens)
  return scoring.Shapes(min_prompt=64, min_capacity=capacity,
                        min_window=max(256, capacity // 4), full_chunks=True)


def _students(run: Setup, group: Group) -> list[scoring.PromptedModel]:
  s = run.student
  return [scoring.PromptedModel(s.cfg, s.params, p, s.tok) for p in group.prompts]


def spend_targeted_budget(run: Setup, group: Group, teachers: TeacherPrompts,
                          config: DiagnoseConfig) -> None:
  """Targeted rollouts into the group's trees. The default (student-only) priority spends the
  whole budget per question once, on the shared trees, whatever the specs: a spec's tables
  are the same alone or in a sweep. A teacher priority gives each spec its own copy of every
  tree (``Group.spec_pools``) and the whole budget on it, ranked on that spec's teacher."""
  tc, student = config.targeted, run.student
  students = _students(run, group)
  common = dict(vocab_mask=student.mask, policy=student.sampling_config(config.sampling),
                chunk_nodes=config.scoring.chunk_nodes, shapes=scoring_shapes(config),
                teacher_temperature=config.scoring.teacher_temperature)
  if tc.budget == 0:
    return
  if not tc.per_spec:
    targeted.targeted_rollouts(group.pools, students, None, tc, group.reward_fns,
                               seed=config.seed * 7919, **common)
    return
  for spec in run.specs:
    pools = [p.copy() for p in group.pools]
    group.spec_pools[spec.text] = pools
    live = [j for j, t in enumerate(teachers.models[spec.text]) if t is not None]
    if not live:
      continue
    # The same seed for every spec: a spec's own tree does not depend on its place in the list.
    targeted.targeted_rollouts(
        [pools[j] for j in live], [students[j] for j in live],
        [teachers.models[spec.text][j] for j in live], tc,
        [group.reward_fns[j] for j in live], seed=config.seed * 7919, **common)


def relabelled_deltas(terms: alignment.TreeTerms, paths, rewards, directions, permutations: int,
                      seed: int) -> dict[str, list[float]]:
  """Δ_q (incorrect − correct mean leave-one-out score) of one question under ``permutations``
  random relabellings of its G on-policy rewards, scores recomputed for each: the null the
  report's permutation test compares Δ_q with. {direction: [Δ_q per relabelling]} (NaN where a
  relabelling leaves no scored rollout of one kind)."""
  if not permutations:
    return {d: [] for d in directions}
  rewards = np.asarray(rewards, np.float64)
  rng = np.random.default_rng(seed)
  labels = np.stack([rng.permutation(rewards) for _ in range(permutations)])
  means = terms.relabelled_means(paths, rewards, labels, directions)
  correct = labels > 0.5
  out = {}
  for d, m in means.items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # no scored rollout of a kind: NaN
      inc = np.nanmean(np.where(~correct, m, np.nan), axis=1)
      cor = np.nanmean(np.where(correct, m, np.nan), axis=1)
    out[d] = (inc - cor).tolist()
  return out


def score_specs(run: Setup, group: Group, teachers: TeacherPrompts,
                config: DiagnoseConfig) -> dict[int, dict[str, list[dict]]]:
  """The final pass of every spec on each question's tree, as table rows:
  {dataset index: {"nodes", "rollouts", "questions": [row, …]}}."""
  g, sc, directions = config.num_rollouts, config.scoring, config.scoring.directions
  students = _students(run, group)
  shapes = scoring_shapes(config)
  results = {}
  policy = config.sampling.policy_only()
  for j, (i, ex) in enumerate(zip(group.indices, group.examples)):
    rows = {t: [] for t in TABLES}
    flat: dict[int, tuple] = {}  # one tree's arrays and paths, whichever specs share it
    for spec in run.specs:
      tree = group.pools_of(spec.text)[j].tree
      if id(tree) not in flat:
        arrays = tree.arrays()
        flat[id(tree)] = arrays, alignment.rollout_paths(tree, arrays)
      arrays, paths = flat[id(tree)]
      rewards = [reward for _, reward, _ in tree.rollouts]
      n_correct = int(sum(rewards[r] > 0.5 for r in range(g)))
      key = dict(student=run.name, spec=spec.text, question_id=ex.id)
      teacher = teachers.models[spec.text][j]
      cols = terms = None
      if teacher is not None:
        try:
          terms, _ = alignment.tree_terms(tree, students[j], teacher, sc.chunk_nodes,
                                          run.student.mask, sc.jsd_beta, sc.topk,
                                          policy, shapes, sc.teacher_temperature, arrays, paths)
        except alignment.NonFiniteError as e:
          raise alignment.NonFiniteError(
              f"student {run.student.ref}, teacher {run.teachers[spec.text].ref} ({spec.text}), "
              f"question {ex.id!r}, final pass: {e}; nothing of its question group was "
              "written. The weights are corrupt or overflow in "
              f"{run.student.cfg.dtype}: check the checkpoints, or try --dtype=float32") from None
        cols = terms.node_columns()
      question = tables.question_row(
          key, cols, directions, question_index=i, n_rollouts=g, n_correct=n_correct,
          accuracy=n_correct / g, context=teachers.status[spec.text][j],
          prompt_tokens=0 if teacher is None else len(teacher.prompt),
          context_tokens=0 if teacher is None else len(teacher.prompt) - len(group.prompts[j]),
          targeted=len(tree.rollouts) - g)
      rows["questions"].append(question)
      if terms is None:
        question.update({f"null_delta_{d}": [] for d in directions})
        continue
      null = relabelled_deltas(terms, paths[:g], rewards[:g], directions, sc.permutations,
                               seed=config.seed * 1_000_003 + i)
      question.update({f"null_delta_{d}": null[d] for d in directions})
      rows["nodes"] += tables.node_rows(key, cols, terms, paths, directions,
                                        run.student.token_text)
      rows["rollouts"] += tables.rollout_rows(key, terms, paths, rewards, g, directions,
                                              run.student.token_text)
    results[i] = rows
  return results


def diagnose_group(run: Setup, task: Task, examples: Sequence[Example], indices: Sequence[int],
                   summaries: dict, config: DiagnoseConfig) -> dict[int, dict[str, list[dict]]]:
  """Every step for one group of questions (``examples[i]`` for i in ``indices``)."""
  group = sample_group(run, task, examples, indices, config)
  demo_pools = None
  if any(s.needs_rollout_demos for s in run.specs):
    demo_pools = sample_demo_pools(run.student, task, group.examples, group.prompts,
                                   group.indices, config)
  teachers = teacher_prompts(run, task, group, config, summaries, demo_pools)
  spend_targeted_budget(run, group, teachers, config)
  return score_specs(run, group, teachers, config)


# ---------------------------------------------------------------------------------------
# The whole diagnostic in memory


@dataclasses.dataclass
class Tables:
  """The diagnostic's three tables (columns: ``analysis/tables.py``) for the reported
  ``directions`` (the first is the headline)."""
  nodes: pd.DataFrame
  rollouts: pd.DataFrame
  questions: pd.DataFrame
  directions: tuple[str, ...]

  @classmethod
  def from_parts(cls, parts: Sequence[dict], directions: Sequence[str]) -> "Tables":
    """Concatenates per-question parts ({table name: rows or DataFrame}) in order."""
    frames = {t: pd.concat([p[t] if isinstance(p[t], pd.DataFrame) else pd.DataFrame(p[t])
                            for p in parts], ignore_index=True) for t in TABLES}
    return cls(directions=tuple(directions), **frames)

  def summary(self, config: dict | None = None) -> dict:
    """summary.json's content (``analysis.report.summarize``); config is copied into it."""
    return report.summarize(self.rollouts, self.questions, self.nodes, list(self.directions),
                            config)


def groups_of(num_questions: int, question_batch: int) -> list[list[int]]:
  """The fixed groups of a run: consecutive dataset indices, ``question_batch`` at a time."""
  return [list(range(lo, min(lo + question_batch, num_questions)))
          for lo in range(0, num_questions, question_batch)]


def diagnose(student: str, teacher_specs: Sequence[str], examples: Sequence[Example],
             task: Task | str, config: DiagnoseConfig = DiagnoseConfig(), *,
             models: ModelCache | None = None,
             summary_cache: contexts.SummaryCache | None = None) -> Tables:
  """The diagnostic of one student against teacher specs on ``examples`` (dataset order:
  example i is sampled with question id i), in memory.

  student: a bundled toy name, a checkpoint directory or a hub id; teacher_specs: strings
  of contexts.py (``"teacher"``, ``"self:correct_demo"``, …); task: a Task or its name;
  models: a ModelCache to share loaded checkpoints (default: a new float32 one);
  summary_cache: where generated summaries are kept (default: in memory). Returns Tables.
  """
  if config.num_rollouts < 2:
    raise ValueError(f"num_rollouts={config.num_rollouts} must be ≥ 2: a tree needs a branch")
  task = tasks.get_task(task) if isinstance(task, str) else task
  run = setup(student, teacher_specs, task, examples, config, models)
  summaries = write_summaries(run, task, examples, summary_cache or contexts.SummaryCache(None),
                              config)
  parts = {}
  for group in groups_of(len(examples), config.question_batch):
    parts.update(diagnose_group(run, task, examples, group, summaries, config))
  return Tables.from_parts([parts[i] for i in sorted(parts)], config.scoring.directions)


Step = Callable[..., dict]


def resume(run_dir: rundir.RunDir, setups: Sequence[Setup], task: Task,
           examples: Sequence[Example], config: DiagnoseConfig, step: Step) -> bool:
  """For each student's Setup (``setup``; load them all first, so a bad checkpoint is found
  before the run directory is written), ``step(setup, task, examples, indices, summaries,
  config) → {index: {table: rows}}`` (``diagnose_group``, ``accuracy_group``) over every
  question group that lacks a finished part in ``run_dir`` (opened), each group's parts
  written as it ends. Summaries are generated (and cached in the run directory) only for a
  student with work left. Raises rundir.Interrupt once the run directory's ``stop_after`` is
  reached.

  In a job of several processes (``run_dir.processes``) the unfinished (student, group)
  pairs are dealt to the processes (``RunDir.deal``); process 0 writes the summaries first
  and the others wait for them. Returns ``run_dir.gather()``: True on the process that
  merges (process 0), once every process has written its share."""
  groups = groups_of(len(examples), config.question_batch)
  todo = [(run, group) for run in setups
          for group in run_dir.todo(rundir.tag(run.name), groups, label=run.name)]
  pending = [run for run in setups if any(r is run for r, _ in todo)]
  procs = run_dir.processes
  if procs.lead:
    cache = contexts.SummaryCache(run_dir.file("summaries.json"))
    for run in pending:
      write_summaries(run, task, examples, cache, config)
  if any(spec.summarizer is not None for run in pending for spec in run.specs):
    procs.barrier("summaries")  # the others read what process 0 wrote
  cache = contexts.SummaryCache(run_dir.file("summaries.json"))
  summaries = {run.name: write_summaries(run, task, examples, cache, config)
               for run in pending}
  mine = run_dir.deal(todo)
  if procs.count > 1:
    _log.info("process %d of %d: %d of the %d question groups left", procs.index, procs.count,
              len(mine), len(todo))
  # One progress bar per student, over this process's share of its groups.
  for run in pending:
    share = [group for r, group in mine if r is run]
    for group in run_dir.progress(share, label=run.name):
      run_dir.write_parts(rundir.tag(run.name), step(run, task, examples, group,
                                                     summaries[run.name], config))
  return run_dir.gather()


# ---------------------------------------------------------------------------------------
# In-context accuracy: each spec's model answering with its context


def answer(model: LoadedModel, task: Task, prompts: Sequence[list[int]],
           exs: Sequence[Example], indices: Sequence[int],
           config: DiagnoseConfig) -> list[tables.Outcome]:
  """``num_rollouts`` samples of ``model`` per prompt, verified against its example (the
  indices are the sampler's question ids, so a question's samples do not depend on its
  group)."""
  g = config.num_rollouts
  ro = sampling.sample(model.cfg, model.params, list(prompts),
                       model.sampling_config(config.sampling), num_samples=g,
                       seed=config.seed, question_ids=list(indices), vocab_mask=model.mask)
  check_sampled(ro, model, exs, "answers")
  out = []
  for j, ex in enumerate(exs):
    rows = range(j * g, (j + 1) * g)
    correct = sum(bool(task.verify(model.decode(ro.sequence(r)), ex)) for r in rows)
    out.append(tables.Outcome(
        g, int(correct), float(np.mean(ro.lengths[j * g:(j + 1) * g])),
        int(np.sum(ro.stop_reason[j * g:(j + 1) * g] == sampling.STOP_MAX_TOKENS))))
  return out


def accuracy_group(run: Setup, task: Task, examples: Sequence[Example],
                   indices: Sequence[int], summaries: dict,
                   config: DiagnoseConfig) -> dict[int, dict[str, list[dict]]]:
  """The accuracy table's rows of one group, {dataset index: {"accuracy": rows}}: the
  student's plain accuracy (spec ``tables.BASELINE``) then each spec's model reading its
  context."""
  student = run.student
  exs = [examples[i] for i in indices]
  prompts = [student_prompt(student, task, ex, config) for ex in exs]
  rows = {i: [] for i in indices}
  for i, ex, ids, o in zip(indices, exs, prompts, answer(student, task, prompts, exs, indices,
                                                         config)):
    key = dict(student=run.name, spec=tables.BASELINE, question_id=ex.id)
    rows[i].append(tables.accuracy_row(key, i, run.name, "ok", ids, len(ids), o))
  demo_pools = [None] * len(exs)
  if any(s.needs_rollout_demos for s in run.specs):
    demo_pools = sample_demo_pools(student, task, exs, prompts, indices, config)
  for spec in run.specs:
    model = run.teachers[spec.text]
    built = [context_prompt(spec, model, task, ex, config, demo_pools[j],
                            summaries.get((spec.text, ex.id))) for j, ex in enumerate(exs)]
    live = [j for j, (ids, _) in enumerate(built) if ids is not None]
    outcomes = {}
    if live:
      outcomes = dict(zip(live, answer(model, task, [built[j][0] for j in live],
                                       [exs[j] for j in live], [indices[j] for j in live],
                                       config)))
    who = run.name if spec.is_self else spec.model
    for j, (i, ex) in enumerate(zip(indices, exs)):
      ids, status = built[j]
      base_len = (len(prompts[j]) if model is student
                  else len(student_prompt(model, task, ex, config)))
      key = dict(student=run.name, spec=spec.text, question_id=ex.id)
      rows[i].append(tables.accuracy_row(key, i, who, status, ids, base_len, outcomes.get(j)))
  accs = {}
  for r in (r for question in rows.values() for r in question):
    accs.setdefault(r["spec"], []).append(r["accuracy"])
  _log.info("%s accuracy: %s", run.name, ", ".join(
      f"{s} {np.nanmean(a):.2f}" if np.isfinite(a).any() else f"{s} n/a"
      for s, a in accs.items()))
  return {i: {"accuracy": r} for i, r in rows.items()}


__all__ = ["DEMO_STREAM", "DiagnoseConfig", "Group", "Setup", "Tables", "TeacherPrompts",
           "accuracy_group", "answer", "check_prompt_lengths", "check_sampled", "context_prompt",
           "diagnose", "diagnose_group", "groups_of", "resume", "sample_demo_pools",
           "sample_group", "score_specs", "scoring_shapes", "setup", "spend_targeted_budget",
           "student_prompt", "teacher_prompts", "write_summaries"]
