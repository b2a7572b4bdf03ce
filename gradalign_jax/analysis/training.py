"""The gated-distillation check's statistics, figure and report (pure: tables in, dict /
Figure / text out; ``experiments/gated_distillation.py`` writes the files).

``curves``: one row per (arm, seed, step) with ``accuracy`` (held-out, NaN where not
evaluated), ``kept_fraction``, ``covered_fraction``, ``train_reward``, ``loss``;
``compute``: one row per (arm, seed) with ``training.COMPUTE``'s columns. An arm's final
accuracy is its mean over seeds at the last step; its 95% interval is Student's t over
seeds; the tests against the baseline (``all_tokens``) pair seeds (same initial student,
question order and sampler seeds): ``scipy.stats.ttest_rel`` (the headline p) and
``wilcoxon`` (with 5 seeds its smallest two-sided p is 0.0625).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats as sps

from gradalign_jax import distill
from gradalign_jax.analysis.markdown import _num

BASELINE = "all_tokens"


def t_interval(values, alpha: float = 0.05) -> tuple[float, float, float]:
  """(mean, low, high): Student's t interval of the mean; NaN bounds with < 2 values."""
  x = np.asarray(values, np.float64)
  x = x[np.isfinite(x)]
  if len(x) == 0:
    return np.nan, np.nan, np.nan
  m = float(x.mean())
  if len(x) < 2:
    return m, np.nan, np.nan
  half = float(sps.t.ppf(1 - alpha / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
  return m, m - half, m + half


def paired_tests(a, b) -> dict:
  """a − b paired by position: mean difference, its t interval, ttest_rel and Wilcoxon p."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ok = np.isfinite(a) & np.isfinite(b)
  d = a[ok] - b[ok]
  mean, lo, hi = t_interval(d)
  p_t = p_w = np.nan
  if len(d) >= 2 and np.any(d != 0):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      p_t = float(sps.ttest_rel(a[ok], b[ok]).pvalue)
      p_w = float(sps.wilcoxon(d).pvalue)
  elif len(d) >= 2:
    p_t = p_w = 1.0  # identical runs
  return dict(diff=mean, diff_low=lo, diff_high=hi, p_ttest=p_t, p_wilcoxon=p_w)


def arm_order(arms) -> list[str]:
  return sorted(set(arms), key=lambda a: distill.ARMS.index(a) if a in distill.ARMS else 99)


def per_seed(curves: pd.DataFrame) -> pd.DataFrame:
  """One row per (arm, seed): ``final_accuracy`` (last step), ``curve_accuracy`` (mean over
  the evaluated steps after 0), ``kept_fraction``, ``covered_fraction`` (means over steps)."""
  rows = []
  for (arm, seed), c in curves.groupby(["arm", "seed"]):
    ev = c[np.isfinite(c["accuracy"])].sort_values("step")
    rows.append(dict(arm=arm, seed=int(seed), final_accuracy=float(ev["accuracy"].iloc[-1]),
                     curve_accuracy=float(ev[ev["step"] > 0]["accuracy"].mean()),
                     kept_fraction=float(c["kept_fraction"].mean()),
                     covered_fraction=float(c["covered_fraction"].mean())))
  return pd.DataFrame(rows)


def summarize(curves: pd.DataFrame, compute: pd.DataFrame) -> dict:
  """summary.json: {"arms": {arm: {final_accuracy, ci_low, ci_high, p_vs_all_tokens,
  p_wilcoxon_vs_all_tokens, diff_vs_all_tokens [diff_low, diff_high], curve_accuracy,
  p_curve_vs_all_tokens, num_seeds, kept_fraction, covered_fraction, and per seed (means) the
  compute columns}}, "initial_accuracy", "vs_alignment_gated": {proxy arm: paired
  difference}}."""
  seeds = per_seed(curves)
  wide = seeds.pivot(index="seed", columns="arm")
  base = wide["final_accuracy"].get(BASELINE)
  base_curve = wide["curve_accuracy"].get(BASELINE)
  out = {"arms": {}, "baseline": BASELINE}
  for arm in arm_order(seeds["arm"]):
    s = seeds[seeds["arm"] == arm]
    mean, lo, hi = t_interval(s["final_accuracy"])
    row = dict(final_accuracy=mean, ci_low=lo, ci_high=hi, num_seeds=int(len(s)),
               curve_accuracy=float(s["curve_accuracy"].mean()),
               kept_fraction=float(s["kept_fraction"].mean()),
               covered_fraction=float(s["covered_fraction"].mean()))
    if base is not None and arm != BASELINE:
      t = paired_tests(wide["final_accuracy"][arm], base)
      row.update(p_vs_all_tokens=t["p_ttest"], p_wilcoxon_vs_all_tokens=t["p_wilcoxon"],
                 diff_vs_all_tokens=t["diff"], diff_low=t["diff_low"], diff_high=t["diff_high"],
                 p_curve_vs_all_tokens=paired_tests(wide["curve_accuracy"][arm],
                                                    base_curve)["p_ttest"])
    else:  # the baseline itself, or no baseline run: no test (null in summary.json)
      row.update(p_vs_all_tokens=np.nan, p_wilcoxon_vs_all_tokens=np.nan)
    c = compute[compute["arm"] == arm]
    for col in c.columns:
      if col not in ("arm", "seed"):
        row[col] = float(c[col].mean())
    out["arms"][arm] = row
  out["train_seconds"] = float(compute["seconds"].sum()) if "seconds" in compute else np.nan
  init = curves[curves["step"] == 0]["accuracy"]
  out["initial_accuracy"] = float(init.mean()) if len(init) else np.nan
  if "alignment_gated" in wide["final_accuracy"]:
    gated = wide["final_accuracy"]["alignment_gated"]
    out["vs_alignment_gated"] = {arm: paired_tests(wide["final_accuracy"][arm], gated)
                                 for arm in arm_order(seeds["arm"])
                                 if arm in distill.FRACTION_ARMS}
  return out


def curves_figure(curves: pd.DataFrame) -> Figure:
  """Held-out accuracy against step: per arm the mean over seeds ± its 95% t interval."""
  fig = Figure(figsize=(7.5, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ev = curves[np.isfinite(curves["accuracy"])]
  colors = dict(zip(distill.ARMS, [f"C{i}" for i in range(len(distill.ARMS))]))
  for arm in arm_order(ev["arm"]):
    c = ev[ev["arm"] == arm]
    steps = sorted(c["step"].unique())
    stats = [t_interval(c[c["step"] == s]["accuracy"]) for s in steps]
    m = np.array([x[0] for x in stats])
    lo = np.array([x[1] for x in stats])
    hi = np.array([x[2] for x in stats])
    style = "-" if arm in ("all_tokens", "alignment_gated") else "--"
    ax.plot(steps, m, style, color=colors.get(arm), label=arm, lw=2 if style == "-" else 1.2)
    ax.fill_between(steps, lo, hi, color=colors.get(arm), alpha=0.12)
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("held-out accuracy (T = 1)")
  ax.set_title("Gated on-policy distillation: mean over seeds ± 95% t interval")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  return fig


def table_markdown(summary: dict) -> str:
  """The per-arm table: final accuracy [95% CI], paired difference and p vs all_tokens, the
  mean accuracy over the evaluated steps after 0 (paired t p vs all_tokens), kept fraction,
  compute per run."""
  lines = ["| arm | final accuracy [95% CI] | − all_tokens [95% CI] | p (t / Wilcoxon) | "
           "curve mean (p) | kept fraction | rollouts / run (incl. targeted) | "
           "forward tokens / run | s / run |",
           "|---|---|---|---|---|---|---|---|---|"]
  for arm, r in summary["arms"].items():
    if arm == BASELINE:
      lines.append(f"| {arm} | {_num(r['final_accuracy'])} [{_num(r['ci_low'])}, "
                   f"{_num(r['ci_high'])}] | (baseline) | | {_num(r['curve_accuracy'])} | "
                   f"{_num(r['kept_fraction'])} | {r.get('rollouts', 0):,.0f} | "
                   f"{r.get('forward_tokens', 0):,.0f} | {_num(r.get('seconds'), 0)} |")
      continue
    lines.append(
        f"| {arm} | {_num(r['final_accuracy'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}] | "
        f"{_num(r.get('diff_vs_all_tokens'))} [{_num(r.get('diff_low'))}, "
        f"{_num(r.get('diff_high'))}]"
        f" | {_num(r.get('p_vs_all_tokens'))} / {_num(r.get('p_wilcoxon_vs_all_tokens'))} | "
        f"{_num(r['curve_accuracy'])} ({_num(r.get('p_curve_vs_all_tokens'))}) | "
        f"{_num(r['kept_fraction'])} | {r.get('rollouts', 0):,.0f}"
        f" | {r.get('forward_tokens', 0):,.0f} | {_num(r.get('seconds'), 0)} |")
  return "\n".join(lines)


def verdicts(summary: dict) -> list[str]:
  """The report's answers, as measured: gating vs all tokens, each proxy vs gating."""
  arms = summary["arms"]
  out = []
  g = arms.get("alignment_gated")
  if g is not None and "diff_vs_all_tokens" in g:
    d, lo, hi = g["diff_vs_all_tokens"], g["diff_low"], g["diff_high"]
    if np.isfinite(lo) and lo > 0:
      word = "yes: alignment gating beats"
    elif np.isfinite(hi) and hi < 0:
      word = "no: alignment gating is worse than"
    else:
      word = "not distinguishable: alignment gating neither beats nor loses to"
    out.append(f"**Does alignment gating beat all-token distillation?** {word} all-token "
               f"distillation here — final accuracy {_num(g['final_accuracy'])} vs "
               f"{_num(arms[BASELINE]['final_accuracy'])}, paired difference {_num(d)} "
               f"[{_num(lo)}, {_num(hi)}], p = {_num(g['p_vs_all_tokens'])} (paired t over "
               f"{g['num_seeds']} seeds), keeping {_num(g['kept_fraction'])} of the tokens "
               f"(estimate available for {_num(g['covered_fraction'])}).")
  for arm, t in summary.get("vs_alignment_gated", {}).items():
    a = arms[arm]
    out.append(f"**{arm}** (same kept fraction): final accuracy {_num(a['final_accuracy'])} "
               f"[{_num(a['ci_low'])}, {_num(a['ci_high'])}]; − alignment_gated "
               f"{_num(t['diff'])} "
               f"[{_num(t['diff_low'])}, {_num(t['diff_high'])}], p = {_num(t['p_ttest'])}; "
               f"− all_tokens {_num(a.get('diff_vs_all_tokens'))}, p = "
               f"{_num(a.get('p_vs_all_tokens'))}.")
  return out


def report_markdown(summary: dict, settings: dict, wall_seconds: float, load: str,
                    teacher: str) -> str:
  lines = ["# Does alignment predict what helps? (gated distillation)", "",
           f"Student `{settings['students'][0]}`, teacher `{teacher}`; "
           f"{settings['train_seeds']} seeds × {len(summary['arms'])} arms × "
           f"{settings['steps']} adam steps (lr {settings['learning_rate']}), "
           f"{settings['question_batch']} questions × {settings['num_rollouts']} rollouts per "
           f"step; held-out accuracy on the questions of `{settings['eval_data']}` × "
           f"{settings['eval_samples']} samples at T = 1. Initial accuracy "
           f"{_num(summary['initial_accuracy'])}. Training time {summary['train_seconds'] / 60:.1f}"
           f" min summed over the (arm, seed) runs (a resumed run counts the earlier ones); "
           f"this invocation {wall_seconds / 60:.1f} min, load average at its end {load}.", "",
           table_markdown(summary), "", *[f"- {v}" for v in verdicts(summary)], "",
           "Arms (gradalign_jax/distill.py):", "",
           *[f"- `{a}`: {distill.ARM_DOCS[a]}" for a in summary["arms"]], "",
           "Compute per run: rollouts = on-policy + targeted (alignment_gated's diagnostic); "
           "forward tokens = sampled tokens + training sequences through the student (and the "
           "teacher, except reinforce) + the diagnostic's final scoring pass (student and "
           "teacher positions). Not counted: prompt prefills, the targeted rounds' "
           "student-only candidate passes, and held-out evaluation (the same for every arm).",
           "", "![learning curves](curves.png)", ""]
  return "\n".join(lines)


__all__ = ["BASELINE", "curves_figure", "paired_tests", "per_seed", "report_markdown",
           "summarize", "t_interval", "table_markdown", "verdicts"]
