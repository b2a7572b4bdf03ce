"""MMLU (cais/mmlu): four-way multiple choice, answered with a letter A–D.

Schema: ``question``, ``subject``, ``choices`` (4 strings), ``answer`` (0–3, or a letter);
also the column form ``input``, ``A``–``D``, ``target``. The verifier takes the last explicit
choice of the final section: "The answer is (B)", "Answer: B", ``\\boxed{B}``, "**B**",
"B is correct", or a last line that is the letter ("B", "(B)", "B) Paris") unless that line
ends a listing of the options. A capital letter in running text ("A good approach") is not a
choice.
"""

from __future__ import annotations

import re

from gradalign_jax.tasks import answers
from gradalign_jax.tasks.base import Example, RecordError, Task, get_field, get_text

LETTERS = "ABCD"
_LETTER = re.compile(r"""^\(?([A-D])\)?(?:[.):,;"'}\]]|\s*$|\s+[-–—])""")
_BOLD = re.compile(r"\*\*\s*\(?([A-D])\)?(?:[.):][^*\n]*)?\s*\*\*")
# "C is correct", "(C) is the best answer", "C is the answer"; not "A is incorrect"
_IS_CORRECT = re.compile(
    r"(?<![\w(])\(?([A-D])\)?(?:\*\*)?\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b")
_LIST_ITEM = re.compile(r"\s*(?:[-*+•]|\d+[.)])?\s*")


def _letter_of(text: str) -> str | None:
  """The choice letter a short answer text gives ('(B)', 'B.', 'B) Paris', 'Paris (B)')."""
  s = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", text).replace("*", "").strip()
  s = re.sub(r"^(?:[_$\s\"']|(?i:option|choice|letter)\b)+", "", s).strip()
  m = _LETTER.match(s)
  if m is None and not re.search(r"\bnot\b|n't\b", s):  # "Nitrogen (B)", not "not (A)"
    m = re.search(r"\(([A-D])\)\W*$", s)
  return m.group(1) if m else None


class MMLUTask(Task):
  name = "mmlu"
  instruction = ('Answer with the letter of the correct choice: end your response with '
                 '"The answer is (X)", where X is A, B, C or D.')

  def parse_record(self, row: dict, index: int) -> Example:
    question = get_text(row, "question", "input")
    if row.get("choices") is None and all(k in row for k in LETTERS):
      choices = [row[k] for k in LETTERS]
    else:
      _, choices = get_field(row, "choices")
    if (not isinstance(choices, (list, tuple)) or len(choices) != 4
        or not all(isinstance(c, str) for c in choices)):
      raise RecordError(f"'choices' must be a list of 4 strings, got {choices!r:.80}")
    name, raw = get_field(row, "answer", "target", "label")
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= 3:
      answer = LETTERS[raw]
    elif isinstance(raw, str) and raw.strip().upper() in tuple(LETTERS):
      answer = raw.strip().upper()
    elif isinstance(raw, str) and raw.strip() in ("0", "1", "2", "3"):
      answer = LETTERS[int(raw)]
    else:
      raise RecordError(f"field {name!r} must be an index 0-3 or a letter A-D, got {raw!r:.40}")
    meta = {"choices": list(choices)}
    meta.update({k: v for k, v in row.items()
                 if k not in ("question", "input", "choices", "answer", "target", "label", "id")
                 and k not in LETTERS})
    return Example(self.example_id(row, index), question, answer, None, meta)

  def user_message(self, example: Example) -> str:
    subject = str(example.meta.get("subject") or "").replace("_", " ").strip()
    head = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    options = "\n".join(f"{l}. {c}" for l, c in zip(LETTERS, example.meta["choices"]))
    return f"{head}{example.question.strip()}\n\n{options}\n\n{self.instruction}"

  def reference_response(self, example: Example) -> str:
    return f"The answer is ({example.answer})."

  def extract_answer(self, response_text: str) -> str | None:
    text = answers.final_section(response_text)
    found = []  # (position, letter); the last explicit choice wins
    for pos, content in answers.boxed_with_positions(text):
      found.append((pos, _letter_of(content)))
    for pos, rest in answers.answer_statements(text):
      found.append((pos, _letter_of(rest)))
    for m in _BOLD.finditer(text):
      line_start = text.rfind("\n", 0, m.start()) + 1
      line_end = len(text) if text.find("\n", m.end()) < 0 else text.find("\n", m.end())
      # "- **A.** The first arch forms..." labels an option in a list; it is not a choice
      if not (_LIST_ITEM.fullmatch(text[line_start:m.start()])
              and re.search(r"\w", text[m.end():line_end])):
        found.append((m.start(), m.group(1)))
    found.extend((m.start(), m.group(1)) for m in _IS_CORRECT.finditer(text))
    lines = [(m.start(), m.group(0).strip("#>*_ \t"))
             for m in re.finditer(r"[^\n]+", text) if m.group(0).strip()]
    if lines:
      # a last line "B" or "B) Nitrogen" is a choice, unless it ends a listing of the options
      pos, line = lines[-1]
      listing = len(lines) > 1 and _letter_of(lines[-2][1]) not in (None, _letter_of(line))
      if re.fullmatch(r"\(?[A-D]\)?\.?", line) or not listing:
        found.append((pos, _letter_of(line)))
    found = [(pos, letter) for pos, letter in found if letter]
    return max(found)[1] if found else None

  def is_correct(self, predicted: str, example: Example) -> bool:
    return predicted == example.answer
