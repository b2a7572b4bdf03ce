"""A loaded model (config, params, tokenizer, vocab mask, EOS ids) and the bundled toy models.

    from gradalign_jax.models import loaded
    student = loaded.LoadedModel("student_small")        # a toy name, a directory or a hub id
    ids = student.encode("text"); student.decode(ids)
    models = loaded.ModelCache("float32"); models.get("self", student="student_small")
    teacher = loaded.LoadedModel("Qwen/Qwen3-8B", "bfloat16", mesh=distributed.make_mesh(model=8))

The toy registry: ``TOY_MODELS`` are checkpoints shipped in ``assets/toy`` (Hugging Face
layout, trained by experiments/train_toy.py); ``resolve_model`` turns a name, ``self`` or a
path into what ``load_pretrained`` reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

from gradalign_jax.models.checkpoint import load_pretrained
from gradalign_jax.models.tokenizer import load_tokenizer, vocab_mask

_log = logging.getLogger(__name__)

TOY_MODELS = ("student_small", "student_large", "teacher")
TOY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "assets", "toy")


def resolve_model(ref: str, student: str) -> str:
  """The checkpoint directory or hub id of a model reference ("self" → ``student``)."""
  if ref == "self":
    return resolve_model(student, student) if student in TOY_MODELS else student
  if ref in TOY_MODELS and not os.path.isdir(ref):
    return os.path.join(TOY_DIR, ref)
  return ref


class LoadedModel:
  """A loaded checkpoint: ``ref`` (what was loaded), ``cfg``, ``params``, ``tok`` (tokenizer),
  ``mask`` (bool[V] real vocabulary rows), ``eos_ids`` (ids that end a rollout: the
  tokenizer's EOS and Qwen3's ``<|im_end|>``/``<|endoftext|>``) and ``pad_id``.

  mesh: optional ``jax.sharding.Mesh`` (``distributed.make_mesh``): the params are read
  straight into their shards by ``distributed.param_sharding`` (tensor parallel over its
  "model" axis), and the sampler and scorer then shard their KV caches alike. None: one
  device, as before."""

  def __init__(self, ref: str, dtype: str = "float32", mesh=None):
    self.ref = resolve_model(ref, ref)
    sharding = None
    if mesh is not None:
      from gradalign_jax import distributed  # models is the lower layer
      sharding = distributed.param_sharding(mesh)
    self.cfg, self.params = load_pretrained(self.ref, dtype=dtype, sharding=sharding)
    self.tok = load_tokenizer(self.ref)
    self.mask = vocab_mask(self.tok, self.cfg.vocab_size)
    ends = {self.tok.eos_token_id} | {self.tok.convert_tokens_to_ids(t)
                                       for t in ("<|im_end|>", "<|endoftext|>")}
    self.eos_ids = tuple(sorted(e for e in ends if isinstance(e, int) and 0 <= e < len(self.tok)))
    pad = self.tok.pad_token_id
    self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
    self._text: dict[int, str] = {}

  def encode(self, text: str) -> list[int]:
    return self.tok(text, add_special_tokens=False)["input_ids"]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)

  def token_text(self, ids: Sequence[int]) -> list[str]:
    """Each id decoded alone (cached): what a token view shows."""
    out = []
    for t in ids:
      if t not in self._text:
        self._text[t] = self.tok.decode([int(t)], skip_special_tokens=False)
      out.append(self._text[t])
    return out

  def sampling_config(self, base, max_new_tokens: int | None = None, greedy: bool = False):
    """``base`` (a sampling.SamplingConfig) with this model's EOS and pad ids; ``greedy``
    keeps the top token (temperature 1, top-k 1, no top-p)."""
    policy = dict(temperature=1.0, top_p=1.0, top_k=1) if greedy else {}
    return dataclasses.replace(base, max_new_tokens=max_new_tokens or base.max_new_tokens,
                               eos_ids=self.eos_ids, pad_id=self.pad_id, **policy)


class ModelCache:
  """Loads each checkpoint once; ``self`` resolves to the student of the moment. mesh: every
  model loaded sharded over it (see ``LoadedModel``)."""

  def __init__(self, dtype: str = "float32", mesh=None):
    self.dtype = dtype
    self.mesh = mesh
    self._loaded: dict[str, LoadedModel] = {}

  def get(self, ref: str, student: str) -> LoadedModel:
    path = resolve_model(ref, student)
    if path not in self._loaded:
      _log.info("loading %s", path)
      self._loaded[path] = LoadedModel(path, self.dtype, mesh=self.mesh)
    return self._loaded[path]


__all__ = ["LoadedModel", "ModelCache", "TOY_DIR", "TOY_MODELS", "resolve_model"]
