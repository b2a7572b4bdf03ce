"""analysis/calibration.py and experiments/null_calibration.py: the null reward ignores the
tokens, the planted effect is exact, and the experiment's summary has what the README quotes."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from experiments import null_calibration
from gradalign_jax import tasks
from gradalign_jax.analysis import calibration


def test_null_reward_ignores_the_response_and_is_reproducible():
  task = tasks.get_task("synthetic")
  ex = task.load("synthetic:seed=1,n=4", limit=2)
  a, b = (calibration.NullRewardTask(task, salt=3) for _ in range(2))
  # The same text gets fresh draws; two tasks with the same salt give the same sequence.
  draws = [a.verify(task.reference_response(ex[0]), ex[0]) for _ in range(400)]
  assert draws == [b.verify("anything at all", ex[0]) for _ in range(400)]
  assert 0.4 < np.mean(draws) < 0.6
  other = calibration.NullRewardTask(task, salt=4)
  assert draws != [other.verify("", ex[0]) for _ in range(400)]
  assert a.prompt is not None and a.load == task.load  # everything else is the task's
  with pytest.raises(ValueError, match="rate"):
    calibration.NullRewardTask(task, salt=0, rate=1.0)


def test_planted_effect_moves_the_within_question_difference_by_delta():
  r = pd.DataFrame(dict(question_id=["a"] * 4 + ["b"] * 4, correct=[True, False] * 4,
                        mean_x=[0.1, 0.3, 0.2, 0.0, -0.5, 0.4, 0.1, 0.1]))
  null = {"a": np.zeros(9), "b": np.zeros(9)}
  before = calibration.headline_test(r, null, "x")
  after = calibration.headline_test(calibration.plant_effect(r, "x", 0.25), null, "x")
  assert after["difference"] == pytest.approx(before["difference"] + 0.25)
  assert after["num_questions"] == before["num_questions"] == 2


@pytest.mark.slow
def test_null_calibration_runs_and_summarises(tmp_path):
  s = null_calibration.settings(**dict(null_calibration.DEFAULTS, num_questions=3,
                                       num_rollouts=4, max_new_tokens=16, budget=0, seeds=2,
                                       permutations=20))
  out = str(tmp_path / "nc")
  summary = null_calibration.run(s, out)
  seeds = pd.read_parquet(os.path.join(out, "seeds.parquet"))
  assert len(seeds) == 2 and set(seeds.seed) == {0, 1}
  with open(os.path.join(out, "summary.json")) as f:
    saved = json.load(f)
  for key in ("false_positive_rate", "false_positive_ci_high", "power", "num_seeds"):
    assert key in saved and key in summary
  assert saved["num_seeds"] == 2
  fpr = (seeds.null_p_permutation < 0.05).mean()
  assert saved["false_positive_rate"] == pytest.approx(fpr)
  assert "false-positive rate" in open(os.path.join(out, "report.md")).read()
