"""What every task shares: the Example record, the Task base class and the record readers.

A source is a local file (``.jsonl``, ``.json``, ``.parquet``), a directory of such files
(read in sorted order, as Hugging Face exports its shards), or ``hf:<dataset>[:<config>]:<split>``
read through the optional ``datasets`` library. Error messages number rows from 0 within their
file; an example without an id field is named ``"<task>-<i>"`` with ``i`` its place in the
whole source (the same number for a single file).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from gradalign_jax.models.tokenizer import chat_prompt
from gradalign_jax.rundir import sha256_file

_EXTENSIONS = (".jsonl", ".json", ".parquet")
_ID_FIELDS = ("id", "ID", "unique_id", "idx")
# Qwen3's recommended instruction for math answers
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class TaskDataError(ValueError):
  """A source that cannot be read or a record that does not fit the task's schema."""


class RecordError(TaskDataError):
  """Raised by ``Task.parse_record``; ``Task.load`` prefixes the file and row."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One question of a task.

  ``answer`` is the reference final answer as a string (``"yes"``, ``"B"``, ``"42"``, a LaTeX
  expression); ``solution`` is the dataset's worked solution where it has one (used as an
  in-context demonstration); ``meta`` holds the rest (passage, choices, subject, level...).
  """
  id: str
  question: str
  answer: str
  solution: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)


def get_field(row: dict, *names: str, required: bool = True) -> tuple[str | None, Any]:
  """(name, value) of the first of ``names`` present (and not None) in ``row``."""
  for name in names:
    if row.get(name) is not None:
      return name, row[name]
  if required:
    wanted = " or ".join(repr(n) for n in names)
    if any(n in row for n in names):
      raise RecordError(f"field {wanted} is null; fill it in or drop the record")
    raise RecordError(f"has no field {wanted} (fields: {sorted(row)}); is this the right task "
                      "for this file?")
  return None, None


def get_text(row: dict, *names: str) -> str:
  """A required non-empty string field."""
  name, value = get_field(row, *names)
  if not isinstance(value, str) or not value.strip():
    raise RecordError(f"field {name!r} must be a non-empty string, got {value!r:.80}")
  return value


