"""BoolQ (google/boolq, super_glue/boolq): a yes/no question about a passage.

Schemas: ``question``, ``passage``, and ``answer`` (bool, or "true"/"false"/"yes"/"no") or
super_glue's ``label`` (1 = yes, 0 = no, -1 = unlabelled test row, refused). The verifier
reads yes/no/true/false (any case) from the final section: a ``\\boxed{}`` answer, else the
last "answer is/Answer:" statement, else a bold **Yes**, else a leading "Yes," / "No.", else
the last such word. Anything else ("I'm not sure") is not an answer.
"""

from __future__ import annotations

import re

from gradalign_jax.tasks import answers
from gradalign_jax.tasks.base import Example, RecordError, Task, get_field, get_text

_WORDS = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_WORD = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def _leading_word(text: str) -> str | None:
  m = re.match(r"^[\s*_$\\{(\"']*(?:text\{)?(yes|no|true|false)\b(?!['’-])", text, re.IGNORECASE)
  return _WORDS[m.group(1).lower()] if m else None


class BoolQTask(Task):
  name = "boolq"
  instruction = "Answer with yes or no."

  def parse_record(self, row: dict, index: int) -> Example:
    question = get_text(row, "question")
    name, raw = get_field(row, "answer", "label")
    if isinstance(raw, bool):
      answer = "yes" if raw else "no"
    elif isinstance(raw, int) and raw in (0, 1):
      answer = "yes" if raw == 1 else "no"
    elif isinstance(raw, str) and raw.strip().lower() in _WORDS:
      answer = _WORDS[raw.strip().lower()]
    elif name == "label" and raw == -1:
      raise RecordError("field 'label' is -1 (an unlabelled test row); use the train or "
                        "validation split")
    else:
      raise RecordError(f"field {name!r} must be true/false (or label 0/1), got {raw!r:.40}")
    _, passage = get_field(row, "passage", required=False)
    if passage is not None and not isinstance(passage, str):
      raise RecordError(f"field 'passage' must be a string, got {type(passage).__name__}")
    meta = {k: v for k, v in row.items() if k not in ("question", "answer", "label", "id", "idx")}
    return Example(self.example_id(row, index), question, answer, None, meta)

  def user_message(self, example: Example) -> str:
    question = example.question.strip()
    if not question.endswith("?"):  # google/boolq questions are lower case with no mark
      question = question[0].upper() + question[1:] + "?"
    passage = (example.meta.get("passage") or "").strip()
    head = f"Passage: {passage}\n\n" if passage else ""
    return f"{head}Question: {question}\n\n{self.instruction}"

  def reference_response(self, example: Example) -> str:
    return example.answer.capitalize() + "."

  def extract_answer(self, response_text: str) -> str | None:
    text = answers.final_section(response_text)
    boxed = answers.last_boxed(text)
    if boxed is not None:
      return _leading_word(boxed)
    statement = answers.last_answer_statement(text)
    if statement is not None and _leading_word(statement):
      return _leading_word(statement)
    bold = re.findall(r"\*\*\s*(yes|no|true|false)\b[^*\n]{0,40}\*\*", text, re.IGNORECASE)
    if bold:
      return _WORDS[bold[-1].lower()]
    leading = _leading_word(text)
    if leading is not None:
      return leading
    words = _WORD.findall(text)
    return _WORDS[words[-1].lower()] if words else None

  def is_correct(self, predicted: str, example: Example) -> bool:
    return predicted == example.answer
