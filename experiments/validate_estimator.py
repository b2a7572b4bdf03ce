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
  targeted: ⌈f·B⌉ on-policy rollouts (f = ``--initial_fraction``) + B − ⌈f·B⌉ targeted ones.
Measured on each question's tree, over the nodes informative under the estimate:
  cos(ĝ*, g*_exact), |Âlign − Align_exact| for reverse KL (Align = cos(g, d_rkl)), and
coverage = informative nodes / nodes with a child. Also, on one fixed set for both methods,
the on-policy-weighted cosine Σ_u P(u) cos_u / Σ_u P(u) over every non-terminal prefix u of the
exact tree (cos_u = 0 where u is not informative under the estimate, P(u) = the student's
probability of reaching u). Per-seed values pool the questions; intervals are percentile
bootstraps over seeds.

  python -m experiments.validate_estimator --out=/tmp/validate

Writes summary.json ({"records": [...]}, one per method × budget), report.md, error_vs_budget.png
and config.json into --out.
"""

import json
import os
import time

import numpy as np
from absl import app, flags, logging

flags.DEFINE_string("out", None, "output directory (created)")
flags.DEFINE_list("budgets", ["8", "16", "32", "64", "128", "256", "512", "1024"],
                  "total rollouts per question")
flags.DEFINE_integer("seeds", 6, "independent repetitions (bootstrap units)")
flags.DEFINE_integer("questions", 3, "prompts (questions), pooled within a seed")
flags.DEFINE_integer("horizon", 7, "most generated tokens")
flags.DEFINE_list("vocab", ["1", "4", "7", "9"], "restricted token ids (EOS included)")
flags.DEFINE_integer("eos", 1, "EOS id (must be in --vocab)")
flags.DEFINE_integer("reward_token", 4, "reward 1 when the rollout holds an odd count of it")
flags.DEFINE_float("logit_scale", 8.0, "lm_head scale of the random models (spread policies)")
flags.DEFINE_float("initial_fraction", 0.25, "targeted: share of the budget spent on initial "
                   "on-policy rollouts")
flags.DEFINE_integer("num_continuations", 4, "targeted: M continuations per pair")
flags.DEFINE_integer("rounds", 1, "targeted: rounds")
flags.DEFINE_enum("priority", "reverse_kl", ["reverse_kl", "forward_kl", "jsd", "prob_gap"],
                  "targeted: pair priority")
flags.DEFINE_integer("min_trials", 4, "targeted: a pair is a candidate while n_k < this")
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
  """Exact student tree, exact teacher policy at every prefix, and reach probabilities.

  Returns (student ExactTree, teacher ExactTree, {prefix: P(reach)} over non-terminal ones)."""
  from gradalign_jax import exact

  es = exact.enumerate_tree(cfg, student, prompt, vocab, horizon, reward_fn, eos)
  et = exact.enumerate_tree(cfg, teacher, prompt, vocab, horizon, reward_fn, eos)
  reach = {(): 1.0}
  for u in sorted(es.probs, key=len):
    for k, pk in zip(es.vocab, es.probs[u]):
      if u + (k,) in es.probs:
        reach[u + (k,)] = reach[u] * pk
  return es, et, reach


def _dense_logp(tree_exact, prefixes, v):
  """log π at each prefix over the full vocabulary (−1e30 off the restricted vocab)."""
  out = np.full((len(prefixes), v), -1e30, np.float32)
  for i, u in enumerate(prefixes):
    out[i, list(tree_exact.vocab)] = np.log(np.maximum(tree_exact.probs[u], 1e-38))
  return out


def evaluate(pool, es, et, reach, v):
  """Per-node errors of one question's tree against the exact reference.

  Returns dict: cos (float64[I]) and align_err (float64[I]) over the I informative nodes,
  num_informative, num_internal, weighted_num, weighted_den (on-policy-weighted cosine parts).
  """
  from gradalign_jax import gradients, tree as tree_lib

  arrays = pool.tree.arrays()
  mask = np.zeros(v, bool)
  mask[list(es.vocab)] = True
  ids = np.flatnonzero(arrays.informative)
  prefixes = [arrays.path(int(i)) for i in ids]
  res = dict(num_informative=len(ids), num_internal=int((arrays.child_count > 0).sum()),
             weighted_den=float(sum(reach.values())))
  if not len(ids):
    return dict(res, cos=np.zeros(0), align_err=np.zeros(0), weighted_num=0.0)
  q, obs, _ = arrays.children_dense(ids, v)
  logp = _dense_logp(es, prefixes, v)
  logq = _dense_logp(et, prefixes, v)
  g_hat = np.asarray(gradients.ideal_direction(logp, q, obs, mask))
  g = np.stack([es.ideal_gradient(u, v) for u in prefixes])
  d = np.asarray(gradients.reverse_kl_direction(logp, logq, mask))
  cos = np.asarray(gradients.alignment(g_hat, g), np.float64)
  align_err = np.abs(np.asarray(gradients.alignment(g_hat, d), np.float64)
                     - np.asarray(gradients.alignment(g, d), np.float64))
  weighted = sum(reach.get(u, 0.0) * c for u, c in zip(prefixes, cos))
  del tree_lib
  return dict(res, cos=cos, align_err=align_err, weighted_num=float(weighted))


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
  used per question, and the sampler-vs-exact policy check."""
  from gradalign_jax import sampling, scoring, targeted

  cfg, student, teacher, prompts, refs, mask, reward_fn, scfg, vocab = setup
  nq = len(prompts)
  initial = budget if method == "uniform" else max(1, int(np.ceil(FLAGS.initial_fraction
                                                                  * budget)))
  ro = sampling.sample(cfg, student, prompts, scfg, num_samples=initial, seed=seed,
                       vocab_mask=mask)
  worst = check_policy(ro, [r[0] for r in refs], vocab)
  pools = []
  for q in range(nq):
    pool = targeted.RolloutPool()
    rows = np.flatnonzero(ro.question == q)
    pool.add(ro, [reward_fn(tuple(ro.sequence(r))) for r in rows], rows)
    pools.append(pool)
  if method == "targeted" and budget > initial:
    tcfg = targeted.TargetedConfig(budget=budget - initial, **tcfg_kwargs)
    targeted.targeted_rollouts(
        pools, [scoring.Policy(cfg, student, p) for p in prompts],
        [scoring.Policy(cfg, teacher, p) for p in prompts], tcfg, reward_fn, mask,
        temperature=scfg.temperature, seed=seed, chunk_nodes=64)
    for pool in pools:
      for br in pool.batches[1:]:
        worst = max(worst, check_policy(br, [r[0] for r in refs], vocab))
  evals = [evaluate(pool, *refs[q], cfg.vocab_size) for q, pool in enumerate(pools)]
  return evals, [p.num_rollouts for p in pools], worst


