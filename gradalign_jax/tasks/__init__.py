"""Reasoning tasks: loaders, Qwen3 prompts and verifiers.

    from gradalign_jax import tasks

    task = tasks.get_task("gsm8k")             # boolq, mmlu, aime, gsm8k, math, synthetic
    examples = task.load("gsm8k/test.jsonl", limit=100)
    # or task.load("hf:openai/gsm8k:main:test") with the optional `datasets` library, online
    ex = examples[0]                           # Example(id, question, answer, solution, meta)
    text = task.prompt(tokenizer, ex, enable_thinking=True, demonstration=examples[1])
    reward = float(task.verify(response_text, ex))   # 1.0 / 0.0

Sources: a ``.jsonl``, ``.json`` or ``.parquet`` file in the task's usual Hugging Face export
schema (see each module's docstring), a directory of such files (shards, read in sorted
order), or ``hf:<dataset>[:<config>]:<split>``. A malformed record raises ``TaskDataError``
naming the file, the row (from 0, within its file) and the field. Examples without an id
field are named ``"<task>-<row>"``.

``Task`` methods:
  - ``load(source, limit=None) -> list[Example]``
  - ``user_message(example) -> str``: the question and the answer-format instruction.
  - ``reference_response(example) -> str``: a correct assistant turn (the dataset's solution
    ending in the answer in the asked-for format), the assistant half of a demonstration.
  - ``prompt(tokenizer, example, enable_thinking=True, demonstration=None, system=None)``:
    ``models.chat_prompt`` text; a demonstration (an Example or a (user, assistant) pair) is
    an earlier turn pair.
  - ``extract_answer(response_text) -> str | None`` and ``verify(response_text, example)
    -> bool``: the final answer is read after the thinking block (a ``<think>`` never
    closed means no answer); answers tried while thinking never count.

``answers`` holds the shared string functions (``final_section``, ``boxed_answers``,
``math_equal``, ``to_number``...). The registry imports a task's module on first use, so a
task module (``synthetic``) can depend on jax without slowing the others.
"""

from __future__ import annotations

import importlib

from gradalign_jax.tasks.base import Example, RecordError, Task, TaskDataError

# name → "module:Class"; imported on demand.
_REGISTRY = {
    "boolq": "gradalign_jax.tasks.boolq:BoolQTask",
    "mmlu": "gradalign_jax.tasks.mmlu:MMLUTask",
    "aime": "gradalign_jax.tasks.aime:AIMETask",
    "gsm8k": "gradalign_jax.tasks.gsm8k:GSM8KTask",
    "math": "gradalign_jax.tasks.math:MATHTask",
    "synthetic": "gradalign_jax.tasks.synthetic:SyntheticTask",  # the bundled toy models' task
}
TASK_NAMES = tuple(_REGISTRY)


def get_task(name: str, **kwargs) -> Task:
  """A new task instance by name (``kwargs`` go to its constructor)."""
  key = str(name).strip().lower()
  if key not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")
  module_name, class_name = _REGISTRY[key].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise ValueError(f"task {key!r} is registered as {_REGISTRY[key]} but {module_name} does not "
                     "exist in this checkout; add the module or pick another task") from e
  return getattr(module, class_name)(**kwargs)


__all__ = ["Example", "RecordError", "TASK_NAMES", "Task", "TaskDataError", "get_task"]