class Task:
  """Base class: a loader, a prompt and a verifier for one dataset.

  Subclasses set ``name`` and ``instruction`` and implement ``parse_record``,
  ``user_message``, ``extract_answer`` and ``is_correct``; ``reference_response`` (the
  assistant turn of a demonstration) has a default built from the solution and the answer.
  """
  name: str = "task"
  instruction: str = ""

  # --- loading

  def load(self, source: str, limit: int | None = None) -> list[Example]:
    """Examples from a local file/directory or ``hf:<dataset>[:<config>]:<split>``."""
    if limit is not None and limit < 0:
      raise ValueError(f"limit must be >= 0 or None, got {limit}")
    examples = []
    # `row` (within its file) locates errors; `index` (within the source) makes default ids,
    # so the shards of a directory do not repeat "<task>-0".
    for index, (where, row_in_file, row) in enumerate(iter_records(source)):
      if limit is not None and len(examples) >= limit:
        break
      if not isinstance(row, dict):
        raise TaskDataError(f"{where} row {row_in_file}: expected a JSON object (a dict of "
                            f"fields), got {type(row).__name__}")
      try:
        examples.append(self.parse_record(row, index))
      except RecordError as e:
        raise TaskDataError(f"{where} row {row_in_file}: {e}") from None
    return examples

  def parse_record(self, row: dict, index: int) -> Example:
    """One Example from one raw row (``index``: its place in the source, from 0); raises
    RecordError naming the bad field."""
    raise NotImplementedError

  def example_id(self, row: dict, index: int) -> str:
    _, value = get_field(row, *_ID_FIELDS, required=False)
    return f"{self.name}-{index}" if value is None else str(value)

  # --- prompting

  def user_message(self, example: Example) -> str:
    """The user turn: the question and the instruction on the answer format."""
    raise NotImplementedError

  def reference_response(self, example: Example) -> str:
    """An assistant turn that answers ``example`` correctly in the format asked for."""
    answer = f"The final answer is $\\boxed{{{example.answer}}}$."
    return f"{example.solution.strip()}\n\n{answer}" if example.solution else answer

  def prompt(self, tokenizer, example: Example, enable_thinking: bool = True,
             demonstration: "Example | tuple[str, str] | list | None" = None,
             system: str | None = None) -> str:
    """The chat prompt text (Qwen3 template), ending where the assistant starts writing.

    ``demonstration`` is one earlier turn pair shown before the question, or a list of them
    (shown in order): an Example (its ``user_message`` and ``reference_response``) or a
    (user, assistant) pair of strings (``context_turn`` builds the teacher contexts' pairs).
    Qwen3's template drops thinking blocks from earlier assistant turns.
    """
    demos = demonstration if isinstance(demonstration, list) else (
        [] if demonstration is None else [demonstration])
    history = []
    for demo in demos:
      if isinstance(demo, Example):
        demo_user, demo_assistant = self.user_message(demo), self.reference_response(demo)
      elif isinstance(demo, tuple) and len(demo) == 2:
        demo_user, demo_assistant = demo
      else:
        raise TypeError("a demonstration must be an Example or a (user, assistant) tuple of "
                        f"strings, got {type(demo).__name__}")
      history += [{"role": "user", "content": demo_user},
                  {"role": "assistant", "content": demo_assistant}]
    return chat_prompt(tokenizer, self.user_message(example), system=system,
                       enable_thinking=enable_thinking, history=history or None)

  # --- teacher contexts (gradalign_jax/contexts.py)

  CONTEXT_KINDS = ("correct", "incorrect", "summary")

  def context_turn(self, example: Example, kind: str, text: str) -> tuple[str, str]:
    """The (user, assistant) turn pair that shows ``text`` about ``example`` as privileged
    context: a ``"correct"`` or ``"incorrect"`` worked solution, or a ``"summary"`` of a
    correct one. The user half says which it is; the assistant half is ``text``."""
    question = self.user_message(example)
    if kind == "correct":
      return question, text
    if kind == "incorrect":
      return ("Here is an incorrect solution to the following problem; its final answer is "
              f"wrong.\n\n{question}", text)
    if kind == "summary":
      return ("Summarize the key steps of a correct solution to the following problem.\n\n"
              f"{question}", text)
    raise ValueError(f"context kind {kind!r} is not one of {self.CONTEXT_KINDS}")

  def summary_request(self, solution: str) -> str:
    """The user message asking a model to summarise a worked solution (``self:summary``)."""
    return ("Summarize the key steps of the following solution in a few short sentences. "
            "Keep the final answer; do not solve the problem again.\n\n" + solution)

  # --- verifying

  def extract_answer(self, response_text: str) -> str | None:
    """The final answer the response gives (after any thinking block), or None."""
    raise NotImplementedError

  def is_correct(self, predicted: str, example: Example) -> bool:
    """Whether an extracted answer matches the reference."""
    raise NotImplementedError

  def verify(self, response_text: str, example: Example) -> bool:
    """Reward 1/0: the response's final answer matches the reference answer."""
    predicted = self.extract_answer(response_text)
    return predicted is not None and self.is_correct(predicted, example)

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------
# Reading records


def iter_records(source: str) -> Iterator[tuple[str, int, Any]]:
  """(where, row index, raw row) for every record of ``source``, lazily."""
  source = str(source)
  if source.startswith("hf:"):
    yield from _iter_hf(source)
    return
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(_EXTENSIONS))
    if not files:
      raise TaskDataError(f"directory {source!r} has no {'/'.join(_EXTENSIONS)} files; pass a "
                          "data file or the directory of a Hugging Face export")
    for f in files:
      yield from _iter_file(os.path.join(path, f))
    return
  if not os.path.isfile(path):
    raise TaskDataError(f"data source {source!r} is not a file or directory; pass a local "
                        ".jsonl/.json/.parquet path or 'hf:<dataset>[:<config>]:<split>'")
  yield from _iter_file(path)


