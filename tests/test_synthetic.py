"""The synthetic task: worked solutions, verifier, wrong demonstrations, toy tokenizer."""

import numpy as np
import pytest

from gradalign_jax import models
from gradalign_jax.tasks import synthetic


def test_hand_worked_chain():
  solution, answer = synthetic.solve(3, [("+", 4), ("*", 2), ("-", 5), ("+", 7)])
  assert solution == "3+4=7\n7*2=4\n4-5=9\n9+7=6\n#6" and answer == 6


@pytest.mark.parametrize("response,ok", [
    ("3+4=7\n7*2=4\n#4", True),
    ("3+4=7\n7*2=4\n#4 and some trailing text", True),
    ("<think>\n#9\n</think>\n\n3+4=7\n#4", True),   # the answer in thinking does not count
    ("3+4=7\n#7\n#4", True),                          # the last answer wins
    ("3+4=7\n7*2=5\n#5", False),
    ("3+4=7\n7*2=4", False),                          # no final answer
    ("#44", False),
    ("<think>\n3+4=7\n#4", False),                # cut off while thinking: no answer
])
def test_verify(response, ok):
  ex = synthetic.Example(id="x", question="3+4*2", answer="4", solution="3+4=7\n7*2=4\n#4")
  assert synthetic.SyntheticTask().verify(response, ex) == ok


def test_generated_examples_are_consistent_and_seeded():
  task = synthetic.SyntheticTask()
  a, b = task.load("synthetic:seed=3,n=50"), task.load("synthetic:seed=3,n=50")
  assert a == b and len(a) == 50 and a != task.load("synthetic:seed=4,n=50")
  for ex in a:
    assert task.verify(ex.solution, ex)
    assert 2 <= ex.meta["steps"] <= 5
  rng = np.random.default_rng(0)
  for ex in a:  # exactly one line's arithmetic is wrong (later steps may still undo it)
    lines = synthetic.wrong_solution(ex, rng).split("\n")[:-1]
    wrong = [l for l in lines if eval(f"({l[:3]}) % 10") != int(l[4])]
    assert len(wrong) == 1
  with pytest.raises(ValueError, match="seed=<int> or n=<int>"):
    task.load("synthetic:size=3")


def test_registry_and_file_source(tmp_path):
  from gradalign_jax import tasks
  task = tasks.get_task("synthetic")
  path = tmp_path / "q.jsonl"
  path.write_text('{"question": "3+4*2"}\n')
  (ex,) = task.load(str(path))
  assert ex.answer == "4" and ex.solution == "3+4=7\n7*2=4\n#4"


def test_toy_tokenizer_roundtrip(tmp_path):
  tok = models.load_tokenizer(synthetic.write_tokenizer(str(tmp_path)))
  task = synthetic.SyntheticTask()
  ex = task.generate(1, 0)[0]
  prompt = task.prompt(tok, ex, demonstration=ex)
  assert prompt.count(ex.question) == 2 and ex.solution in prompt
  assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  ids = tok(prompt + ex.solution, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == prompt + ex.solution
  assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
  assert tok.unk_token_id not in ids
