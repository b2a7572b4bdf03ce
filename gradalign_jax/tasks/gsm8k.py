"""GSM8K (openai/gsm8k): grade-school word problems with a numeric answer after ``####``.

Schema: ``question``, ``answer`` = worked solution (with ``<<48/2=24>>`` calculator notes)
ending in ``#### 72``. The verifier reads the final number: the last ``\\boxed{}``, else a
``#### N`` line, else the last "answer is N", else the last number of the final section.
"""

from __future__ import annotations

import re

from gradalign_jax.tasks import answers
from gradalign_jax.tasks.base import BOXED_INSTRUCTION, Example, RecordError, Task, get_text


def _canonical(number: str) -> str | None:
  """'1,234' / '$18' / '10.0' → '1234' / '18' / '10'; None when not a number."""
  value = answers.to_number(number.replace("$", "").strip())
  if value is None:
    return None
  return str(value.numerator) if value.denominator == 1 else str(float(value))


class GSM8KTask(Task):
  name = "gsm8k"
  instruction = BOXED_INSTRUCTION

  def parse_record(self, row: dict, index: int) -> Example:
    question = get_text(row, "question")
    answer_text = get_text(row, "answer")
    solution, sep, final = answer_text.rpartition("####")
    number = _canonical(final) if sep else None
    if number is None:
      raise RecordError("field 'answer' has no '#### <number>' final answer "
                        f"(ends with {answer_text[-40:]!r})")
    meta = {k: v for k, v in row.items() if k not in ("question", "answer", "id")}
    return Example(self.example_id(row, index), question, number, solution.strip() or None, meta)

  def user_message(self, example: Example) -> str:
    return f"{example.question.strip()}\n\n{self.instruction}"

  def reference_response(self, example: Example) -> str:
    steps = re.sub(r"<<[^<>]*>>", "", example.solution or "").strip()  # calculator notes
    answer = f"The final answer is $\\boxed{{{example.answer}}}$."
    return f"{steps}\n\n{answer}" if steps else answer

  def extract_answer(self, response_text: str) -> str | None:
    text = answers.final_section(response_text)
    boxed = answers.last_boxed(text)
    if boxed is not None:
      return _number_in(boxed, last=True)
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
      return _number_in(hashes[-1], last=False)
    statement = answers.last_answer_statement(text)
    if statement is not None and _number_in(statement, last=False) is not None:
      return _number_in(statement, last=False)
    return _number_in(text, last=True)

  def is_correct(self, predicted: str, example: Example) -> bool:
    return answers.same_number(predicted, example.answer)


def _number_in(text: str, *, last: bool) -> str | None:
  """The whole text as a number (``\\frac{3}{4}``, ``$1,000``), else its first/last number."""
  whole = _canonical(answers.normalize_latex(text))
  if whole is not None:
    return whole
  found = answers.numbers_in(text)
  return _canonical(found[-1 if last else 0]) if found else None
