"""report.md's markdown: ``render`` turns the sweep's summary (``analysis.report.summarize``,
or summary.json loaded back with null for NaN) into the report, and the small formatters
here (``_num``, ``_p``, ``_table``, ``_config_value``) serve the other experiments' reports.

Every function is pure: it reads the summary and returns text; the experiments write files.
"""

from __future__ import annotations

import os

import numpy as np

POOLED_PLOTS = ("correct_vs_incorrect.png", "directions.png")  # plots.py draws pooled splits


def _num(x, digits: int = 3, sign: str = "") -> str:
  return "n/a" if x is None or not np.isfinite(x) else f"{x:{sign}.{digits}f}"


def _p(p) -> str:
  """0.003, 2e-05, or n/a."""
  if p is None or not np.isfinite(p):
    return "n/a"
  if p == 0:
    return "0"
  return f"{p:.3f}" if p >= 1e-3 else f"{p:.0e}"


def _ci(ci) -> str:
  return f"[{_num(ci[0])}, {_num(ci[1])}]"


def _delta(block: dict, digits: int = 3) -> str:
  """"+0.041 [-0.020, 0.100]" from a block with difference, ci_low and ci_high."""
  x = block["difference"]
  if x is None or not np.isfinite(x):
    return "n/a"
  lo, hi = _num(block["ci_low"], digits), _num(block["ci_high"], digits)
  return f"{_num(x, digits, '+')} [{lo}, {hi}]"


def _vs_null(w: dict) -> str:
  """"−0.021 [−0.142, 0.096] (Δ +0.054)": Δ against its relabelling null, else Δ alone."""
  x = w.get("difference_vs_null")
  if x is None or not np.isfinite(x):
    return _delta(w)
  block = {"difference": x, "ci_low": w["vs_null_ci_low"], "ci_high": w["vs_null_ci_high"]}
  return f"{_delta(block)} (Δ {_num(w['difference'], 3, '+')})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _difference_cell(test: dict) -> str:
  return f"{_num(test['difference'])} ({_p(test['mann_whitney']['p_value'])})"


def _config_value(v) -> str:
  if isinstance(v, (list, tuple)):
    return ", ".join(str(x) for x in v)
  return str(v)


def _methods_text(m: dict) -> list[str]:
  a, power = m["alpha"], m["power"]
  return [
      "## Methods", "",
      "- Headline, within question: Δ_q = mean alignment of question q's incorrect rollouts − "
      "mean of its correct ones (rollouts with an informative node); Δ = mean of Δ_q over the "
      "questions with both kinds. The unit is the question: intervals are 95% percentile "
      f"bootstraps over questions ({m['n_boot']} resamples).",
      f"- Permutation p: each question's rewards relabelled at random {m['n_perm']} times "
      "(every rollout's leave-one-out score recomputed: it reads the other rollouts' rewards "
      "through the shared counts, so shuffling labels over fixed scores would not be a valid "
      "null), two-sided around the null's mean, p = (1 + #extreme) / (1 + relabellings). The "
      "null's mean is not 0: a rollout that is correct lowers the others' counts on its own "
      "path. Δ − null: each Δ_q less its mean under relabelling, bootstrapped over questions. "
      "Wilcoxon p: signed-rank test over those centred Δ_q.",
      f"- Detectable |Δ|: (z_(1−α/2) + z_power) · sd(Δ_q) / √questions, α = {a:g}, power "
      f"{power:g} (normal approximation).",
      "- Strata: the question's accuracy in fixed thirds (over its rollouts); rollout length "
      "terciles within student × spec; Δ in a stratum is over the questions with both kinds "
      "inside it.",
      "- Regression: rollout alignment ~ incorrect + length + question fixed effects, OLS, "
      "errors clustered by question (CRV1, t with questions − 1 df); β is the coefficient of "
      "incorrect.",
      "- Pooled over questions (secondary): all rollouts of a spec in one Mann–Whitney test; "
      "easy questions have more correct rollouts and different alignment, so this confounds "
      "correctness with difficulty.", ""]


