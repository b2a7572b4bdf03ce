"""Answer extraction and comparison shared by the verifiers (pure string functions, no sympy).

Every verifier first keeps the *final* section of a response (``final_section``: the text
after Qwen3's thinking block), so an answer tried in the thinking never counts.
"""

from __future__ import annotations

import re
from fractions import Fraction

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def final_section(text: str) -> str:
  """The text after the last ``</think>``, cut before any ``<think>`` still open.

  A response whose ``<think>`` never closes (cut off while thinking) has no final section
  (``""``). Decoded end-of-turn tokens are removed.
  """
  for tok in _END_TOKENS:
    text = text.replace(tok, "")
  close = text.rfind("</think>")
  rest = text[close + len("</think>"):] if close >= 0 else text
  open_ = rest.find("<think>")
  return (rest[:open_] if open_ >= 0 else rest).strip()


# ---------------------------------------------------------------------------------------
# \boxed{...}

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _closing_braces(text: str) -> dict[int, int]:
  """{position of '{': position of its matching '}'} in one pass; unclosed ones are absent.

  Escaped braces (``\\{``, ``\\}``, LaTeX set braces) do not count. One pass keeps a runaway
  response with thousands of unclosed ``\\boxed{`` linear, not quadratic.
  """
  pairs, stack, i = {}, [], 0
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2
      continue
    if c == "{":
      stack.append(i)
    elif c == "}" and stack:
      pairs[stack.pop()] = i
    i += 1
  return pairs


def boxed_answers(text: str) -> list[str]:
  """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x`` in order.

  Nested braces are matched (``\\boxed{\\frac{1}{2}}``); a group cut off before its closing
  brace is skipped.
  """
  return [content for _, content in boxed_with_positions(text)]


def boxed_with_positions(text: str) -> list[tuple[int, str]]:
  """(position, content) of every boxed answer, as ``boxed_answers``."""
  found, closing = [], None
  for m in _BOXED.finditer(text):
    i = m.end()
    while i < len(text) and text[i] in " \t":
      i += 1
    if i < len(text) and text[i] == "{":
      closing = _closing_braces(text) if closing is None else closing
      if i in closing:
        found.append((m.start(), text[i + 1:closing[i]].strip()))
    elif i > m.end():  # "\boxed 5": the argument is the next token
      token = re.match(r"[^\s$]+", text[i:])
      if token:
        found.append((m.start(), token.group(0).rstrip(".,;")))
  return found


def last_boxed(text: str) -> str | None:
  boxed = [b for b in boxed_answers(text) if b]
  return boxed[-1] if boxed else None


# "The answer is X", "Final answer: X", "**Answer:** X", '"answer": "X"' — the last such one.
_ANSWER_IS = re.compile(
    r"(?i:\b(?:final\s+answer|answer|correct\s+(?:option|choice))(?:\s+to\s+[^.:\n]{0,60}?)?"
    r"[\"']?\s*(?:\*\*)?\s*(?:is\b|would\s+be|should\s+be|=|:)\s*(?:\*\*)?:?)"
    r"[ \t]*(?P<rest>[^\n]*)")
_MATH_DELIMITED = re.compile(r"^(?:\$+|\\\(|\\\[)(.+?)(?:\$+|\\\)|\\\])")


def answer_statements(text: str) -> list[tuple[int, str]]:
  """(position, rest of the line) for each "answer is / answer:" statement in ``text``."""
  return [(m.start(), m.group("rest").strip()) for m in _ANSWER_IS.finditer(text)]


def last_answer_statement(text: str) -> str | None:
  """The rest of the line after the last "answer is" / "answer:" (sentence end cut).

  An answer in math delimiters (``$...$``, ``$$...$$``, ``\\(...\\)``) is what they enclose.
  """
  statements = [rest for _, rest in answer_statements(text) if rest]
  if not statements:
    return None
  rest = statements[-1]
  delimited = _MATH_DELIMITED.match(rest)
  if delimited:
    return delimited.group(1).strip() or None
  rest = re.sub(r"\.(\s.*)?$", "", rest)  # cut at the sentence end (not a decimal point)
  return rest.strip().strip("*").strip() or None


# ---------------------------------------------------------------------------------------
# Numbers

_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_NUMBER = re.compile(rf"^[+-]?(?:{_NUM})$")
_FRACTION = re.compile(rf"^([+-]?)\(?([+-]?(?:{_NUM}))\)?/\(?([+-]?(?:{_NUM}))\)?$")
_LATEX_FRAC = re.compile(rf"^([+-]?)\\frac\{{([+-]?(?:{_NUM}))\}}\{{([+-]?(?:{_NUM}))\}}$")
# A number in running text: no sign after a digit/letter ("5-3"), commas only in groups of 3.
_NUMBER_IN_TEXT = re.compile(rf"(?<![\w.])-?(?:{_NUM})|(?:{_NUM})")


