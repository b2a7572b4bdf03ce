"""Where a checkpoint lives: a local directory or a hub id, resolved without jax.

The tokenizer (and through it every task's prompt) needs only this, so it is kept apart from
``checkpoint.py``, which imports jax to place tensors; ``checkpoint`` re-exports both names.
"""

from __future__ import annotations

import os
import re


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as Qwen3; the message says what and how to fix it."""


def resolve_checkpoint_dir(path_or_hub_id: str) -> str:
  """A local directory for ``path_or_hub_id`` (downloading through huggingface_hub if needed)."""
  path = os.path.expanduser(str(path_or_hub_id))
  if os.path.isdir(path):
    return path
  looks_like_hub_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(path_or_hub_id)) is not None
  if os.path.exists(path) or not looks_like_hub_id:
    raise CheckpointError(
        f"checkpoint {path_or_hub_id!r} is not a directory; pass a local Hugging Face "
        "checkpoint directory (config.json + model.safetensors) or a hub id like 'Qwen/Qwen3-0.6B'")
  try:
    import huggingface_hub  # optional: only for hub ids
  except ImportError as e:
    raise CheckpointError(
        f"{path_or_hub_id!r} is not a local directory and huggingface_hub is not installed; "
        "install it (pip install 'gradalign_jax[hub]') or pass a local checkpoint directory") from e
  try:
    return huggingface_hub.snapshot_download(
        str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
  except Exception as e:  # offline, unknown repo, gated repo...
    raise CheckpointError(
        f"could not fetch {path_or_hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
        "check the id and your connection, or pass a local checkpoint directory") from e
