"""How an experiment script fails: one short message on stderr and exit status 1, not a
traceback or the whole ``--help`` (absl's ``app.UsageError`` prints every flag first).

Defines no flags, so every script (including ones with flags of their own) can import it.
"""

from __future__ import annotations

import sys

EXIT_ERROR = 1


def fail(message: str) -> None:
  """Prints ``error: message`` and a pointer to --help on stderr, then exits with status 1."""
  print(f"error: {message}\n(--help lists the flags)", file=sys.stderr)
  sys.exit(EXIT_ERROR)
