"""PNG figures of a sweep: correct vs incorrect, alignment by depth, directions, covariates.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so no
global state or display is involved. Each function returns its Figure and writes nothing (the
experiments save it, experiments/files.py); a panel with no data shows a note instead of
failing. ``summary`` is report.summarize's output
(or summary.json loaded back, null for NaN); ``nodes`` is the sweep's node table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gradalign_jax.analysis import stats

CORRECT, INCORRECT = "#1b7837", "#c51b7d"
DIVERGING = colormaps["RdBu_r"].with_extremes(bad="#dddddd")


def _f(x) -> float:
  return np.nan if x is None else float(x)


def _figure(n_panels: int, width: float, height: float):
  fig = Figure(figsize=(width * max(n_panels, 1), height), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, max(n_panels, 1), squeeze=False)[0]
  return fig, axes


def _empty(ax, note: str = "no data"):
  ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")
  ax.set_xticks([])
  ax.set_yticks([])


def _informative(nodes: pd.DataFrame, columns) -> pd.DataFrame:
  """Informative rows with the named columns; an empty table if any is missing."""
  if len(nodes) == 0 or any(c not in nodes.columns for c in ("informative", *columns)):
    return pd.DataFrame(columns=["student", "spec", *columns])
  return nodes[nodes["informative"].astype(bool)]


def _student_panels(nodes: pd.DataFrame, columns, width: float):
  """Informative rows with columns, their students in order, and a figure with a panel per
  student (one "no data" panel when there is none)."""
  data = _informative(nodes, columns)
  students = list(dict.fromkeys(data["student"]))
  fig, axes = _figure(len(students), width, 3.8)
  if not students:
    _empty(axes[0])
  return data, students, fig, axes


def plot_correct_vs_incorrect(summary: dict) -> Figure:
  """Grouped bars: mean cosine (primary direction) of correct and incorrect rollouts per
  student × spec, with 95% bootstrap CI error bars."""
  d = summary["directions"][0]
  labels, values = [], {"correct": [], "incorrect": []}
  for student, s in summary["students"].items():
    for spec, b in s["specs"].items():
      labels.append(f"{student}\n{spec}")
      for split in values:
        values[split].append((_f(b[split][d]["mean"]), *map(_f, b[split][d]["mean_ci"])))
  fig, (ax,) = _figure(1, max(4.0, 0.9 * len(labels) + 1.5), 5.0)
  if not labels:
    _empty(ax)
    return fig
  x = np.arange(len(labels))
  for offset, split, color in ((-0.2, "correct", CORRECT), (0.2, "incorrect", INCORRECT)):
    v = np.array(values[split], float).reshape(-1, 3)
    ok = np.isfinite(v[:, 0])
    err = np.abs(np.nan_to_num(v[:, 1:].T - v[:, 0], nan=0.0))[:, ok]
    ax.bar(x[ok] + offset, v[ok, 0], width=0.4, color=color, label=split, yerr=err, capsize=3)
  ax.axhline(0, color="black", lw=0.6)
  ax.set_xticks(x, labels, fontsize=8, rotation=35, ha="right")
  ax.set_ylabel(f"mean cosine ({d})")
  ax.set_title("Alignment of correct vs incorrect rollouts")
  ax.legend()
  return fig


def _depth_bins(depth: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """Bin index per depth over windows [0,1), [1,2), [2,4), [4,8), … and their labels."""
  top = int(np.max(depth)) if len(depth) else 0
  edges = [0, 1] + [2 ** k for k in range(1, max(top, 1).bit_length() + 1)]
  labels = [f"{lo}" if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in zip(edges, edges[1:])]
  return np.searchsorted(edges, depth, side="right") - 1, labels


def plot_alignment_by_depth(nodes: pd.DataFrame, direction: str = "reverse_kl") -> Figure:
  """Mean alignment of informative nodes per depth window ([0,1), [1,2), [2,4), …), one line
  per spec, one panel per student."""
  col = f"align_{direction}"
  data, students, fig, axes = _student_panels(nodes, ["depth", col], 5.0)
  if not students:
    return fig
  bins, labels = _depth_bins(data["depth"].to_numpy(int))
  data = data.assign(_bin=bins)
  for ax, student in zip(axes, students):
    s = data[data["student"] == student]
    for spec, g in s.groupby("spec", sort=False):
      m = g.groupby("_bin")[col].mean()
      ax.plot(m.index, m.to_numpy(float), marker="o", label=str(spec))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("depth (generated tokens)")
    ax.set_ylabel(f"mean cosine ({direction})")
    ax.set_title(str(student))
    ax.legend(fontsize=7)
  return fig


def plot_directions(summary: dict) -> Figure:
  """Heatmap per student of incorrect − correct mean cosine, specs × directions."""
  dirs = summary["directions"]
  students = summary["students"]
  fig, axes = _figure(len(students), 1.2 * len(dirs) + 2.5, 0.5 * max(
      (len(s["specs"]) for s in students.values()), default=1) + 2.0)
  if not students:
    _empty(axes[0])
    return fig
  for ax, (student, s) in zip(axes, students.items()):
    specs = list(s["specs"])
    v = np.array([[_f(s["specs"][sp]["tests"][d]["difference"]) for d in dirs] for sp in specs],
                 float).reshape(len(specs), len(dirs))
    if not np.isfinite(v).any():
      _empty(ax, f"{student}: no comparison")
      continue
    lim = np.nanmax(np.abs(v)) or 1.0
    im = ax.imshow(np.ma.masked_invalid(v), cmap=DIVERGING, vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), x in np.ndenumerate(v):
      ax.text(j, i, "n/a" if np.isnan(x) else f"{x:.2f}", ha="center", va="center", fontsize=7,
              color="white" if abs(x) > 0.6 * lim else "black")
    ax.set_xticks(range(len(dirs)), dirs, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(specs)), specs, fontsize=8)
    ax.set_title(f"{student}: incorrect − correct")
    fig.colorbar(im, ax=ax, shrink=0.8)
  return fig


def plot_covariates(nodes: pd.DataFrame, direction: str = "reverse_kl") -> Figure:
  """Alignment vs KL(p‖q) of informative nodes, one panel per student (hexbin when dense)."""
  col = f"align_{direction}"
  data, students, fig, axes = _student_panels(nodes, ["kl_pq", col], 4.5)
  if not students:
    return fig
  for ax, student in zip(axes, students):
    s = data[data["student"] == student]
    x, y = s["kl_pq"].to_numpy(float), s[col].to_numpy(float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) == 0:
      _empty(ax, f"{student}: no informative node")
      continue
    if len(x) >= 200:
      hb = ax.hexbin(x, y, gridsize=40, bins="log", mincnt=1, cmap="viridis")
      fig.colorbar(hb, ax=ax, label="nodes")
    else:
      ax.scatter(x, y, s=8, alpha=0.6)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("KL(p‖q)")
    ax.set_ylabel(f"cosine ({direction})")
    rho, _ = stats.spearman(x, y)
    ax.set_title(f"{student} (Spearman ρ = {rho:.2f}, {len(x)} nodes)")
  return fig
