"""Teacher specs: who the teacher is and what privileged context it reads before the question.

A spec is one string, ``<who>[:<context>]``:

  who       ``self`` (the student's own weights) or a model: a bundled toy model's name
            (``student_small``, ``student_large``, ``teacher``), a checkpoint directory, or a
            Hugging Face hub id (``org/name``).
  context   (none)                     the question alone (an external teacher, or ``self``
                                       as the trivial baseline whose directions are all 0)
            ``correct_demo``           the dataset's reference solution, as an earlier turn
            ``correct_demo=rollout``   one of the student's own correct rollouts instead
            ``correct_and_wrong_demo`` the reference solution and one of the student's own
                                       incorrect rollouts (marked incorrect), as two turns
            ``summary``                a summary of the reference solution written by ``who``
                                       (for ``self``, by the student)
            ``summary_by=<model>``     the same summary, written by <model> (or ``self``)

Examples: ``self:correct_demo``, ``self:summary_by=teacher``, ``teacher``,
``teacher:correct_demo``, ``Qwen/Qwen3-8B:summary``.

Leakage rule: a demonstration drawn from the student's rollouts comes from *extra* rollouts
sampled for that purpose (``DemoPool``), never from the rollouts being scored, so a
question's teacher context is one text, prefilled once, for every scored rollout.

How a context is shown is the task's choice (``Task.context_turn``): a (user, assistant)
turn pair before the question; summaries are written by sampling the summariser greedily on
``Task.summary_request(reference_response)`` and cached on disk (``SummaryCache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
from typing import Sequence

from gradalign_jax.models.loaded import TOY_MODELS
from gradalign_jax.models.tokenizer import chat_prompt
from gradalign_jax.tasks.base import Example, Task

CONTEXTS = ("none", "correct_demo", "correct_demo=rollout", "correct_and_wrong_demo", "summary",
            "summary_by")
VALID_SPECS = ("self", "self:correct_demo", "self:correct_demo=rollout",
               "self:correct_and_wrong_demo", "self:summary", "self:summary_by=<model>",
               "<model>", "<model>:correct_demo", "<model>:correct_and_wrong_demo",
               "<model>:summary", "<model>:summary_by=<model>")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


class SpecError(ValueError):
  """A teacher spec that does not parse or names no model."""


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """One parsed spec. ``model``: "self" or a model reference (``resolve_model`` finds it);
  ``context``: one of CONTEXTS; ``summarizer``: who writes the summary (summary contexts)."""
  text: str
  model: str
  context: str = "none"
  summarizer: str | None = None

  @property
  def is_self(self) -> bool:
    return self.model == "self"

  @property
  def needs_rollout_demos(self) -> bool:
    """Whether the context draws on the student's own (extra) rollouts."""
    return self.context in ("correct_demo=rollout", "correct_and_wrong_demo")


def _check_model(ref: str, spec: str) -> str:
  if ref == "self" or ref in TOY_MODELS or os.path.isdir(ref) or _HUB_ID.match(ref):
    return ref
  raise SpecError(
      f"teacher spec {spec!r}: {ref!r} is not 'self', a bundled toy model "
      f"({', '.join(TOY_MODELS)}), an existing checkpoint directory, or a hub id 'org/name'. "
      f"Valid specs: {', '.join(VALID_SPECS)}")


def parse_spec(text: str) -> TeacherSpec:
  """The TeacherSpec of one string; SpecError lists the valid forms."""
  text = text.strip()
  who, sep, context = text.partition(":")
  if not who or (sep and not context):
    raise SpecError(f"teacher spec {text!r} is empty on one side of ':'. Valid specs: "
                    f"{', '.join(VALID_SPECS)}")
  model = _check_model(who, text)
  if not sep:
    return TeacherSpec(text, model)
  if context.startswith("summary_by="):
    by = _check_model(context.split("=", 1)[1], text)
    return TeacherSpec(text, model, "summary_by", summarizer=by)
  if context not in CONTEXTS or context in ("none", "summary_by"):
    raise SpecError(f"teacher spec {text!r}: unknown context {context!r}. Valid specs: "
                    f"{', '.join(VALID_SPECS)}")
  return TeacherSpec(text, model, context, summarizer=model if context == "summary" else None)


def parse_specs(texts: Sequence[str]) -> list[TeacherSpec]:
  """Parses a list of specs (duplicates refused: each names one column of results)."""
  specs = [parse_spec(t) for t in texts]
  seen = [s.text for s in specs]
  dup = sorted({t for t in seen if seen.count(t) > 1})
  if dup:
    raise SpecError(f"teacher specs {dup} are given more than once; drop the repeats")
  if not specs:
    raise SpecError(f"no teacher spec given. Valid specs: {', '.join(VALID_SPECS)}")
  return specs