def _findings_text(summary: dict) -> list[str]:
  f = summary["findings"]
  d = f["direction"]
  alpha = f["alpha"]
  lines = []
  for student, s in f["students"].items():
    text = (f"{student}, within question ({d}): Δ = incorrect − correct, against its "
            f"relabelling null, is positive (incorrect "
            f"rollouts align better) for {s['n_incorrect_higher']} of {s['n_specs']} teacher "
            f"specs ({s['n_incorrect_higher_significant']} significant at p<{alpha:g}, "
            f"within-question permutation test) and negative for {s['n_correct_higher']} "
            f"({s['n_correct_higher_significant']} significant).")
    per_spec = [f"{spec} {_vs_null(w)}, p {_p(w['p_permutation'])}, {w['num_questions']} "
                f"questions" for spec, w in s["within_question"].items()
                if w["difference"] is not None and np.isfinite(w["difference"])]
    if per_spec:
      text += " Per spec, Δ − null [95% CI] (Δ): " + "; ".join(per_spec) + "."
    mde = [w["min_detectable"] for w in s["within_question"].values()
           if w["min_detectable"] is not None and np.isfinite(w["min_detectable"])]
    if mde:
      text += (f" Smallest |Δ| detectable at this size: {_num(min(mde))}–{_num(max(mde))}.")
    missing = s["n_specs"] - s["n_compared"]
    if missing:
      text += (f" {missing} spec(s) could not be compared (no question with both correct and "
               f"incorrect rollouts with an informative node).")
    text += (f" Pooled over questions (secondary, confounded by difficulty): Mann–Whitney "
             f"p<{alpha:g} for {len(s['specs_pooled_significant'])} of {s['n_specs']}.")
    lines.append(f"- {text}")
  for student, s in f["students"].items():
    m = s["best_spec_margin"]
    if s["best_spec"] is None:
      lines.append(f"- {student}: no question is scored under every teacher context, so there "
                   f"is no best one.")
      continue
    text = (f"- Best teacher context for {student}, within question: {s['best_spec']} "
            f"(highest mean question alignment over the {s['n_common_questions']} questions "
            f"every spec has")
    if m["runner_up"] is not None:
      text += f"; ahead of {m['runner_up']} by {_delta(m)}"
    lines.append(text + ").")
  best = f["best_spec"]
  if len(best) > 1:
    verb = "differs between" if f["best_spec_differs"] else "is the same for"
    lines.append(f"- The best teacher context {verb} students: "
                 + ", ".join(f"{k} → {v}" for k, v in best.items()) + ".")
  elif not f["students"]:
    lines.append("- No teacher context has a scored rollout, so there is no best one.")
  n_tests = max((s["n_compared"] for s in f["students"].values()), default=0)
  if n_tests > 1:
    lines.append(f"- {n_tests} specs are tested per student at α = {alpha:g} without a "
                 f"multiplicity correction: about {alpha * n_tests:.1f} false positive(s) per "
                 f"student are expected under no effect.")
  return lines + [""]


