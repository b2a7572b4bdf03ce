"""Static shapes by bucketing: a sweep compiles a handful of programs, not one per size."""


def bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two ≥ n, and at least ``minimum`` (at most twice the work)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())
