"""MATH (hendrycks/competition_math, MATH-500): LaTeX answers in ``\\boxed{}``.

Schemas: ``problem``, ``solution`` (with a ``\\boxed{}`` final answer), optional ``answer``
(MATH-500), ``level``, ``type`` / ``subject``, ``unique_id``. The reference answer is the
``answer`` field when present, else the last boxed answer of the solution. The verifier takes
the last boxed answer of the final section (else the last "answer is ...") and compares it
with ``answers.math_equal``.
"""

from __future__ import annotations

from gradalign_jax.tasks import answers
from gradalign_jax.tasks.base import (BOXED_INSTRUCTION, Example, RecordError, Task, get_field,
                                      get_text)


class MATHTask(Task):
  name = "math"
  instruction = BOXED_INSTRUCTION

  def parse_record(self, row: dict, index: int) -> Example:
    question = get_text(row, "problem", "question")
    _, solution = get_field(row, "solution", required=False)
    if solution is not None and not isinstance(solution, str):
      raise RecordError(f"field 'solution' must be a string, got {type(solution).__name__}")
    _, answer = get_field(row, "answer", required=False)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
      answer = str(answer)
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
      raise RecordError(f"field 'answer' must be a non-empty string, got {answer!r:.40}")
    if answer is None:
      if solution is None:
        get_field(row, "solution", "answer")  # raises naming both fields
      answer = answers.last_boxed(solution)
      if answer is None:
        raise RecordError("field 'solution' has no \\boxed{} final answer and there is no "
                          "'answer' field")
    used = {"problem", "question", "solution", "answer", "id", "unique_id"}
    meta = {k: v for k, v in row.items() if k not in used}
    return Example(self.example_id(row, index), question, answer.strip(), solution, meta)

  def user_message(self, example: Example) -> str:
    return f"{example.question.strip()}\n\n{self.instruction}"

  def reference_response(self, example: Example) -> str:
    if example.solution and answers.last_boxed(example.solution) is not None:
      return example.solution.strip()
    return super().reference_response(example)

  def extract_answer(self, response_text: str) -> str | None:
    text = answers.final_section(response_text)
    boxed = answers.last_boxed(text)
    return boxed if boxed is not None else answers.last_answer_statement(text)

  def is_correct(self, predicted: str, example: Example) -> bool:
    return answers.math_equal(predicted, example.answer)
