"""The gated-distillation pieces: gates on a hand-made batch, loss gradients against the
library's directions, short training runs per arm, the summary's statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from gradalign_jax import alignment, distill, gradients, pipeline, proxies, targeted, training
from gradalign_jax.tree import PrefixTree

# A hand-made batch: 3 rollouts, 4 positions; row lengths 4, 2, 3 (9 valid positions).
VALID = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
CORRECT = np.array([True, False, True])
ALIGN = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 1]], bool)  # (1, 2), (2, 3) invalid
# One score per position; invalid positions carry the largest scores, so a gate that ignored
# validity would pick them.
SCORES = np.array([[0.1, 0.9, 0.3, 0.5], [0.8, 0.2, 9.0, 9.0], [0.7, 0.4, 0.6, 9.0]], np.float32)
# 9 valid × 0.5 = 4.5, rounded half to even → 4 kept: scores 0.9, 0.8, 0.7, 0.6.
TOP_HALF = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]], bool)
# Positions with an alignment estimate; (1, 2), (1, 3), (2, 3) covered but invalid. The six
# valid covered ones score 0.1, 0.9, 0.5, 0.8, 0.4, 0.6: covered_random's 4 are 0.9, 0.8,
# 0.6, 0.5 (0.7 at (2, 0) is not covered).
COVERED = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], bool)
TOP_COVERED = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0]], bool)

EXPECTED = {
    "all_tokens": VALID,
    "incorrect_only": np.array([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool),
    "alignment_gated": np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]], bool),
    "reinforce": np.zeros_like(VALID),
    **{arm: TOP_HALF for arm in distill.FRACTION_ARMS},
    "covered_random": TOP_COVERED,
}


@pytest.mark.parametrize("arm", distill.ARMS)
def test_gate_masks_the_intended_tokens(arm):
  scores = {name: jnp.asarray(SCORES) for name in proxies.PROXIES}
  got = distill.gate_mask(arm, VALID, CORRECT, ALIGN, scores, 0.5, noise=jnp.asarray(SCORES),
                          covered=COVERED)
  np.testing.assert_array_equal(np.asarray(got), EXPECTED[arm])


def test_covered_random_keeps_every_covered_token_when_there_are_too_few():
  # fraction 1 asks for all 9 valid positions; only 6 valid ones are covered.
  got = distill.gate_mask("covered_random", VALID, CORRECT, ALIGN, fraction=1.0,
                          noise=jnp.asarray(SCORES), covered=COVERED)
  np.testing.assert_array_equal(np.asarray(got), VALID & COVERED)


def test_each_proxy_arm_reads_its_own_score():
  # Row 0 of each proxy's scores ranks a different position first; fraction 1/9 keeps one.
  scores = {}
  for i, name in enumerate(proxies.PROXIES):
    s = np.zeros((3, 4), np.float32)
    s[0, i] = 1.0
    scores[name] = jnp.asarray(s)
  for i, name in enumerate(proxies.PROXIES):
    got = np.asarray(distill.gate_mask(f"proxy_{name}", VALID, CORRECT, ALIGN, scores, 1 / 9))
    want = np.zeros((3, 4), bool)
    want[0, i] = True
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_unknown_arm_and_missing_scores_are_refused():
  with pytest.raises(ValueError, match="unknown arm"):
    distill.gate_mask("everything", VALID, CORRECT, ALIGN)
  with pytest.raises(ValueError, match="proxy scores"):
    distill.gate_mask("proxy_kl_pq", VALID, CORRECT, ALIGN)
  with pytest.raises(ValueError, match="needs noise"):
    distill.gate_mask("random_fraction", VALID, CORRECT, ALIGN)
  with pytest.raises(ValueError, match="covered mask"):
    distill.gate_mask("covered_random", VALID, CORRECT, ALIGN, noise=jnp.asarray(SCORES))


def test_alignment_keep_looks_up_each_prefix():
  tree = PrefixTree()
  for seq in ([5, 6, 7], [5, 8, 7], [9]):
    tree.add(seq, 1.0)
  root, n5, n56, n58 = 0, tree.find([5]), tree.find([5, 6]), tree.find([5, 8])
  # Root informative and aligned; node [5] informative, not aligned; [5, 6] aligned but not
  # informative; [5, 8] aligned and informative; a NaN estimate counts as none.
  columns = {"node_id": np.array([root, n5, n56, n58]),
             "informative": np.array([True, True, False, True]),
             "align_reverse_kl": np.array([0.4, -0.2, 0.9, 0.1])}
  seqs = [[5, 6, 7, 0], [5, 8, 7], [9, 1], [4, 4, 4]]  # [9] is a leaf; [4] never seen
  keep, covered = distill.alignment_keep(tree, columns, seqs, width=5)
  want_cov = np.zeros((4, 5), bool)
  want_cov[0, :2] = [True, True]                 # root, [5]; [5, 6] not informative
  want_cov[1, :3] = [True, True, True]           # root, [5], [5, 8]
  want_cov[2, 0] = want_cov[3, 0] = True         # root only
  want_keep = want_cov.copy()
  want_keep[0, 1] = want_keep[1, 1] = False      # [5] has alignment < 0
  np.testing.assert_array_equal(covered, want_cov)
  np.testing.assert_array_equal(keep, want_keep)


def _logits(seed, shape=(3, 4, 7)):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(0, 2, shape), jnp.float32),
          jnp.asarray(rng.normal(0, 2, shape), jnp.float32))


MASK = np.array([1, 1, 0, 1, 1, 1, 0], bool)  # two padded vocabulary rows


@pytest.mark.parametrize("arm", distill.DISTILL_ARMS + distill.FRACTION_ARMS)
def test_distillation_gradient_is_the_reverse_kl_direction_where_kept(arm):
  zs, zt = _logits(1)
  scores = proxies.proxy_scores(zs, zt, jnp.zeros((3, 4), jnp.int32), MASK)
  noise = jnp.asarray(np.random.default_rng(0).random((3, 4)), jnp.float32)
  keep = distill.gate_mask(arm, VALID, CORRECT, ALIGN, scores, 0.5, noise, COVERED)
  n = int(VALID.sum())
  grad = jax.grad(lambda z: distill.distill_loss(z, zt, keep, n, MASK))(zs)
  want = -np.asarray(keep, np.float32)[..., None] / n * np.asarray(
      gradients.reverse_kl_direction(zs, zt, MASK))
  np.testing.assert_allclose(np.asarray(grad), want, atol=2e-7)
  assert np.all(np.asarray(grad)[~np.asarray(keep)] == 0)
  assert np.all(np.asarray(grad)[..., ~MASK] == 0)
  assert np.asarray(keep).any()


def test_reinforce_gradient_is_the_score_function_gradient():
  zs, _ = _logits(2)
  tokens = np.array([[0, 1, 3, 4], [5, 0, 0, 0], [3, 3, 1, 0]], np.int32)
  rewards = np.array([1.0, 0.0, 1.0], np.float32)
  question = np.array([0, 0, 1])
  adv = distill.question_advantages(rewards, question)
  np.testing.assert_allclose(adv, [0.5, -0.5, 0.0])  # question 1 has one rollout: A = 0
  adv = np.array([0.5, -0.5, 0.25], np.float32)  # nonzero everywhere, to test every row
  n = int(VALID.sum())
  grad = jax.grad(lambda z: distill.reinforce_loss(z, tokens, adv[:, None], VALID, n, MASK))(zs)
  # By hand: ∂/∂z of −A log π_y = −A (e_y − π), π the softmax over the real rows.
  z = np.where(MASK, np.asarray(zs, np.float64), -np.inf)
  pi = np.exp(z - z.max(-1, keepdims=True))
  pi /= pi.sum(-1, keepdims=True)
  onehot = np.eye(7)[tokens]
  want = np.where(VALID[..., None], -adv[:, None, None] * (onehot - pi) / n, 0.0)
  np.testing.assert_allclose(np.asarray(grad), want, atol=2e-7)


def test_training_batch_places_prompt_and_generated_tokens():
  prompts = [[1, 2, 3], [4, 5]]
  generated = np.array([[7, 8, 0], [9, 0, 0]], np.int32)
  b = distill.training_batch(prompts, np.array([1, 0]), generated, np.array([2, 1]), 0, 8)
  np.testing.assert_array_equal(b.tokens, [[4, 5, 7, 8, 0, 0, 0, 0], [1, 2, 3, 9, 0, 0, 0, 0]])
  # Logits at position p predict token p + 1.
  np.testing.assert_array_equal(b.tokens[0, b.positions[0, :2] + 1], [7, 8])
  np.testing.assert_array_equal(b.tokens[1, b.positions[1, :1] + 1], [9])
  np.testing.assert_array_equal(b.valid, [[1, 1, 0], [1, 0, 0]])
  assert b.sequence_tokens == 4 + 4
  with pytest.raises(ValueError, match="larger length"):
    distill.training_batch(prompts, np.array([0, 0]), generated, np.array([3, 3]), 0, 5)


@pytest.fixture(scope="module")
def trainer():
  from gradalign_jax.models.loaded import ModelCache
  from gradalign_jax.tasks.synthetic import SyntheticTask

  # Two-step chains: their solutions (15 tokens with EOS) fit a short horizon, and the
  # student gets some right and some wrong (reinforce needs both to move).
  task = SyntheticTask(min_steps=2, max_steps=2)
  models = ModelCache()
  student = models.get("student_small", "student_small")
  teacher = models.get("teacher", "student_small")
  diagnose = pipeline.DiagnoseConfig(
      num_rollouts=4, question_batch=2,
      sampling=dataclasses.replace(pipeline.DiagnoseConfig().sampling, max_new_tokens=16),
      targeted=targeted.TargetedConfig(budget=4, rounds=1, num_continuations=2),
      scoring=alignment.ScoringConfig(permutations=0, chunk_nodes=64))
  config = training.TrainConfig(steps=2, eval_every=2, eval_samples=1, learning_rate=1e-3)
  return training.Trainer(student, teacher, task, task.generate(8, seed=1),
                          task.generate(2, seed=2), config, diagnose)


@pytest.mark.parametrize("arm", distill.ARMS)
def test_short_training_run_moves_the_params_reproducibly(trainer, arm):
  fractions = [0.5, 0.5]
  # Seed 1: alignment_gated keeps some tokens at both steps (most tiny batches have no
  # informative node with alignment > 0) and reinforce sees mixed rewards.
  a = training.train_arm(trainer, arm, seed=1, fractions=fractions)
  b = training.train_arm(trainer, arm, seed=1, fractions=fractions)
  init = jax.tree.leaves(trainer.student.params)
  pa, pb = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
  assert any(not np.array_equal(x, y) for x, y in zip(pa, init)), "params did not change"
  for x, y in zip(pa, pb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r["step"] for r in a.curve] == [0, 1, 2]
  assert np.isfinite(a.curve[0]["accuracy"]) and np.isfinite(a.curve[2]["accuracy"])
  kept = [r["kept_fraction"] for r in a.curve[1:]]
  want = {"all_tokens": [1.0, 1.0], "reinforce": [0.0, 0.0]}.get(arm)
  if want is not None:
    assert kept == want
  if arm in distill.FRACTION_ARMS and arm != "covered_random":
    assert all(abs(k - 0.5) < 0.05 for k in kept)
  if arm in distill.DIAGNOSTIC_ARMS:
    assert all(0 < k < 1 for k in kept)
    assert all(r["covered_fraction"] >= r["kept_fraction"] for r in a.curve[1:])
  if arm == "covered_random":  # 0.5 of the valid tokens, or every covered one if fewer
    assert all(abs(k - min(0.5, r["covered_fraction"])) < 0.05 for k, r in zip(kept, a.curve[1:]))
  assert (a.compute["targeted_rollouts"] > 0) == (arm in distill.DIAGNOSTIC_ARMS)
  assert a.compute["rollouts"] >= 2 * 2 * 4


def test_the_steps_gate_rows_are_the_diagnostics_trees(trainer, monkeypatch):
  # Row j·G + i of the step's batch must be on-policy rollout i of question j's tree: its
  # tokens the tree path to that rollout's leaf, its verdict the leaf's reward, its keep mask
  # align > 0 at each token's prefix node (the node at depth t on that path).
  trees, calls = [], []
  diagnose = training._diagnose
  monkeypatch.setattr(training, "_diagnose",
                      lambda *a, **k: trees.append(diagnose(*a, **k)) or trees[-1])
  step = trainer.step
  monkeypatch.setattr(trainer, "step", lambda *a: calls.append(a) or step(*a))
  training.train_arm(trainer, "alignment_gated", seed=1, steps=1)
  (pairs,), (args,) = trees, calls
  generated, valid, correct, keep = (np.asarray(args[i]) for i in (5, 6, 7, 8))
  g, width = trainer.diagnose.num_rollouts, trainer.diagnose.sampling.max_new_tokens
  assert len(pairs) * g == len(keep)
  want = np.zeros_like(keep)
  for j, (tree, cols) in enumerate(pairs):
    arrays = tree.arrays()
    aligned = {int(n): bool(i) and a > 0 for n, i, a in
               zip(cols["node_id"], cols["informative"], cols["align_reverse_kl"])}
    for i, (leaf, reward, _) in enumerate(tree.rollouts[:g]):
      row = j * g + i
      nodes = [int(leaf)]
      while nodes[-1] > 0:
        nodes.append(int(arrays.parent[nodes[-1]]))
      nodes = nodes[::-1][:-1]  # the prefix node of each token: depths 0 … L − 1
      path = arrays.path(int(leaf))
      n = int(valid[row].sum())
      assert n == min(len(path), width)
      np.testing.assert_array_equal(generated[row, :n], path[:n])
      assert bool(correct[row]) == (reward > 0.5)
      want[row, :n] = [aligned.get(node, False) for node in nodes[:n]]
  np.testing.assert_array_equal(keep & valid, want)
  assert want.any()


def test_summary_intervals_and_paired_tests_by_hand():
  final = {"all_tokens": [0.5, 0.6, 0.7], "alignment_gated": [0.6, 0.8, 0.7]}
  rows = []
  for arm, accs in final.items():
    for seed, acc in enumerate(accs):
      rows.append(dict(arm=arm, seed=seed, step=0, accuracy=0.4, kept_fraction=np.nan,
                       covered_fraction=np.nan))
      rows.append(dict(arm=arm, seed=seed, step=1, accuracy=np.nan, kept_fraction=0.25,
                       covered_fraction=0.5))
      rows.append(dict(arm=arm, seed=seed, step=2, accuracy=acc, kept_fraction=0.75,
                       covered_fraction=0.5))
  compute = pd.DataFrame([dict(arm=a, seed=s, rollouts=10.0 * (s + 1)) for a in final
                          for s in range(3)])
  from gradalign_jax.analysis import training as analysis

  out = analysis.summarize(pd.DataFrame(rows), compute)
  g = out["arms"]["alignment_gated"]
  t975_2 = 4.302652729911275  # Student's t quantile, 2 degrees of freedom
  half = t975_2 * 0.1 / np.sqrt(3)  # sd of (0.6, 0.8, 0.7) is 0.1
  assert g["final_accuracy"] == pytest.approx(0.7)
  assert (g["ci_low"], g["ci_high"]) == pytest.approx((0.7 - half, 0.7 + half))
  # Differences 0.1, 0.2, 0.0: mean 0.1, sd 0.1, t = 0.1 / (0.1 / √3) = √3 on 2 df.
  assert g["diff_vs_all_tokens"] == pytest.approx(0.1)
  assert g["p_vs_all_tokens"] == pytest.approx(0.2254033307585166)
  assert g["kept_fraction"] == pytest.approx(0.5)
  assert g["rollouts"] == pytest.approx(20.0)
  assert g["num_seeds"] == 3
  assert np.isnan(out["arms"]["all_tokens"]["p_vs_all_tokens"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(arms=("all_tokens", "proxy_kl_pq")), "add alignment_gated"),
    (dict(arms=("random_fraction",)), "add alignment_gated"),
    (dict(arms=("all_tokens", "all_tokens")), "unknown or repeated"),
    (dict(arms=("everything",)), "unknown or repeated"),
    (dict(steps=0), "must be ≥ 1"),
    (dict(uncovered_tokens="maybe"), "'drop' or 'keep'"),
])
def test_bad_training_configs_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    training.TrainConfig(**kwargs)


def test_alignment_gated_runs_before_the_proxy_arms():
  cfg = training.TrainConfig(arms=("proxy_kl_pq", "reinforce", "alignment_gated", "all_tokens"))
  assert cfg.ordered_arms() == ["alignment_gated", "all_tokens", "proxy_kl_pq", "reinforce"]
  assert training.TrainConfig(steps=12, eval_every=5).eval_steps() == [0, 5, 10, 12]


TINY_RUN = dict(arms=("all_tokens", "alignment_gated", "random_fraction"), train_seeds=2,
                steps=1, eval_every=1, eval_samples=1, eval_data="synthetic:seed=2,n=2",
                data="synthetic:seed=1,n=8", num_questions=8, question_batch=2,
                num_rollouts=4, max_new_tokens=16, budget=4, num_continuations=2,
                students=("student_small",), teachers=("teacher",), permutations=0,
                directions=("reverse_kl",), chunk_nodes=64)


def test_the_script_writes_its_outputs_and_resumes(tmp_path, monkeypatch):
  import json

  from experiments import gated_distillation as gd

  s = gd.settings(**TINY_RUN)
  out = str(tmp_path / "run")
  summary = gd.run(s, out)
  with open(tmp_path / "run" / "summary.json") as f:
    saved = json.load(f)
  assert set(saved["arms"]) == set(TINY_RUN["arms"])
  for arm in TINY_RUN["arms"]:
    row = saved["arms"][arm]
    for key in ("final_accuracy", "ci_low", "ci_high", "p_vs_all_tokens", "num_seeds",
                "kept_fraction", "rollouts", "forward_tokens"):
      assert key in row, (arm, key)
    assert row["num_seeds"] == 2
  assert saved["arms"]["all_tokens"]["p_vs_all_tokens"] is None
  # random_fraction copied alignment_gated's kept fraction, step by step.
  curves = pd.read_parquet(tmp_path / "run" / "curves.parquet")
  kept = curves[curves["step"] > 0].pivot(index=["seed", "step"], columns="arm",
                                          values="kept_fraction")
  np.testing.assert_allclose(kept["random_fraction"], kept["alignment_gated"], atol=0.05)
  report_text = (tmp_path / "run" / "report.md").read_text()
  assert "Does alignment gating beat all-token distillation?" in report_text
  assert (tmp_path / "run" / "curves.png").stat().st_size > 0
  assert summary["arms"]["all_tokens"]["final_accuracy"] == saved["arms"]["all_tokens"][
      "final_accuracy"]

  def must_not_train(*args, **kwargs):
    raise AssertionError("a finished (arm, seed) was trained again")

  monkeypatch.setattr(gd.training, "train_arm", must_not_train)
  again = gd.run(s, out)
  assert again["arms"]["alignment_gated"]["final_accuracy"] == saved["arms"][
      "alignment_gated"]["final_accuracy"]


@pytest.mark.parametrize("overrides,message", [
    (dict(teachers=("teacher", "self")), "one student from one teacher"),
    (dict(teachers=("teacher:correct_demo",)), "without a context"),
    (dict(teachers=("self",)), "pass a teacher model"),
    (dict(temperature=0.7), "T = 1 without truncation"),
])
def test_the_script_refuses_what_it_cannot_train(tmp_path, overrides, message):
  from experiments import gated_distillation as gd

  with pytest.raises(ValueError, match=message):
    gd.run(gd.settings(**dict(TINY_RUN, **overrides)), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_script_refuses_a_job_of_several_processes(tmp_path, monkeypatch):
  from experiments import gated_distillation as gd
  from gradalign_jax import distributed

  monkeypatch.setattr(distributed, "processes", lambda: distributed.Processes(0, 2))
  with pytest.raises(ValueError, match="runs as one process"):
    gd.run(gd.settings(**TINY_RUN), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
