"""A synthetic reasoning task that tiny Qwen3 models can learn: chains of arithmetic mod 10.

Question ``3+4*2-5+7``: apply the operations left to right, modulo 10. The worked solution
writes one step per line and ends with the final answer after ``#``::

    3+4=7
    7*2=4
    4-5=9
    9+7=6
    #6

Every intermediate result is a token the model must get right, so errors compound along the
chain (longer questions are harder) and rollouts branch into correct and incorrect ones at
identifiable steps: what the diagnostic needs. A prompt can carry a solved demonstration as
an earlier chat turn (the same question — privileged information — or another one).

The bundled toy models use a character-level tokenizer in Hugging Face layout
(``write_tokenizer``) with Qwen3's chat markup (``<|im_start|>``, ``<|im_end|>`` as EOS,
``<think></think>``), so they run through exactly the code paths of real Qwen3 checkpoints.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from gradalign_jax.tasks.answers import final_section
from gradalign_jax.tasks.base import Example, RecordError, Task, get_text

MODULUS = 10
OPS = "+-*"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHARS = "0123456789+-*=#?:. \n" + "abcdefghijklmnopqrstuvwxyz"
# Qwen3's chat markup, reduced to what the toy models use: system/user/assistant turns and
# the empty think block that enable_thinking=False pre-fills.
CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def solve(start: int, steps: list[tuple[str, int]]) -> tuple[str, int]:
  """The worked solution text and the final answer of a chain."""
  lines, x = [], start
  for op, y in steps:
    z = {"+": x + y, "-": x - y, "*": x * y}[op] % MODULUS
    lines.append(f"{x}{op}{y}={z}")
    x = z
  return "\n".join(lines) + f"\n#{x}", x


def make_example(rng: np.random.Generator, n_steps: int, ex_id: str) -> Example:
  start = int(rng.integers(MODULUS))
  steps = [(OPS[int(rng.integers(len(OPS)))], int(rng.integers(MODULUS))) for _ in range(n_steps)]
  question = f"{start}" + "".join(f"{op}{y}" for op, y in steps)
  solution, answer = solve(start, steps)
  return Example(id=ex_id, question=question, answer=str(answer), solution=solution,
                 meta={"steps": n_steps})


def summarize(solution: str) -> str:
  """The toy summary of a worked solution: its step results in order, e.g. ``7 4 9 #6``
  (what ``summary_request`` teaches the toy models to write)."""
  results = re.findall(r"=(\d)", solution)
  final = re.findall(r"#(\d+)", solution)
  return " ".join(results + [f"#{final[-1]}"] if final else results)


def wrong_solution(example: Example, rng: np.random.Generator) -> str:
  """A plausible worked solution with one wrong step (errors propagate), for demonstrations."""
  start = int(example.question[0])
  steps = [(m[0], int(m[1])) for m in re.findall(r"([+\-*])(\d)", example.question)]
  bad = int(rng.integers(len(steps)))
  lines, x = [], start
  for i, (op, y) in enumerate(steps):
    z = {"+": x + y, "-": x - y, "*": x * y}[op] % MODULUS
    if i == bad:
      z = (z + 1 + int(rng.integers(MODULUS - 1))) % MODULUS
    lines.append(f"{x}{op}{y}={z}")
    x = z
  return "\n".join(lines) + f"\n#{x}"


class SyntheticTask(Task):
  """Chains of 2–5 operations mod 10. Sources: ``synthetic`` or ``synthetic:seed=S,n=N``
  (generated; a file in the Example schema with question/answer/solution also loads).

  The user turn is the bare question (the toy models know no instruction text) and the
  assistant's reference response is the worked solution. Prompts default to thinking off,
  as the toy models were trained.
  """

  name = "synthetic"

  def __init__(self, min_steps: int = 2, max_steps: int = 5):
    self.min_steps, self.max_steps = min_steps, max_steps

  def generate(self, n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng([seed, 7919])
    return [make_example(rng, int(rng.integers(self.min_steps, self.max_steps + 1)),
                         f"synthetic-{seed}-{i}") for i in range(n)]

  def load(self, source: str = "synthetic", limit: int | None = None) -> list[Example]:
    if source != "synthetic" and not source.startswith("synthetic:"):
      return super().load(source, limit)
    opts = {"seed": "0", "n": "64"}
    if source != "synthetic":
      for item in source.split(":", 1)[1].split(","):
        key, _, value = item.partition("=")
        if key not in opts or not value.isdigit():
          raise ValueError(f"synthetic task source {source!r}: option {item!r} is not "
                           "seed=<int> or n=<int>")
        opts[key] = value
    n = int(opts["n"]) if limit is None else min(int(opts["n"]), limit)
    return self.generate(n, int(opts["seed"]))

  def parse_record(self, row: dict, index: int) -> Example:
    question = get_text(row, "question")
    if not re.fullmatch(r"\d([+\-*]\d)+", question):
      raise RecordError(f"field 'question' is {question!r:.80}, not a chain like '2-7+2' (a "
                        "digit, then operator-digit pairs with + - *); fix the record or drop it")
    steps = [(m[0], int(m[1])) for m in re.findall(r"([+\-*])(\d)", question)]
    solution, answer = solve(int(question[0]), steps)
    return Example(id=self.example_id(row, index), question=question, answer=str(answer),
                   solution=solution, meta={"steps": len(steps)})

  def user_message(self, example: Example) -> str:
    return example.question

  def reference_response(self, example: Example) -> str:
    return example.solution

  def prompt(self, tokenizer, example: Example, enable_thinking: bool = False,
             demonstration=None, system: str | None = None) -> str:
    return super().prompt(tokenizer, example, enable_thinking, demonstration, system)

  def context_turn(self, example: Example, kind: str, text: str) -> tuple[str, str]:
    """Short markers the toy models were trained on: the bare question for a correct
    solution, ``wrong <question>`` for an incorrect one, ``hint <question>`` for a summary."""
    marker = {"correct": "", "incorrect": "wrong ", "summary": "hint "}
    if kind not in marker:
      raise ValueError(f"context kind {kind!r} is not one of {self.CONTEXT_KINDS}")
    return marker[kind] + example.question, text

  def summary_request(self, solution: str) -> str:
    return "summarize\n" + solution

  def extract_answer(self, response_text: str) -> str | None:
    """The last ``#<digits>`` after any thinking block."""
    section = final_section(response_text)
    found = re.findall(r"#(\d+)", section or "")
    return found[-1] if found else None

  def is_correct(self, predicted: str, example: Example) -> bool:
    return predicted == example.answer


def write_tokenizer(path: str) -> str:
  """A character-level tokenizer in Hugging Face layout with Qwen3's special tokens."""
  from tokenizers import AddedToken, Tokenizer, decoders, models

  vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
  for c in CHARS:
    vocab[c] = len(vocab)
  vocab["<unk>"] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
               "model_max_length": 4096, "clean_up_tokenization_spaces": False}, f, indent=2)
  return path
