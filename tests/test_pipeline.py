"""pipeline.diagnose as a researcher calls it: the README's snippet, run exactly as written."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _readme_snippet() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  block = re.search(r"<!-- diagnose-snippet:begin -->\n```python\n(.*?)```\n"
                    r"<!-- diagnose-snippet:end -->", text, re.S)
  assert block, "README.md lost its diagnose snippet markers"
  return block.group(1)


def test_readme_snippet_runs_as_written(tmp_path):
  """The snippet in a fresh interpreter (outside the repo, so only the installed package is
  used): it prints one row per (spec, question) and the teacher's summary block."""
  out = subprocess.run([sys.executable, "-c", _readme_snippet()], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  rows = [ln for ln in lines if re.match(r"^\d+\s+(teacher|self:correct_demo)\s", ln)]
  assert len(rows) == 4, out.stdout  # 2 specs × 2 questions
  assert re.search(r"\{'mean': .*'weighted': .*'pooled': .*'frac_pos':", lines[-1]), lines[-1]