def _within_text(s: dict, dirs: list) -> list[str]:
  """The headline section: Δ and its tests per spec, Δ by stratum, Δ per direction."""
  primary, specs = dirs[0], s["specs"]
  lines = [f"### Within question ({primary})", "",
           "Δ = incorrect − correct, mean over questions with both kinds [95% CI over "
           "questions]; its mean under relabelled rewards (the null: not 0, see Methods) and "
           "Δ − null [95% CI], which the permutation p tests; questions (rollouts) behind it; "
           "regression β [CI] (p; questions); coverage = informative / scored nodes.", ""]
  rows = []
  for spec, b in specs.items():
    w, r, cov = b["within_question"], b["within_question"]["regression"], b["coverage"]
    beta = {"difference": r["coefficient"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
    vs_null = {"difference": w["difference_vs_null"], "ci_low": w["vs_null_ci_low"],
               "ci_high": w["vs_null_ci_high"]}
    rows.append([spec, f"{w['num_questions']} ({w['num_rollouts']})", _delta(w),
                 _num(w["null_mean"], 3, "+"), _delta(vs_null),
                 _p(w["p_permutation"]), _p(w["p_wilcoxon"]), _num(w["min_detectable"]),
                 f"{_delta(beta)} ({_p(r['p_value'])}; {r['num_questions']})",
                 f"{_num(cov['fraction'], 2)} ({cov['informative']}/{cov['nodes']})"])
  lines += _table(["spec", "questions (rollouts)", "Δ [95% CI]", "null mean", "Δ − null [95% CI]",
                   "permutation p", "Wilcoxon p", "detectable abs Δ", "regression β",
                   "coverage"], rows)

  strata = lambda b: b["within_question"]["strata"]
  if specs:
    first = strata(next(iter(specs.values())))
    names = [x["stratum"] for x in first["question_accuracy"] + first["length"]]
    ranges = "; ".join(f"{spec} " + ", ".join(x["range"] for x in strata(b)["length"])
                       for spec, b in specs.items())
    lines += [f"Δ within strata [95% CI] (questions with both kinds in the stratum); length "
              f"terciles: {ranges}.", ""]
    lines += _table(["spec"] + names, [
        [spec] + [f"{_delta(x, 2)} ({x['num_questions']})"
                  for x in strata(b)["question_accuracy"] + strata(b)["length"]]
        for spec, b in specs.items()])
  lines += ["Δ per direction [95% CI] (permutation p; questions):", ""]
  return lines + _table(["spec"] + list(dirs), [
      [spec] + [f"{_delta(w, 2)} ({_p(w['p_permutation'])}; {w['num_questions']})"
                for w in (b["tests"][d]["within_question"] for d in dirs)]
      for spec, b in specs.items()])


def _best_text(s: dict, primary: str) -> list[str]:
  """Specs compared on the questions they share: means, question wins, the best one."""
  means, m = s["spec_means"], s["best_spec_margin"]
  lines = [f"### Best context (within question, {primary})", "",
           f"Mean over the {s['n_common_questions']} questions every spec has of each "
           f"question's mean rollout alignment [95% CI over them]; question wins: share of "
           f"those questions on which the spec's mean is the highest.", ""]
  lines += _table(["spec", "mean [95% CI]", "question wins"], [
      [spec, f"{_num(v['mean'])} {_ci([v['ci_low'], v['ci_high']])}",
       _num(s["question_wins"][spec], 2)] for spec, v in means.items()])
  best = f"Best spec: {s['best_spec'] or 'n/a'}"
  if m["runner_up"] is not None:
    best += f", ahead of {m['runner_up']} by {_delta(m)} over {m['num_questions']} questions"
  return lines + [best + ".", ""]


def _pooled_text(s: dict, dirs: list) -> list[str]:
  """The secondary section: every rollout of a spec in one sample."""
  primary, specs = dirs[0], s["specs"]
  lines = ["### Pooled over questions (secondary: confounded by difficulty)", "",
           f"Every rollout of a spec in one sample ({primary}): mean cosine per rollout [95% "
           f"bootstrap CI over rollouts]; difference = incorrect − correct; weighted and "
           f"pooled cosines are over (rollout, node) pairs, correct / incorrect.", ""]
  rows = []
  for spec, b in specs.items():
    t = b["tests"][primary]
    c, i = b["correct"][primary], b["incorrect"][primary]
    rows.append([
        spec, _num(b["accuracy"]),
        f"{b['correct']['n_rollouts']} / {b['incorrect']['n_rollouts']}",
        f"{_num(c['mean'])} {_ci(c['mean_ci'])}", f"{_num(i['mean'])} {_ci(i['mean_ci'])}",
        f"{_num(t['difference'])} {_ci(t['difference_ci'])}", _p(t["mann_whitney"]["p_value"]),
        f"{_num(c['weighted'])} / {_num(i['weighted'])}",
        f"{_num(c['pooled'])} / {_num(i['pooled'])}"])
  lines += _table(["spec", "accuracy", "n correct / incorrect", "correct [CI]",
                   "incorrect [CI]", "difference [CI]", "Mann–Whitney p", "weighted",
                   "pooled"], rows)
  lines += ["Pooled incorrect − correct mean cosine per direction (Mann–Whitney p):", ""]
  return lines + _table(["spec"] + list(dirs), [
      [spec] + [_difference_cell(b["tests"][d]) for d in dirs] for spec, b in specs.items()])


def _student_text(student: str, s: dict, dirs: list) -> list[str]:
  primary, specs = dirs[0], s["specs"]
  lines = [f"## {student}", "", f"Accuracy {_num(s['accuracy'])} over {s['n_questions']} "
           f"questions.", ""]
  lines += _within_text(s, dirs) + _best_text(s, primary) + _pooled_text(s, dirs)
  unavailable = {spec: b["questions"]["context_unavailable"] for spec, b in specs.items()
                 if b["questions"]["context_unavailable"]}
  for spec, reasons in unavailable.items():
    why = "; ".join(f"{n} × {r}" for r, n in reasons.items())
    lines.append(f"- {spec}: context unavailable for {sum(reasons.values())} of "
                 f"{specs[spec]['questions']['n']} questions ({why}).")
  if unavailable:
    lines.append("")
  names = list(dict.fromkeys(n for b in specs.values() for n in b["covariates"]))
  lines += [f"Spearman ρ of node alignment ({primary}) with covariates, informative nodes "
            f"(p in parentheses):", ""]
  return lines + _table(["spec"] + names, [
      [spec] + [f"{_num(b['covariates'][n]['spearman'], 2)} ({_p(b['covariates'][n]['p'])})"
                for n in names] for spec, b in specs.items()])


def _value_ci(value, low, high) -> str:
  """"0.57 [0.43, 0.72]": the filters' table keeps two digits to stay readable."""
  return f"{_num(value, 2)} [{_num(low, 2)}, {_num(high, 2)}]"


def _kept_cell(block: dict) -> str:
  return _value_ci(block["value"], block["ci_low"], block["ci_high"])


def _filters_text(summary: dict) -> list[str]:
  """The cheap token filters against the primary direction's alignment (filters.calibrate)."""
  m = summary["methods"].get("proxies")
  if not m or not summary.get("proxies"):
    return []
  d, percents = m["direction"], [str(x) for x in m["keep_percents"]]
  lines = ["## Cheap token filters vs alignment", "",
           f"Each filter's node value is its mean over the node's on-policy rollout tokens "
           f"(higher = keep; proxies.py). Over informative nodes with {d} alignment: AUC = "
           f"P(filter of a node with align > 0 > filter of one with align ≤ 0), ties ½ "
           f"(Mann–Whitney U / n₁n₀; 0.5 = chance); top x%: mean {d} alignment of the nodes "
           f"the filter's top x% keep, then the share of Σ max(align, 0) they hold; the "
           f"oracle keeps the top x% by alignment, 'all nodes' is the mean over every node. "
           f"[95% CI]: percentile bootstrap over questions (whole questions resampled, "
           f"{summary['methods']['n_boot']} resamples); nodes (questions) behind each row.", ""]
  header = (["spec", "filter", "AUC [95% CI]", "nodes (questions)"]
            + [f"mean align, top {x}%" for x in percents]
            + [f"share of align⁺, top {x}%" for x in percents])
  for student, specs in summary["proxies"].items():
    rows = []
    for spec, by_proxy in specs.items():
      for name, e in by_proxy.items():
        rows.append([spec, name, _value_ci(e["auc"], e["ci_low"], e["ci_high"]),
                     f"{e['num_nodes']} ({e['num_questions']})"]
                    + [_kept_cell(e["kept_align"][x]) for x in percents]
                    + [_kept_cell(e["kept_positive"][x]) for x in percents])
      if by_proxy:  # every filter has a value at the same nodes: the oracle and reference once
        e = next(iter(by_proxy.values()))
        count = f"{e['num_nodes']} ({e['num_questions']})"
        rows.append([spec, "oracle (top by alignment)", "", count]
                    + [_kept_cell(e["oracle_kept_align"][x]) for x in percents]
                    + [_kept_cell(e["oracle_kept_positive"][x]) for x in percents])
        rows.append([spec, "all nodes", "", count] + [_kept_cell(e["all_align"])] * len(percents)
                    + ["1"] * len(percents))
    lines += [f"### {student}", ""] + _table(header, rows)
  return lines


def render(summary: dict, plots=(), explorer: str | None = None) -> str:
  """The markdown of ``report.md`` from a summary (as returned by summarize, or loaded back
  from summary.json with null for NaN). plots: png paths relative to the report, embedded in
  order; explorer: the token explorer's path relative to the report (linked at the top)."""
  dirs = summary["directions"]
  primary = dirs[0]
  students = summary["students"]
  specs = list(dict.fromkeys(spec for s in students.values() for spec in s["specs"]))
  lines = ["# Alignment report", "",
           f"Students: {', '.join(students) or 'none'}  ", f"Teacher specs: {', '.join(specs)}  ",
           "Questions: " + ", ".join(f"{k}: {s['n_questions']}" for k, s in students.items())
           + "  ",
           "Directions: " + ", ".join([f"{primary} (primary)"] + dirs[1:]), ""]
  if explorer:
    lines += [f"Token explorer: [{explorer}]({explorer}) (each rollout's tokens coloured by "
              f"{primary}; click a token for its node)", ""]
  if summary["config"]:
    lines += _table(["setting", "value"],
                    [[str(k), _config_value(v)] for k, v in summary["config"].items()])
  lines += ["## Findings", ""] + _findings_text(summary)
  lines += _methods_text(summary["methods"])
  for student, s in students.items():
    lines += _student_text(student, s, dirs)
  lines += _filters_text(summary)
  if plots:
    lines += ["## Plots", ""]
    pooled = [p for p in plots if os.path.basename(p) in POOLED_PLOTS]
    if pooled:
      lines += [f"{', '.join(pooled)}: rollouts pooled over questions (secondary).", ""]
    lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})\n" for p in plots]
  return "\n".join(lines)
