"""Task loaders (jsonl/json/parquet, malformed rows, hf: sources), Qwen3 prompts, verifiers."""

import importlib.util
import json
import os
import sys
import time
import types
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from gradalign_jax import tasks
from gradalign_jax.tasks import answers
from gradalign_jax.tasks.base import Example

# ---------------------------------------------------------------------------------------
# Rows in the usual Hugging Face export schemas

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>"
               "72 clips altogether in April and May.\n#### 72"},
    {"question": "A house costs $1,200 a month. How much is that over 10 years?",
     "answer": "12 * 10 = <<12*10=120>>120 months\n1200 * 120 = <<1200*120=144000>>144,000\n"
               "#### 144,000"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{1}{4}+\\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "We add: $\\frac{1}{4}+\\frac{1}{4}=\\frac{2}{4}=\\boxed{\\frac{1}{2}}$."},
    {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
     "solution": "We have $r = 3$ and $\\theta = \\frac{\\pi}{2}$, so the answer is "
                 "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus",
     "unique_id": "test/precalculus/807.json"},
]
AIME_ROWS = [
    {"ID": "2024-I-1", "Problem": "Every morning Aya goes for a 9-kilometer-long walk...",
     "Solution": "Solving gives $s = 2.5$, so the walk takes 204 minutes.", "Answer": 204},
    {"problem": "Find the remainder when $2^{2024}$ is divided by $1000$.", "answer": "016",
     "url": "https://artofproblemsolving.com/wiki"},
]
MMLU_ROWS = [
    {"question": "What is the embryological origin of the hyoid bone?",
     "subject": "anatomy", "choices": ["The first pharyngeal arch",
                                        "The first and second pharyngeal arches",
                                        "The second pharyngeal arch",
                                        "The second and third pharyngeal arches"], "answer": 3},
    {"question": "Which gas makes up most of Earth's atmosphere?", "subject": "astronomy",
     "choices": ["Oxygen", "Nitrogen", "Argon", "Carbon dioxide"], "answer": 1},
]
BOOLQ_ROWS = [
    {"question": "do iran and afghanistan speak the same language", "answer": True,
     "passage": "Persian, also known by its endonym Farsi, is spoken in Iran and Afghanistan."},
    {"question": "is the sun a planet", "idx": 7, "label": 0,
     "passage": "The Sun is the star at the center of the Solar System."},
]

# task → (rows, [(id, answer, solution-or-None)] expected)
LOADER_CASES = {
    "gsm8k": (GSM8K_ROWS, [("gsm8k-0", "72", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                                              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether"
                                              " in April and May."),
                           ("gsm8k-1", "144000", None)]),
    "math": (MATH_ROWS, [("math-0", "\\frac{1}{2}", MATH_ROWS[0]["solution"]),
                         ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)",
                          MATH_ROWS[1]["solution"])]),
    "aime": (AIME_ROWS, [("2024-I-1", "204", AIME_ROWS[0]["Solution"]), ("aime-1", "16", None)]),
    "mmlu": (MMLU_ROWS, [("mmlu-0", "D", None), ("mmlu-1", "B", None)]),
    "boolq": (BOOLQ_ROWS, [("boolq-0", "yes", None), ("7", "no", None)]),
}


def write_rows(path, rows, fmt):
  """Writes rows as a .jsonl / .json (records) / .parquet file; returns its path."""
  path = str(path)
  if fmt == "jsonl":
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  elif fmt == "json":
    with open(path, "w") as f:
      json.dump(rows, f)
  elif fmt == "parquet":  # one schema per file: absent fields become nulls, as in HF exports
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
  return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("name", list(LOADER_CASES))
def test_loader_formats(tmp_path, name, fmt):
  rows, expected = LOADER_CASES[name]
  examples = tasks.get_task(name).load(write_rows(tmp_path / f"{name}.{fmt}", rows, fmt))
  assert [(e.id, e.answer) for e in examples] == [(i, a) for i, a, _ in expected]
  for ex, row, (_, _, solution) in zip(examples, rows, expected):
    assert isinstance(ex, Example)
    assert ex.question == (row.get("question") or row.get("problem") or row.get("Problem"))
    if solution is not None:
      assert ex.solution == solution


