"""Writing what analysis/ renders: the one place experiments turn tables, figures and text into
files.

Each write goes to ``path + '.tmp'`` and is then renamed over path, so an interrupted run
leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import os

DPI = 110


def save_figure(fig, path: str) -> str:
  """Save a matplotlib Figure to path (format from its extension) at DPI; returns path."""
  tmp = path + ".tmp"
  # The .tmp name hides the real extension from matplotlib, so the format is named.
  fig.savefig(tmp, dpi=DPI, format=os.path.splitext(path)[1][1:] or None)
  os.replace(tmp, path)
  return path


def write_text(path: str, text: str) -> str:
  """Write text (UTF-8) to path; returns path."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def save_table(df, path: str) -> str:
  """Write a pandas DataFrame as parquet or CSV (no index), by path's extension; returns path."""
  tmp = path + ".tmp"
  if path.endswith(".csv"):
    df.to_csv(tmp, index=False)
  elif path.endswith(".parquet"):
    df.to_parquet(tmp)
  else:
    raise ValueError(f"{path}: save_table writes .parquet or .csv files")
  os.replace(tmp, path)
  return path
