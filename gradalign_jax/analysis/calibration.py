"""Is the headline test calibrated? A reward that ignores the tokens, a planted effect of known
sign and size, and the false-positive rate and power over many seeds.

Under ``NullRewardTask`` every rollout's reward is a fresh Bernoulli draw keyed by (salt,
question, the rollout's place in that question's stream of verifications): independent of
its tokens, so the true ideal gradient g* is 0 at every node and any correct-vs-incorrect
difference the pipeline reports is an artifact. ``plant_effect`` adds a known difference to
the incorrect rollouts' scores, so the same tables measure power. Pure functions except the
task's per-question counters.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from scipy import stats as sps

from gradalign_jax.analysis import stats


class NullRewardTask:
  """``task`` with its verifier replaced by a reward that ignores the response.

  The k-th verification of question q returns ``hash(salt, q, k) < rate``: rollouts that
  happen to share their tokens still get independent rewards (a hash of the tokens would
  give them the same one, which leaks through the other's count into Q̂). Everything else
  (loading, prompts, contexts) is the wrapped task's. The draws depend on the order of the
  calls, which the pipeline fixes (the G rollouts in order, then the targeted ones).
  """

  def __init__(self, task, salt: int, rate: float = 0.5):
    if not 0.0 < rate < 1.0:
      raise ValueError(f"rate={rate} must be in (0, 1): with every reward equal there is "
                       "nothing to compare")
    self._task, self.salt, self.rate = task, int(salt), float(rate)
    self._calls: dict[str, int] = {}

  def __getattr__(self, name):
    return getattr(self._task, name)

  def verify(self, response_text: str, example) -> bool:
    k = self._calls.get(example.id, 0)
    self._calls[example.id] = k + 1
    digest = hashlib.sha256(f"{self.salt}|{example.id}|{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < self.rate


def plant_effect(rollouts: pd.DataFrame, direction: str, delta: float) -> pd.DataFrame:
  """The rollouts table with ``delta`` added to the incorrect rollouts' ``mean_<direction>``:
  a true within-question difference (incorrect − correct) of exactly ``delta``, carried by
  the rollouts themselves. The relabelling null is kept as it was; under relabelling the
  shift would follow the rollouts and add a little spread to the null (δ² times the variance
  of the share of truly incorrect rollouts among the relabelled ones), which this leaves out,
  so the power it measures is slightly optimistic."""
  out = rollouts.copy()
  col = f"mean_{direction}"
  out[col] = out[col] + np.where(out["correct"].astype(bool), 0.0, delta)
  return out


def headline_test(rollouts: pd.DataFrame, null: dict, direction: str, *, seed: int = 0) -> dict:
  """The report's headline test on one (student, spec)'s rollouts: the within-question Δ
  (incorrect − correct), Δ against its null mean, the permutation p (``null``: {question: Δ_q
  under each relabelling}, the questions table's ``null_delta_<d>``), the paired Wilcoxon p,
  the number of questions with both kinds, and the pooled Mann–Whitney p (the secondary,
  confounded comparison)."""
  col = f"mean_{direction}"
  correct = rollouts["correct"].astype(bool).to_numpy()
  scores = rollouts[col].to_numpy(np.float64)
  wq = stats.within_question(scores, correct, rollouts["question_id"].to_numpy(), null,
                             n_boot=200, seed=seed)
  mw = stats.mann_whitney(scores[~correct], scores[correct])
  return {"difference": wq.difference, "difference_vs_null": wq.difference_vs_null,
          "null_mean": wq.null_mean, "p_permutation": wq.p_permutation,
          "p_wilcoxon": wq.p_wilcoxon, "num_questions": wq.num_questions,
          "min_detectable": wq.min_detectable, "p_pooled": mw.p_value}


def rate_with_interval(hits: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float, int]:
  """(rate, Clopper–Pearson low, high, n) of a boolean array (NaN rate when empty)."""
  hits = np.asarray(hits, bool)
  n, k = len(hits), int(hits.sum())
  if n == 0:
    return float("nan"), float("nan"), float("nan"), 0
  ci = sps.binomtest(k, n).proportion_ci(1 - alpha, method="exact")
  return k / n, float(ci.low), float(ci.high), n


def summarize(seeds: pd.DataFrame, alpha: float = 0.05) -> dict:
  """The calibration's summary from one row per seed (``null_*`` and ``planted_*`` columns of
  ``headline_test``, and ``planted_delta``): the headline test's false-positive rate under
  the null (Clopper–Pearson interval), its power with the right sign under the planted
  effect, and the pooled comparison's false-positive rate for contrast."""
  fpr, lo, hi, n = rate_with_interval(seeds["null_p_permutation"] < alpha, alpha)
  found = (seeds["planted_p_permutation"] < alpha) & (np.sign(seeds["planted_difference_vs_null"])
                                                     == np.sign(seeds["planted_delta"]))
  power, p_lo, p_hi, _ = rate_with_interval(found, alpha)
  wrong = (seeds["planted_p_permutation"] < alpha) & ~found
  pooled, pooled_lo, pooled_hi, _ = rate_with_interval(seeds["null_p_pooled"] < alpha, alpha)
  wil, wil_lo, wil_hi, _ = rate_with_interval(seeds["null_p_wilcoxon"] < alpha, alpha)
  return {"alpha": alpha, "num_seeds": n,
          "false_positive_rate": fpr, "false_positive_ci_low": lo, "false_positive_ci_high": hi,
          "power": power, "power_ci_low": p_lo, "power_ci_high": p_hi,
          "planted_delta": float(seeds["planted_delta"].iloc[0]) if n else float("nan"),
          "wrong_sign_rate": float(wrong.mean()) if n else float("nan"),
          "wilcoxon_false_positive_rate": wil, "wilcoxon_false_positive_ci": [wil_lo, wil_hi],
          "pooled_false_positive_rate": pooled,
          "pooled_false_positive_ci": [pooled_lo, pooled_hi],
          "null_mean_difference": float(seeds["null_difference"].mean()),
          "questions_per_seed": float(seeds["null_num_questions"].mean()),
          "min_detectable_median": float(seeds["null_min_detectable"].median())}


__all__ = ["NullRewardTask", "headline_test", "plant_effect", "rate_with_interval",
           "summarize"]
