"""AIME: competition problems whose answer is an integer from 0 to 999.

Schemas: ``problem`` / ``question`` (or ``Problem``), ``answer`` (or ``Answer``) as an integer
or a string of one, optional ``solution`` (``Solution``) and ``id`` / ``ID``. The verifier
reads the last ``\\boxed{}``, else the last "answer is N", else the last integer; leading
zeros are fine (``042`` = 42).
"""

from __future__ import annotations

import re

from gradalign_jax.tasks import answers
from gradalign_jax.tasks.base import (BOXED_INSTRUCTION, Example, RecordError, Task, get_field,
                                      get_text)

_QUESTION = ("problem", "question", "Problem", "Question")
_ANSWER = ("answer", "Answer")
_SOLUTION = ("solution", "Solution")


def _integer(text: str) -> int | None:
  s = answers.normalize_latex(text).rpartition("=")[2]  # "m+n=33" → "33"
  return int(s) if re.fullmatch(r"\d{1,12}", s) else None


class AIMETask(Task):
  name = "aime"
  instruction = (BOXED_INSTRUCTION[:-1] + "; the answer is an integer from 0 to 999.")

  def parse_record(self, row: dict, index: int) -> Example:
    question = get_text(row, *_QUESTION)
    name, raw = get_field(row, *_ANSWER)
    if isinstance(raw, bool):
      value = None
    elif isinstance(raw, int):
      value = raw
    elif isinstance(raw, float) and raw.is_integer():
      value = int(raw)
    elif isinstance(raw, str) and re.fullmatch(r"\s*\d+\s*", raw):
      value = int(raw)
    else:
      value = None
    if value is None or not 0 <= value <= 999:
      raise RecordError(f"field {name!r} must be an integer from 0 to 999 (AIME), got {raw!r:.40}")
    _, solution = get_field(row, *_SOLUTION, required=False)
    used = set(_QUESTION + _ANSWER + _SOLUTION + ("id", "ID"))
    meta = {k: v for k, v in row.items() if k not in used}
    return Example(self.example_id(row, index), question, str(value),
                   solution if isinstance(solution, str) and solution.strip() else None, meta)

  def user_message(self, example: Example) -> str:
    return f"{example.question.strip()}\n\n{self.instruction}"

  def extract_answer(self, response_text: str) -> str | None:
    text = answers.final_section(response_text)
    boxed = answers.last_boxed(text)
    if boxed is not None:
      return boxed  # is_correct refuses one that is not an integer
    statement = answers.last_answer_statement(text)
    if statement is not None:
      found = re.findall(r"(?<![\d.,])\d+(?![\d.,]\d)", statement)
      if found:
        return found[0]
    found = re.findall(r"(?<![\d.,])\d+(?![\d.,]\d)", text)
    return found[-1] if found else None

  def is_correct(self, predicted: str, example: Example) -> bool:
    value = _integer(predicted)
    return value is not None and value <= 999 and value == int(example.answer)