def test_loader_meta_and_limit(tmp_path):
  math = tasks.get_task("math").load(write_rows(tmp_path / "m.jsonl", MATH_ROWS, "jsonl"))
  assert math[0].meta == {"level": "Level 1", "type": "Prealgebra"}
  assert math[1].meta == {"subject": "Precalculus"}
  mmlu = tasks.get_task("mmlu").load(write_rows(tmp_path / "q.jsonl", MMLU_ROWS, "jsonl"), limit=1)
  assert len(mmlu) == 1 and mmlu[0].meta["subject"] == "anatomy"
  assert mmlu[0].meta["choices"][3] == "The second and third pharyngeal arches"
  boolq = tasks.get_task("boolq").load(write_rows(tmp_path / "b.jsonl", BOOLQ_ROWS, "jsonl"))
  assert boolq[1].meta["passage"].startswith("The Sun")
  letters = [dict(MMLU_ROWS[1], answer=" b "),  # a letter, and lukaemon/mmlu's columns
             {"input": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "target": "B"}]
  mmlu = tasks.get_task("mmlu").load(write_rows(tmp_path / "l.json", letters, "json"))
  assert [e.answer for e in mmlu] == ["B", "B"]
  assert mmlu[1].meta == {"choices": ["3", "4", "5", "6"]}
  boolq = [dict(BOOLQ_ROWS[0], answer="False"), dict(BOOLQ_ROWS[0], answer=1)]
  assert [e.answer for e in tasks.get_task("boolq").load(write_rows(tmp_path / "b.json", boolq,
                                                                    "json"))] == ["no", "yes"]
  assert tasks.get_task("gsm8k").load(write_rows(tmp_path / "g.jsonl", GSM8K_ROWS, "jsonl"),
                                      limit=0) == []


def test_json_variants_and_shard_directory(tmp_path):
  task = tasks.get_task("gsm8k")
  # Dataset.to_json writes JSON lines under a .json name; pandas may write columns
  lines = write_rows(tmp_path / "lines.json", GSM8K_ROWS, "jsonl")
  columns = tmp_path / "columns.json"
  columns.write_text(json.dumps({k: [r[k] for r in GSM8K_ROWS] for k in ("question", "answer")}))
  wrapped = tmp_path / "wrapped.json"
  wrapped.write_text(json.dumps({"data": GSM8K_ROWS}))
  for path in (lines, columns, wrapped):
    assert [e.answer for e in task.load(str(path))] == ["72", "144000"]
  shards = tmp_path / "export"
  shards.mkdir()
  write_rows(shards / "test-00001-of-00002.parquet", GSM8K_ROWS[1:], "parquet")
  write_rows(shards / "test-00000-of-00002.parquet", GSM8K_ROWS[:1], "parquet")
  loaded = task.load(str(shards))
  assert [(e.id, e.answer) for e in loaded] == [("gsm8k-0", "72"), ("gsm8k-1", "144000")]
  write_rows(shards / "test-00001-of-00002.parquet", [{"question": "q"}], "parquet")
  with pytest.raises(tasks.TaskDataError, match=r"test-00001-of-00002\.parquet row 0: has no "
                                                r"field 'answer'"):
    task.load(str(shards))