def seed_summary(evals):
  """Pools the questions of one seed into scalar metrics (NaN when no node is informative)."""
  cos = np.concatenate([e["cos"] for e in evals])
  err = np.concatenate([e["align_err"] for e in evals])
  inf = sum(e["num_informative"] for e in evals)
  internal = sum(e["num_internal"] for e in evals)
  return dict(mean_cos_to_exact=float(cos.mean()) if len(cos) else np.nan,
              mean_abs_align_error=float(err.mean()) if len(err) else np.nan,
              coverage=inf / max(internal, 1),
              weighted_cos_to_exact=float(np.mean([e["weighted_num"] / e["weighted_den"]
                                                   for e in evals])),
              informative_nodes=inf / len(evals))


METRICS = ("mean_cos_to_exact", "mean_abs_align_error", "coverage", "weighted_cos_to_exact",
           "informative_nodes")


def reach_budget(records, method, target):
  """Smallest budget whose mean cos (point estimate) is ≥ target, and stays so at every larger
  budget of the run; None if none."""
  rows = sorted((r for r in records if r["method"] == method), key=lambda r: r["budget"])
  best = None
  for r in reversed(rows):
    if not r["mean_cos_to_exact"] >= target:
      break
    best = r["budget"]
  return best


def write_report(out, records, meta):
  """report.md: the table, the budget at which each method reaches the target, and the
  verdict on the ≤ ¼ goal, all from ``records``."""
  target = meta["target_cos"]
  lines = ["# Estimator validation: uniform vs targeted rollouts against exact values", "",
           f"Command: `{meta['command']}`  ", f"Wall time: {meta['wall_s']:.0f} s; "
           f"{meta['seeds']} seeds × {meta['questions']} questions; horizon {meta['horizon']}, "
           f"vocab {meta['vocab']} (EOS {meta['eos']}); targeted: initial fraction "
           f"{meta['initial_fraction']}, M = {meta['num_continuations']}, priority "
           f"{meta['priority']}, min_trials {meta['min_trials']}, rounds {meta['rounds']}.  ",
           f"Sampler vs exact policy: max |Δ log π| = {meta['policy_check']:.2e} over every "
           "sampled token.", "",
           "Intervals: 95% percentile bootstrap over seeds. cos = mean cos(ĝ*, g*_exact) over "
           "informative nodes; align err = mean |Âlign − Align_exact| (reverse KL); coverage = "
           "informative / nodes with a child; weighted cos = Σ P(u) cos_u / Σ P(u) over every "
           "non-terminal prefix (0 where not informative).", "",
           "| method | budget | rollouts used | cos | align err | coverage | weighted cos |",
           "|---|---|---|---|---|---|---|"]
  fmt = lambda r, k: f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]"
  for r in sorted(records, key=lambda r: (r["method"], r["budget"])):
    lines.append(f"| {r['method']} | {r['budget']} | {r['rollouts_used']:.0f} | "
                 f"{fmt(r, 'mean_cos_to_exact')} | {fmt(r, 'mean_abs_align_error')} | "
                 f"{fmt(r, 'coverage')} | {fmt(r, 'weighted_cos_to_exact')} |")
  reach = {m: reach_budget(records, m, target) for m in METHODS}
  lines += ["", f"## Budget reaching mean cos ≥ {target}", ""]
  for m in METHODS:
    lines.append(f"- {m}: " + (f"{reach[m]} rollouts per question (and every larger budget)"
                               if reach[m] else f"never within the budgets run "
                               f"({min(meta['budgets'])}…{max(meta['budgets'])})"))
  u, t = reach["uniform"], reach["targeted"]
  if u and t:
    verdict = (f"targeted/uniform = {t}/{u} = {t / u:.3g}: the ≤ ¼ target is "
               + ("met." if t <= u / 4 else "NOT met."))
  elif t and not u:
    verdict = ("targeted reaches it and uniform never does in this range: the ratio is below "
               f"{t}/{max(meta['budgets'])} = {t / max(meta['budgets']):.3g} at most if uniform "
               "reached it just past the range, so the ≤ ¼ target is "
               + ("met." if t <= max(meta['budgets']) / 4 else "undecided (the range is too "
                  "short to tell)."))
  elif u and not t:
    verdict = "uniform reaches it and targeted never does: the ≤ ¼ target is NOT met."
  else:
    verdict = "neither method reaches it in this range: the ≤ ¼ target is NOT shown."
  lines += ["", verdict, ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return reach, verdict


def plot(out, records, target):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for m, color in zip(METHODS, ("tab:blue", "tab:orange")):
    rows = sorted((r for r in records if r["method"] == m), key=lambda r: r["budget"])
    b = [r["budget"] for r in rows]
    for ax, key, label in zip(axes, ("mean_cos_to_exact", "mean_abs_align_error",
                                     "weighted_cos_to_exact"),
                              ("1 − mean cos(ĝ*, g*_exact)", "mean |Âlign − Align_exact|",
                               "1 − weighted cos")):
      y = np.asarray([r[key] for r in rows])
      lo = np.asarray([r[key + "_lo"] for r in rows])
      hi = np.asarray([r[key + "_hi"] for r in rows])
      if key != "mean_abs_align_error":
        y, lo, hi = 1 - y, 1 - hi, 1 - lo
      ax.plot(b, y, "o-", color=color, label=m)
      ax.fill_between(b, lo, hi, color=color, alpha=0.2)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("rollouts per question")
      ax.set_ylabel(label)
  axes[0].axhline(1 - target, color="gray", ls="--", lw=1, label=f"cos = {target}")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "error_vs_budget.png"), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from gradalign_jax.analysis import stats

  if not FLAGS.out:
    raise app.UsageError("--out is required (the directory for summary.json and report.md)")
  os.makedirs(FLAGS.out, exist_ok=True)
  start = time.time()
  vocab = [int(x) for x in FLAGS.vocab]
  budgets = sorted(int(b) for b in FLAGS.budgets)
  if FLAGS.eos not in vocab:
    raise app.UsageError(f"--eos={FLAGS.eos} must be one of --vocab={vocab}")
  from gradalign_jax import sampling

  cfg, student, teacher = model_setup(FLAGS.logit_scale)
  rng = np.random.default_rng(1234)
  prompts = [[int(x) for x in rng.choice([t for t in range(10, VOCAB_SIZE)], 3, replace=False)]
             for _ in range(FLAGS.questions)]
  reward_fn = parity_reward(FLAGS.reward_token, FLAGS.eos)
  refs = [exact_reference(cfg, student, teacher, p, vocab, FLAGS.horizon, reward_fn, FLAGS.eos)
          for p in prompts]
  logging.info("exact references in %.1f s; V(root) = %s", time.time() - start,
               [round(r[0].values[()], 3) for r in refs])
  mask = np.zeros(VOCAB_SIZE, bool)
  mask[vocab] = True
  scfg = sampling.SamplingConfig(max_new_tokens=FLAGS.horizon, temperature=1.0,
                                 eos_ids=(FLAGS.eos,), max_cache_len=16)
  setup = (cfg, student, teacher, prompts, refs, mask, reward_fn, scfg, vocab)
  tcfg_kwargs = dict(num_continuations=FLAGS.num_continuations, rounds=FLAGS.rounds,
                     priority=FLAGS.priority, min_trials=FLAGS.min_trials)
  per_seed = {(m, b): [] for m in METHODS for b in budgets}
  used = {(m, b): [] for m in METHODS for b in budgets}
  worst = 0.0
  for seed in range(FLAGS.seeds):
    for b in budgets:
      for m in METHODS:
        evals, n_used, w = run_one(m, b, seed, setup, tcfg_kwargs)
        per_seed[(m, b)].append(seed_summary(evals))
        used[(m, b)].append(np.mean(n_used))
        worst = max(worst, w)
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
  meta = dict(command="python -m experiments.validate_estimator " + " ".join(
      f"--{k}={v}" for k, v in FLAGS.flag_values_dict().items()
      if k in {f.name for f in FLAGS.get_key_flags_for_module(__name__)}
      and FLAGS[k].present), wall_s=wall, seeds=FLAGS.seeds, questions=FLAGS.questions,
      horizon=FLAGS.horizon, vocab=vocab, eos=FLAGS.eos, budgets=budgets,
      initial_fraction=FLAGS.initial_fraction, num_continuations=FLAGS.num_continuations,
      priority=FLAGS.priority, min_trials=FLAGS.min_trials, rounds=FLAGS.rounds,
      target_cos=FLAGS.target_cos, policy_check=worst, prompts=prompts,
      exact_root_values=[r[0].values[()] for r in refs])
  reach, verdict = write_report(FLAGS.out, records, meta)
  plot(FLAGS.out, records, FLAGS.target_cos)
  with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
    json.dump({"records": records, "reach_budget": reach, "verdict": verdict, "meta": meta}, f,
              indent=1)
  if worst > 1e-3:
    raise RuntimeError(f"the sampler's policy differs from the exact enumeration's by "
                       f"{worst:.2e} in log π: the comparison is void")
  logging.info("done in %.0f s: %s", wall, verdict)


if __name__ == "__main__":
  app.run(main)