@dataclasses.dataclass(frozen=True)
class ContextConfig:
  """How teacher contexts and prompts are built.

  thinking: Qwen3 thinking mode of every prompt: ``"task"`` (the task's default), ``"on"``
    or ``"off"``.
  demo_samples: extra student rollouts per question that rollout demonstrations are drawn
    from (never the scored ones).
  summary_tokens: most tokens of a generated summary.
  """
  thinking: str = "task"
  demo_samples: int = 16
  summary_tokens: int = 32

  def __post_init__(self):
    if self.thinking not in ("task", "on", "off"):
      raise ValueError(f"thinking={self.thinking!r} must be 'task', 'on' or 'off'")
    if self.demo_samples < 1 or self.summary_tokens < 1:
      raise ValueError(f"need demo_samples ≥ 1 and summary_tokens ≥ 1 (got "
                       f"{self.demo_samples}, {self.summary_tokens})")

  def enable_thinking(self, task: Task) -> bool:
    """The thinking mode of ``task``'s prompts under this setting."""
    if self.thinking == "task":
      return inspect.signature(task.prompt).parameters["enable_thinking"].default
    return self.thinking == "on"


# ---------------------------------------------------------------------------------------
# The student's own rollouts as demonstrations, and cached summaries


@dataclasses.dataclass(frozen=True)
class DemoPool:
  """Extra rollouts of the student for one question, sampled only to serve as
  demonstrations (never scored): their decoded texts and verifier outcomes, in sample order."""
  texts: tuple[str, ...]
  correct: tuple[bool, ...]

  def first(self, correct: bool) -> str | None:
    """The first rollout with that outcome (deterministic), or None."""
    for text, ok in zip(self.texts, self.correct):
      if ok == correct:
        return text
    return None


class SummaryCache:
  """Summaries on disk, keyed by (summariser, question id, hash of the summarised text), so a
  rerun or a resumed run never regenerates them. One JSON file, written atomically."""

  def __init__(self, path: str | None):
    self.path = path
    self.entries: dict[str, str] = {}
    if path and os.path.exists(path):
      with open(path) as f:
        self.entries = json.load(f)

  @staticmethod
  def key(summarizer: str, example: Example, text: str) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{summarizer}|{example.id}|{digest}"

  def get(self, summarizer: str, example: Example, text: str) -> str | None:
    return self.entries.get(self.key(summarizer, example, text))

  def put(self, summarizer: str, example: Example, text: str, summary: str) -> None:
    self.entries[self.key(summarizer, example, text)] = summary

  def save(self) -> None:
    if not self.path:
      return
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.entries, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


class ContextUnavailable(Exception):
  """This question cannot carry this context (e.g. the student had no incorrect demo
  rollout); the sweep records the reason and skips the (question, spec) pair."""


def context_turns(spec: TeacherSpec, task: Task, example: Example,
                  demos: DemoPool | None = None,
                  summary: str | None = None) -> list[tuple[str, str]]:
  """The (user, assistant) turns the teacher reads before the question.

  demos: the question's DemoPool (needed by the rollout-demo contexts); summary: the text
  of a summary context (``pipeline.write_summaries`` generates it). Raises
  ContextUnavailable when the pool has no rollout of the outcome needed.
  """
  reference = task.reference_response(example)
  if spec.context == "none":
    return []
  if spec.context == "correct_demo":
    return [task.context_turn(example, "correct", reference)]
  if spec.context in ("summary", "summary_by"):
    if summary is None:
      raise ValueError(f"spec {spec.text!r} needs the summary text; generate it first "
                       "(pipeline.write_summaries)")
    return [task.context_turn(example, "summary", summary)]
  if demos is None:
    raise ValueError(f"spec {spec.text!r} draws demonstrations from the student's extra "
                     "rollouts; pass that question's DemoPool")
  if spec.context == "correct_demo=rollout":
    text = demos.first(correct=True)
    if text is None:
      raise ContextUnavailable(f"no correct rollout among {len(demos.texts)} demo samples")
    return [task.context_turn(example, "correct", text)]
  if spec.context == "correct_and_wrong_demo":
    wrong = demos.first(correct=False)
    if wrong is None:
      raise ContextUnavailable(f"no incorrect rollout among {len(demos.texts)} demo samples")
    return [task.context_turn(example, "correct", reference),
            task.context_turn(example, "incorrect", wrong)]
  raise AssertionError(spec.context)


def teacher_prompt(spec: TeacherSpec, task: Task, tokenizer, example: Example,
                   enable_thinking: bool, demos: DemoPool | None = None,
                   summary: str | None = None) -> str:
  """The teacher's prompt text: its context turns, then the question as the student sees it."""
  turns = context_turns(spec, task, example, demos, summary)
  return task.prompt(tokenizer, example, enable_thinking=enable_thinking,
                     demonstration=turns or None)


def summary_prompt(task: Task, tokenizer, example: Example) -> str:
  """The prompt a summariser answers: summarise the question's reference solution."""
  return chat_prompt(tokenizer, task.summary_request(task.reference_response(example)),
                     enable_thinking=False)


__all__ = ["CONTEXTS", "ContextConfig", "ContextUnavailable", "DemoPool", "SpecError",
           "SummaryCache", "TeacherSpec", "VALID_SPECS", "context_turns", "parse_spec",
           "parse_specs", "summary_prompt", "teacher_prompt"]