def fingerprint_source(source: str) -> dict[str, str]:
  """What identifies a data source's content: {file: sha256} of a local file or of each file
  of a directory; a generated or ``hf:`` source is named only (a hub dataset changed upstream
  is not detected)."""
  path = os.path.expanduser(str(source))
  if str(source).startswith("hf:") or not os.path.exists(path):
    return {"source": str(source)}
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(_EXTENSIONS)]
  else:
    files = [path]
  return {os.path.abspath(f): sha256_file(f)[:16] for f in files}


def _iter_file(path: str) -> Iterator[tuple[str, int, Any]]:
  where = os.path.basename(path)
  if path.endswith(".jsonl"):
    rows = _read_jsonl(path, where)
  elif path.endswith(".json"):
    rows = _read_json(path, where)
  elif path.endswith(".parquet"):
    rows = _read_parquet(path, where)
  else:
    raise TaskDataError(f"{path}: unknown extension; convert it to .jsonl, .json or .parquet "
                        "(the formats Hugging Face datasets export)")
  for index, row in enumerate(rows):
    yield where, index, row


def _decode(raw: bytes, where: str, first_line: int = 1) -> str:
  """UTF-8 text of ``raw`` (lines numbered from ``first_line``), or an error naming the line."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = first_line + raw.count(b"\n", 0, e.start)
    col = e.start - raw.rfind(b"\n", 0, e.start)
    raise TaskDataError(f"{where} line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                        f"column {col}); save the file as UTF-8") from None


def _read_jsonl(path: str, where: str) -> Iterator[Any]:
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      line = _decode(raw, where, line_no)
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError as e:
          raise TaskDataError(f"{where} line {line_no}: not valid JSON ({e.msg}); each line of "
                              "a .jsonl file must be one JSON object") from None


def _read_json(path: str, where: str) -> list:
  with open(path, "rb") as f:
    text = _decode(f.read(), where)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":  # Dataset.to_json writes JSON lines even under a .json name
      return list(_read_jsonl(path, where))
    raise TaskDataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); fix the file or "
                        "export it again") from None
  if isinstance(data, dict):
    lists = [v for v in data.values() if isinstance(v, list)]
    if len(data) == 1 and lists:  # {"data": [...]} / {"rows": [...]}
      data = lists[0]
    elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
      keys = list(data)  # columnar: {"question": [...], "answer": [...]}
      data = [dict(zip(keys, values)) for values in zip(*data.values())]
    else:
      data = [data]
  if not isinstance(data, list):
    raise TaskDataError(f"{where}: expected a list of records, got {type(data).__name__}; "
                        "export as JSON records or JSON lines")
  return data


def _read_parquet(path: str, where: str) -> list:
  import pyarrow.parquet as pq

  try:
    return pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several types for a bad file
    raise TaskDataError(f"{where}: cannot read as parquet ({type(e).__name__}: {e}); check the "
                        "file or export it again") from None


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
  """'hf:<dataset>[:<config>]:<split>' → (dataset, config or None, split)."""
  parts = source[len("hf:"):].split(":")
  if len(parts) == 2 and all(parts):
    return parts[0], None, parts[1]
  if len(parts) == 3 and all(parts):
    return parts[0], parts[1], parts[2]
  raise TaskDataError(f"{source!r}: write a Hugging Face source as "
                      "'hf:<dataset>[:<config>]:<split>', e.g. 'hf:openai/gsm8k:main:test'")


def _iter_hf(source: str) -> Iterator[tuple[str, int, Any]]:
  dataset, config, split = parse_hf_source(source)
  try:
    import datasets  # optional: only for hf: sources
  except ImportError:
    raise TaskDataError(f"{source!r} needs the 'datasets' library, which is not installed; "
                        "pip install datasets (or gradalign_jax[datasets]) and be online, or "
                        "pass a local .jsonl/.json/.parquet export") from None
  try:
    rows = datasets.load_dataset(dataset, config, split=split)
  except Exception as e:  # offline, unknown dataset/config/split, gated dataset...
    raise TaskDataError(f"could not load {source!r} with datasets ({type(e).__name__}: {e}); "
                        "check the name, config and split and your connection, or pass a local "
                        "export") from None
  for index, row in enumerate(rows):
    yield source, index, row