# (task, fmt, rows, message regex)
MALFORMED_CASES = [
    ("gsm8k-no-hashes", "gsm8k", "jsonl",
     GSM8K_ROWS + [{"question": "q?", "answer": "It is 5."}],
     r"gsm8k\.jsonl row 2: field 'answer' has no '#### <number>' final answer"),
    ("gsm8k-hashes-not-number", "gsm8k", "json",
     [{"question": "q?", "answer": "so #### five"}],
     r"gsm8k\.json row 0: field 'answer' has no '#### <number>'"),
    ("gsm8k-missing-question", "gsm8k", "jsonl", [{"problem": "q?", "answer": "#### 5"}],
     r"gsm8k\.jsonl row 0: has no field 'question' \(fields: \['answer', 'problem'\]\)"),
    ("mmlu-three-choices", "mmlu", "parquet",
     [dict(MMLU_ROWS[0], choices=["a", "b", "c", "d"])] * 3
     + [dict(MMLU_ROWS[0], choices=["a", "b", "c"])],
     r"mmlu\.parquet row 3: 'choices' must be a list of 4 strings"),
    ("mmlu-answer-out-of-range", "mmlu", "jsonl", [dict(MMLU_ROWS[0], answer=4)],
     r"mmlu\.jsonl row 0: field 'answer' must be an index 0-3 or a letter A-D, got 4"),
    ("aime-not-integer", "aime", "jsonl", [dict(AIME_ROWS[1], answer="1/2")],
     r"aime\.jsonl row 0: field 'answer' must be an integer from 0 to 999"),
    ("aime-too-large", "aime", "json", [dict(AIME_ROWS[1], answer=1000)],
     r"aime\.json row 0: field 'answer' must be an integer from 0 to 999 \(AIME\), got 1000"),
    ("math-no-boxed", "math", "jsonl", [{"problem": "p", "solution": "It is 3."}],
     r"math\.jsonl row 0: field 'solution' has no \\boxed\{\} final answer"),
    ("math-empty-problem", "math", "parquet", [{"problem": " ", "solution": "\\boxed{1}"}],
     r"math\.parquet row 0: field 'problem' must be a non-empty string"),
    ("boolq-label-unlabelled", "boolq", "jsonl", [dict(BOOLQ_ROWS[1], label=-1)],
     r"boolq\.jsonl row 0: field 'label' is -1 \(an unlabelled test row\)"),
    ("boolq-answer-maybe", "boolq", "json", [dict(BOOLQ_ROWS[0], answer="maybe")],
     r"boolq\.json row 0: field 'answer' must be true/false"),
    ("not-a-record", "boolq", "json", [["a list", "not a dict"]],
     r"boolq\.json row 0: expected a JSON object"),
    ("null-field", "gsm8k", "jsonl", [GSM8K_ROWS[0], {"question": None, "answer": "#### 1"}],
     r"gsm8k\.jsonl row 1: field 'question' is null"),
    ("synthetic-not-a-chain", "synthetic", "jsonl", [{"question": "2+3"}, {"question": "two+3"}],
     r"synthetic\.jsonl row 1: field 'question' is 'two\+3', not a chain like '2-7\+2'"),
]


@pytest.mark.parametrize("name,fmt,rows,message", [c[1:] for c in MALFORMED_CASES],
                         ids=[c[0] for c in MALFORMED_CASES])
def test_malformed_records(tmp_path, name, fmt, rows, message):
  path = write_rows(tmp_path / f"{name}.{fmt}", rows, fmt)
  with pytest.raises(tasks.TaskDataError, match=message):
    tasks.get_task(name).load(path)


