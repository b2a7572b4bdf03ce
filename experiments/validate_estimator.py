"""How far the estimated ideal gradient is from the exact one, at what rollout budget: uniform
on-policy rollouts vs initial rollouts + targeted rollouts (MATH.md "Exact reference").

Setting: a random tiny Qwen3 student and teacher (same architecture, other seeds, logits
spread by scaling ``lm_head``) whose policies are restricted to ``--vocab`` (EOS included,
renormalised there: the sampler gets the same ``vocab_mask``, ``exact.enumerate_tree`` the
same renormalisation, T = 1 for both; the script checks on every sampled token that the
sampler's recorded log π equals the enumeration's). A sequence ends at EOS or after
``--horizon`` tokens; the reward is 1 when the generated ids hold an odd number of
``--reward_token``, a parity that keeps V away from 0 and 1.

For every budget B (rollouts per question, everything included) and seed:
  uniform:  B on-policy rollouts;
  targeted: G0 = ``--initial_rollouts`` on-policy rollouts + B − G0 targeted ones (one round
            by default, from the initial tree).
The sampler draws row g of a question with a key of (seed, question, g) only, so the first G0
rollouts are the same rollouts in both methods. Their non-terminal prefixes are the shared
evaluation set (the nodes whose alignment a distillation run with G0 rollouts would score).
Measured per seed, questions pooled:
  mean_cos_to_exact     mean cos(ĝ*, g*_exact) over the evaluation nodes informative under the
                        estimate (the headline, and the one the 0.9 target is read from);
  mean_abs_align_error  mean |Âlign − Align_exact| there (reverse KL; Align = cos(g, d_rkl));
  coverage              informative evaluation nodes / evaluation nodes;
  tree_*                the same over every informative node of the method's whole tree
                        (coverage = informative / nodes with a child): each method on its own
                        nodes, dominated by barely visited nodes at the tree's frontier.
Intervals are percentile bootstraps over seeds.

  python -m experiments.validate_estimator --out=/tmp/validate

With its defaults (the student-only ideal_error priority) it took 388 s on 2 CPU cores shared
with other jobs (204 s before, alone; about 150 s of it the first seed's
compilations).

Writes summary.json ({"records": [...]}, one per method × budget), report.md, error_vs_budget.png
and config.json into --out.
"""

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from experiments import cli

flags.DEFINE_string("out", None, "output directory (created)")
flags.DEFINE_list("budgets", ["8", "16", "32", "64", "128", "256", "512", "1024"],
                  "total rollouts per question")
flags.DEFINE_integer("seeds", 4, "independent repetitions (bootstrap units)")
flags.DEFINE_integer("questions", 2, "prompts (questions), pooled within a seed")
flags.DEFINE_integer("horizon", 7, "most generated tokens")
flags.DEFINE_list("vocab", ["1", "4", "7", "9"], "restricted token ids (EOS included)")
flags.DEFINE_integer("eos", 1, "EOS id (must be in --vocab)")
flags.DEFINE_integer("reward_token", 4, "reward 1 when the rollout holds an odd count of it")
flags.DEFINE_float("logit_scale", 8.0, "lm_head scale of the random models (spread policies)")
flags.DEFINE_integer("initial_rollouts", 8, "targeted: initial on-policy rollouts per question "
                     "(their nodes are the shared evaluation set)")
flags.DEFINE_integer("num_continuations", 4, "targeted: M continuations per pair")
flags.DEFINE_integer("rounds", 1, "targeted: rounds")
flags.DEFINE_enum("priority", "ideal_error",
                  ["ideal_error", "reverse_kl", "forward_kl", "jsd", "prob_gap"],
                  "targeted: pair priority")
flags.DEFINE_float("tolerance", 0.01, "targeted (ideal_error): a pair stops once its share of "
                   "the error of ĝ* is below this")
flags.DEFINE_integer("min_trials", 1 << 30, "targeted: a pair is a candidate while n_k < this "
                     "(default: every pair; the budget also refines visited children)")
flags.DEFINE_enum("surplus", "even", ["even", "priority"], "targeted: how budget left once "
                  "every pair has M continuations is dealt")
flags.DEFINE_float("target_cos", 0.9, "the mean cos(ĝ*, g*_exact) a method must reach")
flags.DEFINE_integer("bootstrap", 2000, "bootstrap resamples")
FLAGS = flags.FLAGS