def to_number(text: str) -> Fraction | None:
  """Exact value of a plain number, ``a/b`` or ``\\frac{a}{b}``; None for anything else.

  ``"1,000"`` (thousands groups) is 1000, ``"10.0"`` is 10, ``"0.5"`` equals ``"1/2"``.
  """
  s = text.strip().replace("\\!", "").replace("{,}", ",")
  if len(s) > 64:  # no answer is that long a number; keeps int() within Python's digit limit
    return None
  if _NUMBER.match(s):
    return Fraction(s.replace(",", ""))
  m = _FRACTION.match(s) or _LATEX_FRAC.match(s)
  if m:
    num, den = Fraction(m.group(2).replace(",", "")), Fraction(m.group(3).replace(",", ""))
    if den == 0:
      return None
    return -num / den if m.group(1) == "-" else num / den
  return None


def numbers_in(text: str) -> list[str]:
  """Every number written in ``text`` (thousands commas kept), in order."""
  return [m.group(0) for m in _NUMBER_IN_TEXT.finditer(text)]


def same_number(a: str, b: str) -> bool:
  x, y = to_number(a), to_number(b)
  return x is not None and y is not None and x == y


# ---------------------------------------------------------------------------------------
# LaTeX answers (MATH)

_REMOVE = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", r"\$", "$",
           r"\%", "%", "^{\\circ}", "^\\circ", "°")
# "5\text{ cm}^2", "5 \text{inches}": a space-led text, or words after a number, ending the answer
_UNIT_TEXT = re.compile(r"(?:\\(?:text|textbf|mbox|mathrm)\{\s+[^{}]*\}|(?<=[\d}])\s*"
                        r"\\(?:text|mbox|mathrm)\{[A-Za-z ]+\})(?:\^\{?\d\}?)?\s*\.?\s*$")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")


def normalize_latex(answer: str) -> str:
  """A canonical string for a LaTeX answer (after Hendrycks et al.'s MATH normaliser).

  Removes ``$``, ``\\left``/``\\right``, thin spaces, degrees, percent signs, unit texts
  (``\\text{ cm}``), a trailing period and a leading ``x =``; unwraps ``\\text{...}``; writes
  ``\\dfrac``/``\\tfrac`` as ``\\frac`` and ``\\frac12`` as ``\\frac{1}{2}``; drops spaces.
  """
  s = answer.strip()
  s = _UNIT_TEXT.sub("", s)
  s = _TEXT.sub(r"\1", s)
  for token in _REMOVE:
    s = s.replace(token, "")
  s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
  s = s.strip().rstrip(".").strip()
  lhs, eq, rhs = s.partition("=")
  if eq and "=" not in rhs and re.fullmatch(r"\s*\\?[A-Za-z]{1,2}\s*", lhs):
    s = rhs.strip()  # "x = 5" → "5" (a lone variable on the left)
  s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
  s = re.sub(r"\\frac\s*(\d)\s*(\{)", r"\\frac{\1}\2", s)
  s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
  number = to_number(s)  # before spaces go: "1, 000" is a list, "1,000" a number
  if number is not None:
    return _format_number(number)
  return re.sub(r"\s+", "", s)


def _format_number(x: Fraction) -> str:
  return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _split_top_level(s: str) -> list[str]:
  """Split on commas outside any brackets/braces."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(s):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(s[start:i])
      start = i + 1
  parts.append(s[start:])
  return parts


def _scalar_equal(a: str, b: str) -> bool:
  a, b = normalize_latex(a), normalize_latex(b)
  return a == b or same_number(a, b)


def math_equal(predicted: str, reference: str) -> bool:
  """Whether two LaTeX final answers are the same (deterministic; no symbolic algebra).

  Equal after ``normalize_latex``, or the same exact number (``0.5`` = ``\\frac{1}{2}`` =
  ``1/2``, ``10`` = ``10.0``, ``1,000`` = ``1000``). Tuples and intervals compare element by
  element with the same brackets; a bare comma list ("all solutions") and a set ``\\{...\\}``
  compare as multisets.
  """
  a, b = normalize_latex(predicted), normalize_latex(reference)
  if not a or not b:
    return False
  if a == b or same_number(a, b):
    return True
  if a.startswith("\\{") and a.endswith("\\}") and b.startswith("\\{") and b.endswith("\\}"):
    a, b = a[2:-2], b[2:-2]  # sets: compare as the bare lists below (any order)
    if a == b:
      return True
  brackets = "([", ")]"
  if (len(a) > 1 and len(b) > 1 and a[0] in brackets[0] and a[-1] in brackets[1]
      and (a[0], a[-1]) == (b[0], b[-1])):
    xs, ys = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
    return len(xs) == len(ys) > 1 and all(_scalar_equal(x, y) for x, y in zip(xs, ys))
  xs, ys = _split_top_level(a), _split_top_level(b)
  if len(xs) == len(ys) > 1:
    unmatched = list(ys)
    for x in xs:
      hit = next((i for i, y in enumerate(unmatched) if _scalar_equal(x, y)), None)
      if hit is None:
        return False
      unmatched.pop(hit)
    return True
  return False