def test_bad_sources(tmp_path):
  task = tasks.get_task("gsm8k")
  with pytest.raises(tasks.TaskDataError, match="is not a file or directory; pass a local"):
    task.load(str(tmp_path / "missing.jsonl"))
  (tmp_path / "data.csv").write_text("question,answer\n")
  with pytest.raises(tasks.TaskDataError, match="unknown extension; convert it to .jsonl"):
    task.load(str(tmp_path / "data.csv"))
  (tmp_path / "broken.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n{not json\n")
  with pytest.raises(tasks.TaskDataError, match=r"broken\.jsonl line 3: not valid JSON"):
    task.load(str(tmp_path / "broken.jsonl"))
  (tmp_path / "bad.parquet").write_bytes(b"not parquet")
  with pytest.raises(tasks.TaskDataError, match=r"bad\.parquet: cannot read as parquet"):
    task.load(str(tmp_path / "bad.parquet"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(tasks.TaskDataError, match="has no .jsonl/.json/.parquet files"):
    task.load(str(tmp_path / "empty"))
  with pytest.raises(tasks.TaskDataError, match=r"hf:<dataset>\[:<config>\]:<split>"):
    task.load("hf:openai/gsm8k")


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_data_not_utf8(tmp_path, fmt):
  path = tmp_path / f"latin1.{fmt}"
  rows = [json.dumps(r, ensure_ascii=False) for r in GSM8K_ROWS[:1] + [{"question": "café?",
                                                                        "answer": "#### 1"}]]
  path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
  with pytest.raises(tasks.TaskDataError, match=rf"latin1\.{fmt} line 2: not UTF-8 text \(byte "
                     r"0xe9 at column 18\); save the file as UTF-8"):
    tasks.get_task("gsm8k").load(str(path))


def test_fingerprint_source(tmp_path):
  from gradalign_jax.tasks.base import fingerprint_source
  path = write_rows(tmp_path / "q.jsonl", GSM8K_ROWS, "jsonl")
  first = fingerprint_source(path)
  assert fingerprint_source(path) == first and list(first) == [os.path.abspath(path)]
  write_rows(tmp_path / "q.jsonl", GSM8K_ROWS[:1], "jsonl")
  assert fingerprint_source(path) != first
  assert fingerprint_source("synthetic:seed=1,n=4") == {"source": "synthetic:seed=1,n=4"}


def test_hf_source_without_datasets(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
  with pytest.raises(tasks.TaskDataError,
                     match="needs the 'datasets' library.*pip install datasets"):
    tasks.get_task("gsm8k").load("hf:openai/gsm8k:main:test")


def test_hf_source_with_datasets(monkeypatch):
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    if name == "offline/none":
      raise ConnectionError("no network")
    return list(MMLU_ROWS)

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  examples = tasks.get_task("mmlu").load("hf:cais/mmlu:all:test", limit=1)
  assert [e.answer for e in examples] == ["D"]
  tasks.get_task("mmlu").load("hf:cais/mmlu:test")
  assert calls == [("cais/mmlu", "all", "test"), ("cais/mmlu", None, "test")]
  with pytest.raises(tasks.TaskDataError,
                     match="could not load 'hf:offline/none:test'.*no network"):
    tasks.get_task("mmlu").load("hf:offline/none:test")


def test_registry():
  assert set(tasks.TASK_NAMES) == {"boolq", "mmlu", "aime", "gsm8k", "math", "synthetic"}
  assert tasks.get_task("GSM8K").name == "gsm8k"
  with pytest.raises(ValueError, match="unknown task 'gsm9k'; valid names: boolq, mmlu"):
    tasks.get_task("gsm9k")
  if importlib.util.find_spec("gradalign_jax.tasks.synthetic") is None:
    with pytest.raises(ValueError, match="registered as gradalign_jax.tasks.synthetic"):
      tasks.get_task("synthetic")


@pytest.mark.parametrize("name", list(LOADER_CASES))
def test_reference_response_verifies(tmp_path, name):
  rows, _ = LOADER_CASES[name]
  task = tasks.get_task(name)
  for ex in task.load(write_rows(tmp_path / "rows.jsonl", rows, "jsonl")):
    assert task.verify(task.reference_response(ex), ex), ex.id
    assert task.verify("<think>\nLet me see.\n</think>\n\n" + task.reference_response(ex), ex)


# ---------------------------------------------------------------------------------------
# Shared answer functions

THINK = "<think>\nOkay, let me work through this. Maybe \\boxed{7}? The answer is 7.\n</think>\n\n"


@pytest.mark.parametrize("text,expected", [
    ("plain answer", "plain answer"),
    (THINK + "Final: 9", "Final: 9"),
    ("<think>\nstill thinking, \\boxed{3}", ""),
    ("</think>\n\nafter a prefilled think", "after a prefilled think"),
    ("<think>\n\n</think>\n\n42<|im_end|>", "42"),
], ids=["no-think", "closed", "unterminated", "close-only", "empty-think-and-eos"])
def test_final_section(text, expected):
  assert answers.final_section(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", ["\\frac{1}{2}"]),
    ("first \\boxed{3} then \\boxed{4}", ["3", "4"]),
    ("\\boxed 5.", ["5"]),
    ("\\fbox{12} and \\boxed {x^{2}}", ["12", "x^{2}"]),
    ("the set $\\boxed{\\{1, 2\\}}$", ["\\{1, 2\\}"]),
    ("cut off \\boxed{\\frac{1}{2}", []),
    ("\\boxedfoo{3}", []),
], ids=["nested", "several", "no-braces", "fbox-and-space", "escaped-braces", "unclosed",
        "not-a-command"])
def test_boxed_answers(text, expected):
  assert answers.boxed_answers(text) == expected


@pytest.mark.parametrize("a,b,equal", [
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\dfrac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("10", "10.0", True),
    ("1,000", "1000", True),
    ("1,\\!000", "1000", True),
    ("$x = 5$", "5", True),
    ("90^\\circ", "90", True),
    ("12\\text{ cm}", "12", True),
    ("12 \\text{cm}^2", "12", True),
    ("\\text{(C)}", "(C)", True),
    ("\\text{east}", "\\text{west}", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("(3, 0.5)", "(3, \\frac{1}{2})", True),
    ("[2, 5)", "[2,5)", True),
    ("[2, 5)", "(2, 5)", False),
    ("(1, 2)", "(2, 1)", False),
    ("3, -1", "-1, 3", True),
    ("\\text{Monday}", "Monday", True),
    ("2\\sqrt{3}", "2\\sqrt3", True),
    ("50\\%", "50", True),
    ("\\frac{1}{3}", "0.33", False),
    ("\\{1, 2\\}", "\\{2,1\\}", True),
    ("\\{1, 2\\}", "\\{2,3\\}", False),
    ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}", False),
    ("", "0", False),
], ids=lambda v: str(v))
def test_math_equal(a, b, equal):
  assert answers.math_equal(a, b) is equal
  assert answers.math_equal(b, a) is equal


# ---------------------------------------------------------------------------------------
# Verifiers on realistic responses: (case id, response, reference answer, expected reward)

def _ex(answer, **meta):
  return Example(id="t", question="q", answer=answer, solution=None, meta=meta)


GSM8K_VERIFY = [
    ("boxed", "She sold 48 + 24 = 72 clips.\n\nThe final answer is $\\boxed{72}$.", "72", True),
    ("thinking-then-boxed", THINK + "48 + 24 = 72, so \\boxed{72}", "72", True),
    ("answer-only-in-thinking", "<think>\nIt is 72.\n</think>\n\nI am not sure.", "72", False),
    ("unterminated-thinking", "<think>\n48 + 24 = 72 so the answer is 72", "72", False),
    ("several-boxed-last-wins", "At first \\boxed{70}, but recounting gives \\boxed{72}.", "72",
     True),
    ("several-boxed-wrong-last", "\\boxed{72} ... no wait, \\boxed{70}.", "72", False),
    ("commas-and-dollars", "Total cost: 1,200 * 120 = $144,000.", "144000", True),
    ("boxed-with-dollar-and-unit", "\\boxed{\\$144,000 \\text{ dollars}}", "144000", True),
    ("hashes", "24 + 48 = 72\n#### 72", "72", True),
    ("qwen-final-answer-block", "**Final Answer**\n\\[\n\\boxed{72}\n\\]", "72", True),
    ("answer-colon-dollar", "The answer is: $72", "72", True),
    ("boxed-fraction", "\\boxed{\\frac{3}{4}}", "0.75", True),
    ("answer-is-then-trailing-number", "The answer is 72. Check step 2 again if unsure.", "72",
     True),
    ("last-number", "In May she sold 24, so altogether 72", "72", True),
    ("decimal-equal", "The answer is 72.0", "72", True),
    ("answer-isnt", "The answer isn't 70; adding again gives 72.", "72", True),
    ("negative", "The temperature drops to -5 degrees.", "-5", True),
    ("wrong", "She sold 48 + 24 = 70 clips.", "72", False),
    ("empty", "", "72", False),
]

MATH_VERIFY = [
    ("boxed-frac", "Adding gives $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
    ("boxed-decimal", THINK + "So the answer is $\\boxed{0.5}$.", "\\frac{1}{2}", True),
    ("dfrac", "\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("tuple-left-right", "The point is $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.",
     "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("tuple-wrong", "$\\boxed{(3, \\pi)}$", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("several-boxed-last-wins", "Try \\boxed{2}; correcting the sign, \\boxed{-2}.", "-2", True),
    ("boxed-in-thinking-only", "<think>\n\\boxed{5}\n</think>\n\nThe answer is 6.", "5", False),
    ("answer-is-fallback", "Therefore, the final answer is $\\frac{1}{2}$. I hope it is correct.",
     "\\frac{1}{2}", True),
    ("answer-is-display-math", "The answer is $$\\frac12$$", "\\frac{1}{2}", True),
    ("answer-is-paren-math", "The answer is \\(0.5\\).", "\\frac{1}{2}", True),
    ("trailing-text", "\\boxed{x = 3}\n\nLet me know if you want more detail on step 2.", "3",
     True),
    ("degrees", "\\boxed{30^\\circ}", "30", True),
    ("units", "\\boxed{12\\text{ cm}^2}", "12", True),
    ("thousands", "\\boxed{1,\\!000}", "1000", True),
    ("qwen-final-answer-block", "**Final Answer**\n\\[\n\\boxed{\\frac{\\sqrt{3}}{2}}\n\\]",
     "\\frac{\\sqrt3}{2}", True),
    ("set-any-order", "The solutions are $\\boxed{\\{3, -1\\}}$.", "\\{-1,3\\}", True),
    ("interval", "\\boxed{[2, 5)}", "[2,5)", True),
    ("interval-wrong-bracket", "\\boxed{[2, 5]}", "[2,5)", False),
    ("wrong", "\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("no-answer", "We need more information.", "\\frac{1}{2}", False),
]

AIME_VERIFY = [
    ("boxed", "Thus $s = 2.5$ and the walk takes $\\boxed{204}$ minutes.", "204", True),
    ("leading-zeros", "The answer is $\\boxed{016}$.", "16", True),
    ("answer-is", THINK + "So the answer is 204.", "204", True),
    ("last-integer", "Adding up, the total is 204", "204", True),
    ("several-boxed", "\\boxed{200}\n\nWait, I forgot the coffee shop: \\boxed{204}", "204", True),
    ("boxed-not-integer", "\\boxed{204.5}", "204", False),
    ("qwen-final-answer-block", "**Final Answer**\n\\[\n\\boxed{033}\n\\]", "33", True),
    ("bold-answer", "Hence the answer is **204**.", "204", True),
    ("boxed-equation", "$\\boxed{m+n=204}$", "204", True),
    ("decimal-not-integer", "The answer is 204.5", "204", False),
    ("thinking-only", "<think>\nThe answer is 204.\n</think>\n\nThe answer is 240.", "204", False),
    ("unterminated", "<think>\nThe answer is 204", "204", False),
    ("out-of-range", "\\boxed{1204}", "204", False),
]

MMLU_VERIFY = [
    ("answer-is-paren", "The hyoid comes from the second and third arches.\n\nThe answer is (D).",
     "D", True),
    ("answer-colon", "Answer: B", "B", True),
    ("answer-bold", "**Answer:** B) Nitrogen", "B", True),
    ("boxed", "Nitrogen is 78% of the atmosphere, so $\\boxed{B}$.", "B", True),
    ("boxed-text", "$\\boxed{\\text{(B)}}$", "B", True),
    ("bold-letter", "The correct choice is therefore **B**.", "B", True),
    ("bold-letter-with-text", "**B. Nitrogen**", "B", True),
    ("bold-answer-line", "**Answer: B**", "B", True),
    ("answer-is-then-comma", "The answer is B, not A.", "B", True),
    ("letter-is-correct", "Oxygen is only 21%, so I think B is correct.", "B", True),
    ("letter-is-incorrect", "A is incorrect.", "A", False),
    ("answer-is-text-then-letter", "The answer is Nitrogen (B).", "B", True),
    ("json-answer-field", '{"answer": "B"}', "B", True),
    ("qwen-thinking-then-bold-option-list",
     "<think>\nThe hyoid... I think it's C? No, second and third arches. So D.\n</think>\n\n"
     "The hyoid bone develops from the **second and third pharyngeal arches**.\n\n"
     "**Answer: D**\n\n**Why not the others:**\n"
     "- **A.** The first arch forms the mandible and malleus.\n"
     "- **B.** The first and second arches contribute to the ear ossicles.\n"
     "- **C.** The second arch alone forms only the lesser horns.", "D", True),
    ("bold-answer-then-explanation-with-letter",
     "The correct answer is **D. The second and third pharyngeal arches**.\n\n"
     "**Explanation:** The second arch (C) gives the lesser horns.", "D", True),
    ("bold-letter-is-correct", "**B** is correct: nitrogen is 78%.", "B", True),
    ("bold-letter-first-line", "**B**\n\nNitrogen makes up 78% of the atmosphere.", "B", True),
    ("ends-with-option-listing", "Check each:\nA. Oxygen: 21%\nB. Nitrogen: 78%\nC. Argon\nD. CO2",
     "D", False),
    ("bare-letter-after-listing", "Check each:\nA. Oxygen: 21%\nB. Nitrogen: 78%\n\nB", "B", True),
    ("last-line-letter-paren", "Oxygen is 21%.\nNitrogen is 78%.\n\nB) Nitrogen", "B", True),
    ("last-line-bare", "B", "B", True),
    ("last-explicit-wins", "The answer is (A).\n\nWait, recheck: the answer is (B).", "B", True),
    ("thinking-answer-ignored", "<think>\nThe answer is (A).\n</think>\n\nThe answer is (B).",
     "A", False),
    ("trailing-text", "The answer is (B). Nitrogen dominates because it is inert.", "B", True),
    ("bare-letter-mid-sentence", "A good approach is to recall the composition of air.", "A",
     False),
    ("options-listed-no-choice", "A. Oxygen is 21%\nB. Nitrogen is 78%\nThey are both gases.",
     "B", False),
    ("answer-is-not", "The answer is not A.", "A", False),
    ("answer-is-not-paren", "The answer is not (A).", "A", False),
    ("unterminated", "<think>\nThe answer is (B)", "B", False),
    ("wrong", "The answer is (C).", "B", False),
]

BOOLQ_VERIFY = [
    ("yes", "Yes", "yes", True),
    ("leading-yes-then-no-word", "Yes, there is no doubt: both countries speak Persian.", "yes",
     True),
    ("thinking-then-no", "<think>\nYes? The passage says... actually no.\n</think>\n\nNo.", "no",
     True),
    ("thinking-answer-ignored", "<think>\nThe answer is yes.\n</think>\n\nNo.", "yes", False),
    ("answer-is", "Based on the passage, the answer is: **False**.", "no", True),
    ("bold", "Both speak dialects of Persian, so **Yes**.", "yes", True),
    ("last-word-wins", "The passage says Persian is spoken in both countries, so yes", "yes",
     True),
    ("boxed", "\\boxed{\\text{No}}", "no", True),
    ("true-case-insensitive", "TRUE", "yes", True),
    ("answer-bold-no", "Answer: **No**", "no", True),
    ("not-sure", "I'm not sure.", "yes", False),
    ("not-sure-no-reference", "I'm not sure.", "no", False),
    ("nobody-is-not-no", "Nobody knows.", "no", False),
    ("unterminated", "<think>\nyes", "yes", False),
    ("wrong", "No, the Sun is a star.", "yes", False),
]


@pytest.mark.parametrize("task_name,response,answer,expected", [
    pytest.param(name, r, a, e, id=f"{name}-{cid}")
    for name, table in [("gsm8k", GSM8K_VERIFY), ("math", MATH_VERIFY), ("aime", AIME_VERIFY),
                        ("mmlu", MMLU_VERIFY), ("boolq", BOOLQ_VERIFY)]
    for cid, r, a, e in table])
def test_verify(task_name, response, answer, expected):
  assert tasks.get_task(task_name).verify(response, _ex(answer)) is expected


# ---------------------------------------------------------------------------------------
# Prompts with the real Qwen3 tokenizer




def _user(text):
  return f"<|im_start|>user\n{text}<|im_end|>\n"


@pytest.mark.parametrize("thinking,tail", [
    (True, "<|im_start|>assistant\n"),
    (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
], ids=["thinking", "no-thinking"])
@pytest.mark.parametrize("name", list(LOADER_CASES))
def test_prompt_markup(qwen_tok, tmp_path, name, thinking, tail):
  task = tasks.get_task(name)
  ex = task.load(write_rows(tmp_path / "rows.jsonl", LOADER_CASES[name][0], "jsonl"))[0]
  text = task.prompt(qwen_tok, ex, enable_thinking=thinking)
  user = task.user_message(ex)
  assert text == _user(user) + tail
  assert task.instruction in user
  question = ex.question.strip()
  assert (question[0].upper() + question[1:]) in user


def test_prompt_contents_and_demonstration(qwen_tok, tmp_path):
  mmlu = tasks.get_task("mmlu")
  q, demo = mmlu.load(write_rows(tmp_path / "m.jsonl", MMLU_ROWS, "jsonl"))
  assert mmlu.user_message(q) == (
      "The following is a multiple choice question about anatomy.\n\n"
      "What is the embryological origin of the hyoid bone?\n\n"
      "A. The first pharyngeal arch\nB. The first and second pharyngeal arches\n"
      "C. The second pharyngeal arch\nD. The second and third pharyngeal arches\n\n"
      'Answer with the letter of the correct choice: end your response with '
      '"The answer is (X)", where X is A, B, C or D.')
  text = mmlu.prompt(qwen_tok, q, enable_thinking=False, demonstration=demo)
  assert text == (_user(mmlu.user_message(demo))
                  + "<|im_start|>assistant\nThe answer is (B).<|im_end|>\n"
                  + _user(mmlu.user_message(q))
                  + "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  gsm = tasks.get_task("gsm8k")
  ex, demo = gsm.load(write_rows(tmp_path / "g.jsonl", GSM8K_ROWS, "jsonl"))
  text = gsm.prompt(qwen_tok, ex, demonstration=demo)
  assert "<<" not in text and "144,000\n\nThe final answer is $\\boxed{144000}$." in text
  assert text.endswith("Please reason step by step, and put your final answer within "
                       "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
  pair = gsm.prompt(qwen_tok, ex, demonstration=("What is 1+1?", "\\boxed{2}"), system="Be brief.")
  assert pair.startswith("<|im_start|>system\nBe brief.<|im_end|>\n" + _user("What is 1+1?")
                         + "<|im_start|>assistant\n\\boxed{2}<|im_end|>\n")
  boolq = tasks.get_task("boolq")
  ex = boolq.load(write_rows(tmp_path / "b.jsonl", BOOLQ_ROWS, "jsonl"))[0]
  assert boolq.user_message(ex) == (
      "Passage: Persian, also known by its endonym Farsi, is spoken in Iran and Afghanistan.\n\n"
      "Question: Do iran and afghanistan speak the same language?\n\nAnswer with yes or no.")


# ---------------------------------------------------------------------------------------
# Properties (hypothesis): numbers however written, and symmetry of math_equal

ANSWER_POOL = ["\\frac{1}{2}", "0.5", "1/2", "10", "10.0", "1,000", "1000", "(1,2)", "(2,1)",
               "[1,2)", "3,-1", "-1,3", "\\sqrt{3}", "2\\sqrt3", "x=5", "5", "\\text{B}", "B",
               "90^\\circ", "\\{1,2\\}", "\\{2,1\\}", "\\frac{\\pi}{2}", ""]


@settings(max_examples=60, deadline=None)
@given(st.integers(-10**7, 10**7), st.sampled_from(["\\boxed{{{}}}", "The answer is ${}.",
                                                     "#### {}", "So she pays {} in total"]))
def test_gsm8k_number_formats(n, template):
  task = tasks.get_task("gsm8k")
  ex = task.parse_record({"question": "q", "answer": f"steps\n#### {n:,}"}, 0)
  assert ex.answer == str(n)
  assert task.verify(template.format(f"{n:,}"), ex)
  assert task.verify(template.format(str(n)), ex)
  assert not task.verify(template.format(str(n + 1)), ex)


@settings(max_examples=60, deadline=None)
@given(st.integers(-999, 999), st.integers(1, 999))
def test_fraction_forms(p, q):
  x = Fraction(p, q)
  for text in (f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"):
    assert answers.to_number(answers.normalize_latex(text)) == x
    assert answers.math_equal(text, f"{x.numerator}/{x.denominator}")
  if all(f in (2, 5) for f in _prime_factors(x.denominator)):
    assert answers.math_equal(f"\\frac{{{p}}}{{{q}}}", str(float(x)))


def _prime_factors(n):
  out, f = [], 2
  while n > 1:
    while n % f == 0:
      out.append(f)
      n //= f
    f += 1
  return out


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ANSWER_POOL), st.sampled_from(ANSWER_POOL))
def test_math_equal_symmetric(a, b):
  assert answers.math_equal(a, b) == answers.math_equal(b, a)
  assert answers.math_equal(a, a) == bool(a)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 999), st.sampled_from(["{:03d}", "{}"]))
def test_aime_leading_zeros(n, fmt):
  ex = tasks.get_task("aime").parse_record({"problem": "p", "answer": fmt.format(n)}, 0)
  assert ex.answer == str(n)
  assert tasks.get_task("aime").verify(f"$\\boxed{{{n:03d}}}$", ex)
  assert not tasks.get_task("aime").verify(f"$\\boxed{{{n + 1}}}$", ex)


@pytest.mark.parametrize("name", ["gsm8k", "math", "aime", "mmlu", "boolq"])
def test_runaway_responses(name):
  """Repetition loops of small models: no crash, no quadratic scan, no answer found."""
  task = tasks.get_task(name)
  ex = _ex({"gsm8k": "72", "math": "72", "aime": "72", "mmlu": "B", "boolq": "yes"}[name])
  start = time.perf_counter()
  assert not task.verify("<think>ok</think>\n" + "\\boxed{" * 5000, ex)
  assert not task.verify("The answer is " + "7" * 5000, ex)  # past int()'s digit limit
  assert time.perf_counter() - start < 5.0