METHODS = ("uniform", "targeted")
VOCAB_SIZE = 32


def model_setup(logit_scale):
  """Student and teacher: one tiny architecture, two random inits, lm_head scaled."""
  from gradalign_jax import models

  cfg = models.Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           max_position_embeddings=64)

  def make(seed):
    p = models.init_params(cfg, seed)
    p["lm_head"] = p["lm_head"].replace(p["lm_head"][...] * logit_scale)
    return p

  return cfg, make(0), make(1)


def parity_reward(token, eos):
  def reward(generated):
    return float(sum(1 for t in generated if t == token) % 2 == 1)
  return reward


def exact_reference(cfg, student, teacher, prompt, vocab, horizon, reward_fn, eos):
  """(student ExactTree, teacher ExactTree): exact restricted policies and the student's V."""
  from gradalign_jax import exact

  return (exact.enumerate_tree(cfg, student, prompt, vocab, horizon, reward_fn, eos),
          exact.enumerate_tree(cfg, teacher, prompt, vocab, horizon, reward_fn, eos))


def _dense_logp(tree_exact, prefixes, v):
  """log π at each prefix over the full vocabulary (−1e30 off the restricted vocab)."""
  out = np.full((len(prefixes), v), -1e30, np.float32)
  for i, u in enumerate(prefixes):
    out[i, list(tree_exact.vocab)] = np.log(np.maximum(tree_exact.probs[u], 1e-38))
  return out


def node_errors(arrays, node_ids, es, et, v):
  """cos(ĝ*, g*_exact) and |Âlign − Align_exact| (reverse KL) at tree nodes (float64[I] each).

  ĝ* uses the tree's Q̂ and observed children with the exact restricted π (the sampler's
  policy, checked by ``check_policy``); d_rkl the exact restricted student and teacher π."""
  from gradalign_jax import gradients

  if not len(node_ids):
    return np.zeros(0), np.zeros(0)
  mask = np.zeros(v, bool)
  mask[list(es.vocab)] = True
  n = len(node_ids)
  # Padded to a power of two by repeating the first node: eager jax ops compile per shape.
  node_ids = np.concatenate([node_ids, np.full((1 << (n - 1).bit_length()) - n, node_ids[0])])
  prefixes = [arrays.path(int(i)) for i in node_ids]
  q, obs, _ = arrays.children_dense(node_ids, v)
  logp = _dense_logp(es, prefixes, v)
  logq = _dense_logp(et, prefixes, v)
  g_hat = np.asarray(gradients.ideal_direction(logp, q, obs, mask))
  g = np.stack([es.ideal_gradient(u, v) for u in prefixes])
  d = np.asarray(gradients.reverse_kl_direction(logp, logq, mask))
  cos = np.asarray(gradients.alignment(g_hat, g), np.float64)
  err = np.abs(np.asarray(gradients.alignment(g_hat, d), np.float64)
               - np.asarray(gradients.alignment(g, d), np.float64))
  return cos[:n], err[:n]


def evaluate(pool, es, et, eval_prefixes, v):
  """One question's tree against the exact reference, on two node sets.

  eval_prefixes: the shared evaluation set (non-terminal prefixes of the first
  ``--initial_rollouts`` rollouts, identical for both methods). Returns dict: eval_cos,
  eval_err over the evaluation nodes informative under the estimate, eval_nodes (set size);
  tree_cos, tree_err over every informative node of the tree, tree_internal (nodes with a
  child).
  """
  arrays = pool.tree.arrays()
  ids = [pool.tree.find(u) for u in eval_prefixes]
  inf = np.asarray([i for i in ids if i is not None and arrays.informative[i]], np.int64)
  eval_cos, eval_err = node_errors(arrays, inf, es, et, v)
  tree_cos, tree_err = node_errors(arrays, np.flatnonzero(arrays.informative), es, et, v)
  return dict(eval_cos=eval_cos, eval_err=eval_err, eval_nodes=len(eval_prefixes),
              tree_cos=tree_cos, tree_err=tree_err,
              tree_internal=int((arrays.child_count > 0).sum()))


