"""The training loop of the gated-distillation check: one arm, one seed, a learning curve.

    from gradalign_jax import training
    trainer = training.Trainer(student, teacher, task, pool, eval_examples, config, diagnose)
    run = training.train_arm(trainer, "alignment_gated", seed=0)
    run.curve    # [{"step", "accuracy", "kept_fraction", ...}] one row per step (0 = init)
    run.compute  # rollouts, generated and forward tokens, seconds

Every step of every arm does the same thing but the gate (``distill.gate_mask``): Q questions
of the training pool (``pipeline.sample_group``: G on-policy rollouts each from the current
student, verified into prefix trees), one optax step on their rollouts. The questions of a
step are block ``step // refresh_every`` of the seed's permutation of the pool: arms of one
seed see the same questions at the same step and use the same sampler seeds (their rollouts
differ once their students do).

``alignment_gated`` additionally runs the diagnostic at the first step of each block
(``pipeline.teacher_prompts``, ``spend_targeted_budget`` with the current student, then
``alignment.score_tree`` per question): a token is kept where the estimated
cos(ĝ*, d_reverse_kl) at its prefix node is > 0 (the full tree's estimate, the rollout's own
outcome among the counts: the gate is a property of the node, not a leave-one-out score). At the block's later steps the new
rollouts' prefixes are looked up in the same question's tree (``distill.alignment_keep``).
A token whose prefix node was never scored or is not informative (fewer than two observed
children, or equal Q̂) has no estimate: ``uncovered_tokens`` = "drop" (default) does not
keep it, "keep" keeps it. The proxy arms keep, at each step, the fraction of the batch's
valid tokens that alignment_gated kept at that step of the same seed (``fractions``).
``covered_random`` runs the same diagnostic on its own current student and keeps that many
tokens drawn uniformly among its covered ones (the ones with an estimate).

Held-out accuracy: ``eval_samples`` samples at T = 1 per held-out question, after steps 0,
``eval_every``, 2·``eval_every``, … and the last, with a sampler seed fixed per run seed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from gradalign_jax import alignment, contexts, distill, pipeline, sampling, scoring
from gradalign_jax.models.loaded import LoadedModel
from gradalign_jax.shapes import bucket
from gradalign_jax.tasks.base import Example, Task

_log = logging.getLogger(__name__)

# rollouts: every rollout sampled for training (on-policy + targeted; targeted_rollouts of them).
COMPUTE = ("rollouts", "targeted_rollouts", "generated_tokens", "student_train_tokens",
           "teacher_train_tokens", "diagnostic_student_tokens", "diagnostic_teacher_tokens",
           "forward_tokens", "seconds")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """arms: names of ``distill.ARMS`` (a proxy arm needs ``alignment_gated``); seeds: runs per
  arm; steps: optimizer steps per run; learning_rate: optax adam's; refresh_every: steps per
  diagnostic refresh and per block of training questions; uncovered_tokens: "drop" or "keep"
  (alignment_gated's rule where there is no estimate); eval_every: steps between held-out
  evaluations; eval_samples: samples per held-out question."""
  arms: tuple[str, ...] = distill.ARMS
  seeds: int = 5
  steps: int = 60
  learning_rate: float = 1e-3
  refresh_every: int = 1
  uncovered_tokens: str = "drop"
  eval_every: int = 10
  eval_samples: int = 4

  def __post_init__(self):
    object.__setattr__(self, "arms", tuple(self.arms))
    bad = [a for a in self.arms if a not in distill.ARMS]
    if bad or not self.arms or len(set(self.arms)) < len(self.arms):
      raise ValueError(f"arms {list(self.arms)}: unknown or repeated {bad}; choose from "
                       f"{list(distill.ARMS)}")
    if set(self.arms) & set(distill.FRACTION_ARMS) and "alignment_gated" not in self.arms:
      raise ValueError("the proxy, random_fraction and covered_random arms keep the fraction of "
                       "tokens alignment_gated kept: add alignment_gated to --arms")
    if min(self.seeds, self.steps, self.refresh_every, self.eval_every, self.eval_samples) < 1:
      raise ValueError("train_seeds, steps, refresh_every, eval_every and eval_samples must be "
                       f"≥ 1 (got {self.seeds}, {self.steps}, {self.refresh_every}, "
                       f"{self.eval_every}, {self.eval_samples})")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
    if self.uncovered_tokens not in ("drop", "keep"):
      raise ValueError(f"uncovered_tokens={self.uncovered_tokens!r} must be 'drop' or 'keep'")

  def ordered_arms(self) -> list[str]:
    """The arms in run order: alignment_gated first (the proxy arms read its fractions)."""
    return sorted(self.arms, key=lambda a: (a != "alignment_gated", distill.ARMS.index(a)))

  def eval_steps(self) -> list[int]:
    return sorted(set(range(0, self.steps + 1, self.eval_every)) | {self.steps})


class Trainer:
  """What every arm and seed of a run shares: the models (the student's initial params),
  the task, the training ``pool`` and held-out ``eval_examples``, the configs, the batch
  length, and one jitted step (``distill.make_train_step``) for every arm."""

  def __init__(self, student: LoadedModel, teacher: LoadedModel, task: Task,
               pool: Sequence[Example], eval_examples: Sequence[Example], config: TrainConfig,
               diagnose: pipeline.DiagnoseConfig):
    import optax

    scoring.check_compatible(student.cfg, teacher.cfg, student.tok, teacher.tok)
    if len(pool) < diagnose.question_batch:
      raise ValueError(f"the training pool has {len(pool)} questions, fewer than one step's "
                       f"{diagnose.question_batch} (--question_batch): raise --num_questions")
    self.student, self.teacher, self.task = student, teacher, task
    self.pool, self.eval_examples = list(pool), list(eval_examples)
    self.config, self.diagnose = config, diagnose
    if teacher is student:
      # The loss would read the frozen initial student and the diagnostic the current one as
      # its own teacher (d_reverse_kl ≡ 0: alignment_gated would silently keep nothing).
      raise ValueError("gated distillation needs a teacher other than the student: pass a "
                       "teacher model")
    self.spec = contexts.parse_spec("teacher")
    prompts = [pipeline.student_prompt(student, task, ex, diagnose) for ex in self.pool]
    self.eval_prompts = [pipeline.student_prompt(student, task, ex, diagnose)
                         for ex in self.eval_examples]
    width = diagnose.sampling.max_new_tokens
    self.length = bucket(max(map(len, prompts + self.eval_prompts)) + width)
    self.optimizer = optax.adam(config.learning_rate)
    self.step = distill.make_train_step(student.cfg, teacher.cfg, self.optimizer, student.mask)

  def questions(self, seed: int, step: int) -> list[int]:
    """Pool indices of the questions of ``step`` in run ``seed``."""
    order = np.random.default_rng([seed, 0x6A7E]).permutation(len(self.pool))
    q = self.diagnose.question_batch
    block = step // self.config.refresh_every
    return [int(order[(block * q + i) % len(order)]) for i in range(q)]

  def evaluate(self, params, seed: int) -> float:
    """Held-out accuracy: ``eval_samples`` samples per question at the student's policy."""
    s = self.student
    ro = sampling.sample(s.cfg, params, self.eval_prompts,
                         s.sampling_config(self.diagnose.sampling),
                         num_samples=self.config.eval_samples, seed=10_000_019 + seed,
                         question_ids=list(range(len(self.eval_prompts))), vocab_mask=s.mask)
    return float(np.mean([self.task.verify(s.decode(ro.sequence(r)),
                                           self.eval_examples[int(ro.question[r])])
                          for r in range(len(ro))]))

  def setup(self, params) -> pipeline.Setup:
    """A pipeline Setup whose student holds ``params`` (the diagnostic on the current one)."""
    student = copy.copy(self.student)
    student.params = params
    return pipeline.Setup(self.student.ref, student, [self.spec],
                          {self.spec.text: self.teacher}, None)


@dataclasses.dataclass
class ArmRun:
  """One (arm, seed): ``curve`` rows (step 0 … steps; ``accuracy`` NaN where not evaluated),
  ``compute`` (COMPUTE totals) and the final ``params``."""
  curve: list[dict]
  compute: dict
  params: object


def _diagnose(trainer: Trainer, run: pipeline.Setup, group: pipeline.Group, task: Task,
              config: pipeline.DiagnoseConfig, compute: dict) -> list[tuple]:
  """The diagnostic on the group's trees (targeted rollouts added): [(tree, columns)]."""
  teachers = pipeline.teacher_prompts(run, task, group, config, {})
  pipeline.spend_targeted_budget(run, group, teachers, config)
  g, sc, s = config.num_rollouts, config.scoring, run.student
  out = []
  for j, pool in enumerate(group.pools):
    student = scoring.PromptedModel(s.cfg, s.params, group.prompts[j], s.tok)
    cols, stats = alignment.score_tree(pool.tree, student, teachers.models[trainer.spec.text][j],
                                       sc.chunk_nodes, s.mask, sc.jsd_beta, sc.topk,
                                       config.sampling.policy_only(),
                                       pipeline.scoring_shapes(config), sc.teacher_temperature)
    out.append((pool.tree, cols))
    for b, r in pool.origin[g:]:
      ro = pool.batches[b]
      compute["generated_tokens"] += int(ro.lengths[r]) - int(ro.branch_depth[r])
    compute["targeted_rollouts"] += pool.num_rollouts - g
    compute["rollouts"] += pool.num_rollouts - g
    compute["diagnostic_student_tokens"] += stats.student_positions
    compute["diagnostic_teacher_tokens"] += stats.teacher_positions
  return out


def train_arm(trainer: Trainer, arm: str, seed: int, fractions: Sequence[float] | None = None,
              steps: int | None = None) -> ArmRun:
  """Trains the student from its initial params in ``arm`` (``distill.ARMS``) for run
  ``seed``. fractions: per step (index = step − 1), the share of valid tokens a proxy arm
  or random_fraction keeps (alignment_gated's ``kept_fraction`` curve of the same seed).
  steps: default ``config.steps``."""
  if arm not in distill.ARMS:
    raise ValueError(f"unknown arm {arm!r}; choose from {list(distill.ARMS)}")
  cfg, task = trainer.config, trainer.task
  steps = cfg.steps if steps is None else steps
  if arm in distill.FRACTION_ARMS and (fractions is None or len(fractions) < steps):
    raise ValueError(f"{arm} needs alignment_gated's kept fraction at each of its {steps} steps")
  params = trainer.student.params
  opt_state = trainer.optimizer.init(params)
  g, width = trainer.diagnose.num_rollouts, trainer.diagnose.sampling.max_new_tokens
  compute = dict.fromkeys(COMPUTE, 0)
  evals = set(cfg.eval_steps())
  curve = [dict(step=0, accuracy=trainer.evaluate(params, seed), kept_fraction=np.nan,
                covered_fraction=np.nan, train_reward=np.nan, loss=np.nan)]
  trees = None
  start = time.perf_counter()
  for s in range(steps):
    run = trainer.setup(params)
    config = dataclasses.replace(trainer.diagnose,
                                 seed=trainer.diagnose.seed * 1_000_003 + seed * 10_007 + s)
    group = pipeline.sample_group(run, task, trainer.pool, trainer.questions(seed, s), config)
    ro = group.pools[0].batches[0]
    rewards = np.asarray([r for pool in group.pools for _, r, _ in pool.tree.rollouts[:g]],
                         np.float32)
    compute["rollouts"] += len(ro)
    compute["generated_tokens"] += int(np.sum(ro.lengths))
    valid = np.arange(width)[None] < ro.lengths[:, None]
    keep = covered = np.zeros_like(valid)
    if arm in distill.DIAGNOSTIC_ARMS:
      if s % cfg.refresh_every == 0:
        trees = _diagnose(trainer, run, group, task, config, compute)
      parts = [distill.alignment_keep(tree, cols, [ro.sequence(r) for r in
                                                   range(j * g, (j + 1) * g)], width)
               for j, (tree, cols) in enumerate(trees)]
      keep = np.concatenate([k for k, _ in parts])
      covered = np.concatenate([c for _, c in parts])
      if arm == "alignment_gated" and cfg.uncovered_tokens == "keep":
        keep = keep | (valid & ~covered)
    batch = distill.training_batch(group.prompts, ro.question, ro.tokens, ro.lengths,
                                   trainer.student.pad_id, trainer.length)
    fraction = fractions[s] if arm in distill.FRACTION_ARMS else 0.0
    noise = np.random.default_rng([seed, s, 0x4E015E]).random(valid.shape, np.float32)
    params, opt_state, stats = trainer.step(
        params, opt_state, trainer.teacher.params, batch.tokens, batch.positions,
        batch.generated, batch.valid, rewards > 0.5, keep, covered,
        distill.question_advantages(rewards, ro.question), np.int32(distill.ARMS.index(arm)),
        np.float32(fraction), noise)
    compute["student_train_tokens"] += batch.sequence_tokens
    if arm != "reinforce":  # reinforce needs no teacher (the shared program runs it anyway)
      compute["teacher_train_tokens"] += batch.sequence_tokens
    n_valid = float(stats["valid"])
    row = dict(step=s + 1, accuracy=np.nan, kept_fraction=float(stats["kept"]) / n_valid,
               covered_fraction=(float(np.sum(covered & valid)) / n_valid
                                 if arm in distill.DIAGNOSTIC_ARMS else np.nan),
               train_reward=float(rewards.mean()), loss=float(stats["loss"]))
    if s + 1 in evals:
      row["accuracy"] = trainer.evaluate(params, seed)
      _log.info("%s seed %d step %d: held-out accuracy %.3f, kept %.3f, train reward %.3f",
                arm, seed, s + 1, row["accuracy"], row["kept_fraction"], row["train_reward"])
    curve.append(row)
  compute["seconds"] = time.perf_counter() - start
  compute["forward_tokens"] = (compute["generated_tokens"] + compute["student_train_tokens"]
                               + compute["teacher_train_tokens"]
                               + compute["diagnostic_student_tokens"]
                               + compute["diagnostic_teacher_tokens"])
  return ArmRun(curve, compute, params)


__all__ = ["ArmRun", "COMPUTE", "TrainConfig", "Trainer", "train_arm"]
