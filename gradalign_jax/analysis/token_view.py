"""A self-contained HTML page of rollouts with each token coloured by its alignment.

For every (student, spec, question) the page lists its rollouts, correct ones first, each
token a ``<span class="tok">`` whose background is the cosine at that position's decision
node (blue positive, red negative, opacity |cos|; grey where the node is not informative) and
whose tooltip gives the value. Token text is HTML-escaped; a newline shows as ``↵`` and
still breaks the line.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.rollout { font-family: monospace; white-space: pre-wrap; line-height: 1.6; margin: 0.4em 0 1.2em;
           padding: 0.5em; border-left: 4px solid #999; }
.correct { border-left-color: #1b7837; }
.incorrect { border-left-color: #c51b7d; }
.meta { font-size: 0.85em; color: #444; }
.tok, .key { border-radius: 2px; }
.nl { color: #999; }
"""


def _colour(c: float) -> str:
  if not math.isfinite(c):
    return "rgba(160,160,160,0.35)"
  a = min(abs(c), 1.0)
  return f"rgba(33,102,172,{a:.3f})" if c >= 0 else f"rgba(178,24,43,{a:.3f})"


def _token_span(i: int, token: int, text: str, c: float) -> str:
  value = f"{c:.3f}" if math.isfinite(c) else "not informative"
  tip = html.escape(f"pos {i} · id {token} · cos {value}", quote=True)
  shown = html.escape(text).replace("\n", '<span class="nl">↵</span>\n')
  return (f'<span class="tok" style="background:{_colour(c)}" '
          f'title="{tip}">{shown}</span>')


def _rollout_html(row, direction: str) -> str:
  tokens, texts = list(row["tokens"]), list(row["token_text"])
  cos = np.asarray(row[f"path_{direction}"], np.float64)
  if not len(tokens) == len(texts) == len(cos):
    raise ValueError(
        f"rollout {row['rollout']} of {row['question_id']} has {len(tokens)} tokens, "
        f"{len(texts)} token_text entries and {len(cos)} path_{direction} entries; the sweep "
        f"must record one of each per generated token")
  kind = "correct" if bool(row["correct"]) else "incorrect"
  mean = float(row[f"mean_{direction}"])
  meta = (f"rollout {row['rollout']} · {kind} · {len(tokens)} tokens · "
          f"mean cos {'n/a' if not np.isfinite(mean) else f'{mean:.3f}'}")
  spans = "".join(_token_span(i, int(t), str(x), float(c))
                  for i, (t, x, c) in enumerate(zip(tokens, texts, cos)))
  return (f'<div class="meta">{html.escape(meta)}</div>'
          f'<div class="rollout {kind}">{spans}</div>')


def _pick(group: pd.DataFrame, limit: int) -> pd.DataFrame:
  """Up to limit rollouts, correct first; each side gets half the places and any the other
  side leaves unused, so incorrect rollouts are shown even when correct ones abound."""
  correct = group[group["correct"].astype(bool)].sort_values("rollout")
  incorrect = group[~group["correct"].astype(bool)].sort_values("rollout")
  n_inc = min(len(incorrect), max(limit // 2, limit - len(correct)))
  return pd.concat([correct.head(limit - n_inc), incorrect.head(n_inc)])


def render(rollouts: pd.DataFrame, direction: str = "reverse_kl",
           max_rollouts_per_group: int = 8) -> str:
  """The HTML page of rollouts (the sweep's rollouts table: ``student, spec, question_id,
  rollout, correct, tokens, token_text, mean_<direction>, path_<direction>``, list columns
  one entry per generated token)."""
  if max_rollouts_per_group < 1:
    raise ValueError(f"max_rollouts_per_group={max_rollouts_per_group}; pass 1 or more")
  needed = ["student", "spec", "question_id", "rollout", "correct", "tokens", "token_text",
            f"mean_{direction}", f"path_{direction}"]
  missing = [c for c in needed if c not in rollouts.columns]
  if missing and len(rollouts):
    raise ValueError(f"rollouts table lacks columns {missing}; the token view needs the "
                     f"sweep's per-token lists (tokens, token_text, path_<direction>)")
  parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
           f"<title>Token alignment ({html.escape(direction)})</title>"
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>Token alignment: {html.escape(direction)}</h1>",
           "<p>Background: " + " ".join(
               f'<span class="key" style="background:{_colour(c)}">{label}</span>'
               for c, label in ((1.0, "cos 1"), (0.3, "0.3"), (-0.3, "−0.3"), (-1.0, "−1"),
                                (math.nan, "not informative")))
           + f"; hover a token for its value. Up to {max_rollouts_per_group} rollouts per "
           f"question, correct first.</p>"]
  groups = (rollouts.groupby(["student", "spec", "question_id"], sort=False)
            if len(rollouts) else [])
  if not len(rollouts):
    parts.append("<p>No rollouts.</p>")
  for (student, spec, qid), group in groups:
    shown = _pick(group, max_rollouts_per_group)
    n_cor = int(group["correct"].astype(bool).sum())
    parts.append(f"<h2>{html.escape(f'{student} · {spec} · {qid}')}</h2>"
                 f'<p class="meta">{n_cor} correct, {len(group) - n_cor} incorrect; '
                 f"showing {len(shown)}</p>")
    parts += [_rollout_html(row, direction) for _, row in shown.iterrows()]
  parts.append("</body></html>")
  return "\n".join(parts)