def check_policy(ro, exact_trees, vocab):
  """Largest |log π_sampler − log π_exact| over every sampled (not forced) token."""
  worst = 0.0
  for b in range(len(ro)):
    es = exact_trees[int(ro.question[b])]
    seq = ro.sequence(b)
    for t, k in enumerate(seq):
      lp = ro.logprobs[b, t]
      if np.isnan(lp):
        continue
      want = np.log(es.probs[tuple(seq[:t])][vocab.index(k)])
      worst = max(worst, abs(float(lp) - want))
  return worst


def run_one(method, budget, seed, setup, tcfg_kwargs):
  """One method × budget × seed over all questions: per-question evaluate() dicts, rollouts
  used per question, the sampler-vs-exact policy check, and the evaluation prefixes."""
  from gradalign_jax import sampling, scoring, targeted

  cfg, student, teacher, prompts, refs, mask, reward_fn, scfg, vocab = setup
  nq = len(prompts)
  initial = budget if method == "uniform" else min(budget, FLAGS.initial_rollouts)
  ro = sampling.sample(cfg, student, prompts, scfg, num_samples=initial, seed=seed,
                       vocab_mask=mask)
  worst = check_policy(ro, [r[0] for r in refs], vocab)
  pools, eval_sets = [], []
  for q in range(nq):
    pool = targeted.RolloutPool()
    rows = np.flatnonzero(ro.question == q)
    pool.add(ro, [reward_fn(tuple(ro.sequence(r))) for r in rows], rows)
    pools.append(pool)
    # Row g of question q has the same key in both methods' sample calls: the first
    # initial_rollouts rows (and so this set) are the same rollouts for both.
    first = rows[:FLAGS.initial_rollouts]
    eval_sets.append(sorted({tuple(ro.sequence(r)[:t]) for r in first
                             for t in range(ro.lengths[r])}))
  if method == "targeted" and budget > initial:
    tcfg = targeted.TargetedConfig(budget=budget - initial, **tcfg_kwargs)
    targeted.targeted_rollouts(
        pools, [scoring.PromptedModel(cfg, student, p) for p in prompts],
        [scoring.PromptedModel(cfg, teacher, p) for p in prompts] if tcfg.per_spec else None,
        tcfg, reward_fn, mask, policy=scfg, seed=seed, chunk_nodes=64)
    for pool in pools:
      for br in pool.batches[1:]:
        worst = max(worst, check_policy(br, [r[0] for r in refs], vocab))
  evals = [evaluate(pool, refs[q][0], refs[q][1], eval_sets[q], cfg.vocab_size)
           for q, pool in enumerate(pools)]
  return evals, [p.num_rollouts for p in pools], worst, eval_sets


def seed_summary(evals):
  """Pools the questions of one seed into scalar metrics (NaN when no node is informative)."""
  cat = lambda k: np.concatenate([e[k] for e in evals])
  mean = lambda x: float(x.mean()) if len(x) else np.nan
  eval_cos, tree_cos = cat("eval_cos"), cat("tree_cos")
  return dict(mean_cos_to_exact=mean(eval_cos), mean_abs_align_error=mean(cat("eval_err")),
              coverage=len(eval_cos) / max(sum(e["eval_nodes"] for e in evals), 1),
              tree_mean_cos_to_exact=mean(tree_cos),
              tree_mean_abs_align_error=mean(cat("tree_err")),
              tree_coverage=len(tree_cos) / max(sum(e["tree_internal"] for e in evals), 1))


METRICS = ("mean_cos_to_exact", "mean_abs_align_error", "coverage", "tree_mean_cos_to_exact",
           "tree_mean_abs_align_error", "tree_coverage")


def reach_budget(records, method, target, key="mean_cos_to_exact"):
  """Smallest budget from which the mean cos (point estimate) is ≥ target at that and every
  larger budget of the run; None if none."""
  rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["budget"])
  best = None
  for r in reversed(rows):
    if not r[key] >= target:
      break
    best = r["budget"]
  return best


def verdict_line(reach, budgets):
  u, t = reach["uniform"], reach["targeted"]
  top = max(budgets)
  if u and t:
    return (f"targeted/uniform budget = {t}/{u} = {t / u:.3g}: the ≤ ¼ target is "
            + ("met." if t <= u / 4 else "NOT met."))
  if t:
    return (f"targeted reaches it at {t}; uniform never does up to {top}, so the ratio is "
            f"below {t}/{top} = {t / top:.3g}: the ≤ ¼ target is "
            + ("met." if t <= top / 4 else "undecided (uniform might reach it just past the "
               "range)."))
  if u:
    return "uniform reaches it and targeted never does: the ≤ ¼ target is NOT met."
  return "neither method reaches it in this range: the ≤ ¼ target is NOT shown."


