"""What the benchmark scripts share: timing on a shared machine and writing the results.

On a machine shared with other jobs the fastest run is the least disturbed; the warm-up call
pays for compilation (ours) or the first-call setup (PyTorch), which is not measured.
"""

import json
import os
import time


def best_time(fn, repeats: int) -> float:
  """Seconds of the fastest of ``repeats`` calls of ``fn()``, after one untimed call."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def finish(result: dict, out: str | None) -> None:
  """Records the load average at the end in ``result["machine"]`` and writes ``result`` as
  JSON to ``out`` (if given)."""
  result["machine"]["load_avg_end"] = list(os.getloadavg())
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
