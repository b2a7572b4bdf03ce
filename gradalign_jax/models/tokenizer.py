"""Qwen3 tokenizer: loading, chat prompts with thinking on/off, and the vocab mask.

Real Qwen3 checkpoints pad the embedding to ``vocab_size`` = 151,936 rows while the
tokenizer has 151,669 ids; rows past the tokenizer are never produced and are masked out of
every softmax, divergence and cosine (MATH.md, ``vocab_mask``).
"""

from __future__ import annotations

import os

import numpy as np

from gradalign_jax.models.paths import CheckpointError, resolve_checkpoint_dir


def load_tokenizer(path_or_hub_id: str):
  """A transformers tokenizer from a checkpoint directory (or hub id, when online)."""
  # Only tokenizers and configs are used: transformers' advice that PyTorch is missing is noise.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  from transformers import AutoTokenizer

  ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
  if not any(os.path.isfile(os.path.join(ckpt_dir, f))
             for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
    raise CheckpointError(f"{ckpt_dir} has no tokenizer files (tokenizer.json or "
                          "tokenizer_config.json); pass the directory that has them")
  return AutoTokenizer.from_pretrained(ckpt_dir)


def chat_prompt(tokenizer, user: str, *, system: str | None = None,
                enable_thinking: bool = True, history: list[dict] | None = None) -> str:
  """The prompt text for one user turn, ending where the assistant starts writing.

  Uses the tokenizer's own chat template (Qwen3's, for real checkpoints). With
  ``enable_thinking=False`` Qwen3's template pre-fills an empty ``<think></think>`` block.
  ``history`` holds earlier turns as {"role", "content"} dicts (e.g. a demonstration).
  """
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError("this tokenizer has no chat template; build prompts as plain text or use a "
                     "tokenizer directory whose tokenizer_config.json has 'chat_template'")
  messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
  messages.append({"role": "user", "content": user})
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=enable_thinking)


def encode_chat(tokenizer, user: str, **kwargs) -> list[int]:
  """Token ids of ``chat_prompt`` (special tokens are part of the template text)."""
  return tokenizer(chat_prompt(tokenizer, user, **kwargs), add_special_tokens=False)["input_ids"]


def vocab_mask(tokenizer, vocab_size: int) -> np.ndarray:
  """bool[vocab_size]: True for ids the tokenizer can produce (ids < len(tokenizer))."""
  n = len(tokenizer)
  if n > vocab_size:
    raise ValueError(f"tokenizer has {n} ids but the model's vocab_size is {vocab_size}; "
                     "they do not belong together")
  return np.arange(vocab_size) < n


def check_same_vocabulary(student_tok, teacher_tok) -> None:
  """Raises when two tokenizers would map ids to different strings."""
  if len(student_tok) != len(teacher_tok) or student_tok.get_vocab() != teacher_tok.get_vocab():
    raise ValueError(
        f"student and teacher tokenizers differ ({len(student_tok)} vs {len(teacher_tok)} ids); "
        "the diagnostic compares distributions over the same ids, so both models must share "
        "one tokenizer (e.g. two Qwen3 checkpoints)")