def write_report(out, records, meta):
  """report.md: the table, the budget at which each method reaches the target, and the
  verdict on the ≤ ¼ goal, all from ``records``."""
  target = meta["target_cos"]
  lines = ["# Estimator validation: uniform vs targeted rollouts against exact values", "",
           f"Command: `{meta['command']}`  ", f"Wall time: {meta['wall_s']:.0f} s on this "
           f"machine; {meta['seeds']} seeds × {meta['questions']} questions; horizon "
           f"{meta['horizon']}, vocab {meta['vocab']} (EOS {meta['eos']}), exact V(root) "
           f"{[round(x, 3) for x in meta['exact_root_values']]}; targeted: "
           f"{meta['initial_rollouts']} initial rollouts, M = {meta['num_continuations']}, "
           f"priority {meta['priority']}, surplus {meta['surplus']}, min_trials "
           f"{'none' if meta['min_trials'] >= 1 << 30 else meta['min_trials']}, rounds "
           f"{meta['rounds']}.  ",
           f"Sampler vs exact policy: max |Δ log π| = {meta['policy_check']:.2e} over every "
           f"sampled token. Evaluation sets that differ between the methods: "
           f"{meta['differing_eval_sets']}.", "",
           "Evaluation set: the non-terminal prefixes of the first "
           f"{meta['initial_rollouts']} rollouts of each question (the same rollouts for both "
           "methods). cos = mean cos(ĝ*, g*_exact) over the evaluation nodes informative under "
           "the estimate; align err = mean |Âlign − Align_exact| (reverse KL) there; coverage "
           "= informative / evaluation nodes. tree cos, tree cov: the same over each method's "
           "whole tree (every informative node; coverage = informative / nodes with a child). "
           "Intervals: 95% percentile bootstrap over seeds.", "",
           "| method | budget | cos | align err | coverage | tree cos | tree cov |",
           "|---|---|---|---|---|---|---|"]
  fmt = lambda r, k: f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]"
  for r in sorted(records, key=lambda r: (r["method"], r["budget"])):
    lines.append(f"| {r['method']} | {r['budget']} | {fmt(r, 'mean_cos_to_exact')} | "
                 f"{fmt(r, 'mean_abs_align_error')} | {fmt(r, 'coverage')} | "
                 f"{fmt(r, 'tree_mean_cos_to_exact')} | {fmt(r, 'tree_coverage')} |")
  reach = {m: reach_budget(records, m, target) for m in METHODS}
  tree_reach = {m: reach_budget(records, m, target, "tree_mean_cos_to_exact") for m in METHODS}
  verdict = verdict_line(reach, meta["budgets"])
  lines += ["", f"## Budget reaching mean cos(ĝ*, g*_exact) ≥ {target} on the evaluation nodes",
            ""]
  for m in METHODS:
    lines.append(f"- {m}: " + (f"{reach[m]} rollouts per question (and every larger budget "
                               "run)" if reach[m] else "never within the budgets run "
                               f"({min(meta['budgets'])}…{max(meta['budgets'])})"))
  for m in METHODS:
    if reach[m]:
      r = next(r for r in records if r["method"] == m and r["budget"] == reach[m])
      lines.append(f"- at {reach[m]}, {m} covers {r['coverage']:.3f} of the evaluation nodes")
  lines += ["", "The mean is over informative nodes only: at low coverage it rests on a few "
            "well-visited nodes, which is why the smallest budgets can look good; hence the "
            "'and every larger budget' rule.", "", verdict, "",
            f"Over each method's whole tree (tree cos): uniform "
            f"{tree_reach['uniform'] or 'never'}, targeted {tree_reach['targeted'] or 'never'}; "
            + verdict_line(tree_reach, meta["budgets"]), ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return reach, tree_reach, verdict


def plot(out, records, target):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  panels = (("mean_cos_to_exact", "1 − mean cos(ĝ*, g*_exact), evaluation nodes"),
            ("mean_abs_align_error", "mean |Âlign − Align_exact|, evaluation nodes"),
            ("tree_mean_cos_to_exact", "1 − mean cos(ĝ*, g*_exact), whole tree"))
  for m, color in zip(METHODS, ("tab:blue", "tab:orange")):
    rows = sorted((r for r in records if r["method"] == m), key=lambda r: r["budget"])
    b = [r["budget"] for r in rows]
    for ax, (key, label) in zip(axes, panels):
      y, lo, hi = (np.asarray([r[key + s] for r in rows]) for s in ("", "_lo", "_hi"))
      if key != "mean_abs_align_error":
        y, lo, hi = 1 - y, 1 - hi, 1 - lo
      ax.plot(b, y, "o-", color=color, label=m)
      ax.fill_between(b, lo, hi, color=color, alpha=0.2)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("rollouts per question")
      ax.set_title(label, fontsize=9)
  for i in (0, 2):
    axes[i].axhline(1 - target, color="gray", ls="--", lw=1, label=f"cos = {target}")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "error_vs_budget.png"), dpi=120)
  plt.close(fig)


PROMPT_TOKENS, CACHE_LEN = 3, 16  # the prompts' length and the sampler's cache


def _ints(name: str) -> list[int]:
  try:
    return [int(x) for x in FLAGS[name].value]
  except ValueError:
    raise ValueError(f"--{name}={','.join(FLAGS[name].value)} must be integers") from None


def check_flags() -> tuple[list[int], list[int]]:
  """(vocab, sorted budgets) once every flag is checked, before anything is computed or
  written: a bad value gives NaN tables or a crash at the end otherwise."""
  if not FLAGS.out:
    raise ValueError("--out is required (the directory for summary.json and report.md)")
  if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
    raise ValueError(f"--out={FLAGS.out} is a file; pass a directory")
  vocab, budgets = _ints("vocab"), sorted(_ints("budgets"))
  wrong = [
      (any(not 0 <= x < VOCAB_SIZE for x in vocab) or len(set(vocab)) < len(vocab)
       or len(vocab) < 2, f"--vocab={vocab} must be ≥ 2 distinct ids in [0, {VOCAB_SIZE})"),
      (FLAGS.eos not in vocab, f"--eos={FLAGS.eos} must be one of --vocab={vocab}"),
      (FLAGS.reward_token not in vocab or FLAGS.reward_token == FLAGS.eos,
       f"--reward_token={FLAGS.reward_token} must be one of --vocab={vocab} other than --eos "
       "(otherwise every reward is 0)"),
      (FLAGS.seeds < 1 or FLAGS.questions < 1 or FLAGS.bootstrap < 1,
       f"--seeds={FLAGS.seeds}, --questions={FLAGS.questions}, --bootstrap={FLAGS.bootstrap} "
       "must each be ≥ 1"),
      (not 1 <= FLAGS.horizon <= CACHE_LEN - PROMPT_TOKENS,
       f"--horizon={FLAGS.horizon} must be in [1, {CACHE_LEN - PROMPT_TOKENS}]"),
      (FLAGS.initial_rollouts < 1, f"--initial_rollouts={FLAGS.initial_rollouts} must be ≥ 1"),
      (not budgets or budgets[0] < FLAGS.initial_rollouts,
       f"--budgets={budgets}: every budget must be ≥ --initial_rollouts="
       f"{FLAGS.initial_rollouts} (the targeted method spends those first)"),
      (FLAGS.num_continuations < 1 or FLAGS.rounds < 1 or FLAGS.min_trials < 1,
       "--num_continuations, --rounds and --min_trials must each be ≥ 1"),
      (not np.isfinite(FLAGS.logit_scale) or FLAGS.logit_scale <= 0,
       f"--logit_scale={FLAGS.logit_scale} must be a finite number > 0"),
      (not -1 < FLAGS.target_cos <= 1, f"--target_cos={FLAGS.target_cos} must be in (-1, 1]"),
  ]
  for bad, message in wrong:
    if bad:
      raise ValueError(message)
  return vocab, budgets


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  try:
    vocab, budgets = check_flags()
    os.makedirs(FLAGS.out, exist_ok=True)
  except (ValueError, OSError) as e:
    cli.fail(str(e))
  from gradalign_jax import compilation, sampling
  from gradalign_jax.analysis import stats

  compilation.enable()  # a rerun skips compiles
  start = time.time()

  cfg, student, teacher = model_setup(FLAGS.logit_scale)
  rng = np.random.default_rng(1234)
  prompts = [[int(x) for x in rng.choice([t for t in range(10, VOCAB_SIZE)], PROMPT_TOKENS,
                                         replace=False)]
             for _ in range(FLAGS.questions)]
  reward_fn = parity_reward(FLAGS.reward_token, FLAGS.eos)
  refs = [exact_reference(cfg, student, teacher, p, vocab, FLAGS.horizon, reward_fn, FLAGS.eos)
          for p in prompts]
  logging.info("exact references in %.1f s; V(root) = %s", time.time() - start,
               [round(r[0].values[()], 3) for r in refs])
  mask = np.zeros(VOCAB_SIZE, bool)
  mask[vocab] = True
  scfg = sampling.SamplingConfig(max_new_tokens=FLAGS.horizon, temperature=1.0,
                                 eos_ids=(FLAGS.eos,), max_cache_len=CACHE_LEN)
  setup = (cfg, student, teacher, prompts, refs, mask, reward_fn, scfg, vocab)
  tcfg_kwargs = dict(num_continuations=FLAGS.num_continuations, rounds=FLAGS.rounds,
                     priority=FLAGS.priority, min_trials=FLAGS.min_trials,
                     surplus=FLAGS.surplus, tolerance=FLAGS.tolerance)
  per_seed = {(m, b): [] for m in METHODS for b in budgets}
  used = {(m, b): [] for m in METHODS for b in budgets}
  worst = 0.0
  differing_sets = 0  # evaluation sets that differ between methods (fp ties in a draw)
  for seed in range(FLAGS.seeds):
    for b in budgets:
      sets = []
      for m in METHODS:
        evals, n_used, w, eval_sets = run_one(m, b, seed, setup, tcfg_kwargs)
        per_seed[(m, b)].append(seed_summary(evals))
        used[(m, b)].append(np.mean(n_used))
        worst = max(worst, w)
        sets.append(eval_sets)
      differing_sets += sum(x != y for x, y in zip(*sets))
    logging.info("seed %d done at %.0f s", seed, time.time() - start)
  records = []
  for (m, b), rows in per_seed.items():
    rec = dict(method=m, budget=b, rollouts_used=float(np.mean(used[(m, b)])),
               seeds=len(rows))
    for k in METRICS:
      vals = np.asarray([r[k] for r in rows], np.float64)
      rec[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
      lo, hi = stats.bootstrap_ci(vals, n_boot=FLAGS.bootstrap, seed=b)
      rec[k + "_lo"], rec[k + "_hi"] = float(lo), float(hi)
      rec[k + "_per_seed"] = vals.tolist()
    records.append(rec)
  wall = time.time() - start
  fmt = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v
  meta = dict(command="python -m experiments.validate_estimator " + " ".join(
      f"--{k}={fmt(v)}" for k, v in FLAGS.flag_values_dict().items()
      if k in {f.name for f in FLAGS.get_key_flags_for_module(__name__)}
      and FLAGS[k].present), wall_s=wall, differing_eval_sets=int(differing_sets),
      seeds=FLAGS.seeds, questions=FLAGS.questions,
      horizon=FLAGS.horizon, vocab=vocab, eos=FLAGS.eos, budgets=budgets,
      initial_rollouts=FLAGS.initial_rollouts, num_continuations=FLAGS.num_continuations,
      priority=FLAGS.priority, surplus=FLAGS.surplus, min_trials=FLAGS.min_trials,
      rounds=FLAGS.rounds,
      target_cos=FLAGS.target_cos, policy_check=worst, prompts=prompts,
      exact_root_values=[float(r[0].values[()]) for r in refs])
  reach, tree_reach, verdict = write_report(FLAGS.out, records, meta)
  plot(FLAGS.out, records, FLAGS.target_cos)
  with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
    json.dump({"records": records, "reach_budget": reach, "tree_reach_budget": tree_reach,
               "verdict": verdict, "meta": meta}, f, indent=1)
  if worst > 1e-3:
    raise RuntimeError(f"the sampler's policy differs from the exact enumeration's by "
                       f"{worst:.2e} in log π: the comparison is void")
  logging.info("done in %.0f s: %s", wall, verdict)


if __name__ == "__main__":
  app.run(main)
