"""The main job end to end on the bundled toy models: tables against an independent
recomputation from full forwards, the report, and resume after an interruption."""

import io
import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from experiments import alignment_sweep as sweep
from gradalign_jax import (alignment, contexts, gradients, models, pipeline, sampling, targeted,
                           tasks, tree)
from gradalign_jax.models import loaded

pytestmark = pytest.mark.slow

TOY = loaded.TOY_DIR
needs_toy = pytest.mark.skipif(not os.path.isdir(os.path.join(TOY, "student_small")),
                               reason="bundled toy models not trained yet (train_toy.py)")

SMALL = dict(students=("student_small",), teachers=("teacher", "self:correct_and_wrong_demo"),
             num_questions=3, num_rollouts=8, max_new_tokens=40, budget=8, question_batch=2,
             demo_samples=4, seed=3)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sweep"))
  cfg = sweep.settings(**SMALL)
  summary = sweep.run(cfg, out)
  return cfg, out, summary


def _tables(out):
  return {t: pd.read_parquet(os.path.join(out, f"{t}.parquet"))
          for t in ("nodes", "rollouts", "questions")}


@needs_toy
def test_outputs_exist_and_agree(small_run):
  cfg, out, summary = small_run
  for f in ("report.md", "summary.json", "tokens.html", "rollouts.csv", "questions.csv",
            "correct_vs_incorrect.png", "config.json"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  t = _tables(out)
  q = t["questions"]
  assert len(q) == 3 * len(cfg["teachers"])
  assert set(q["spec"]) == set(cfg["teachers"])
  # Per-rollout correctness matches the per-question counts, for every spec.
  r = t["rollouts"]
  counts = r.groupby(["spec", "question_id"])["correct"].sum()
  for _, row in q[q["context"] == "ok"].iterrows():
    assert counts[(row["spec"], row["question_id"])] == row["n_correct"]
  # A rollout's aggregates are its path's informative nodes (the leave-one-out values at each
  # depth are checked against full forwards in test_node_alignment_matches_full_forwards).
  for _, row in r.head(6).iterrows():
    path = np.asarray(row["path_reverse_kl"], float)
    assert len(path) == row["length"] == len(row["tokens"])
    vals = path[np.isfinite(path)]
    assert len(vals) == row["n_nodes"]
    if len(vals):
      assert np.isclose(np.mean(vals), row["mean_reverse_kl"])
      assert np.all(np.abs(vals) <= 1 + 1e-9)
  # The explorer's links: each token's decision node is at its depth, and the token is one of
  # that node's children (the nodes table of the same spec).
  nodes = t["nodes"].set_index(["spec", "question_id", "node_id"])
  for _, row in r.head(6).iterrows():
    for depth, (u, tok) in enumerate(zip(row["node_ids"], row["tokens"])):
      node = nodes.loc[(row["spec"], row["question_id"], u)]
      assert node["depth"] == depth and tok in list(node["child_tokens"])
      assert len(node["top_p"]) == len(node["top_q_tokens"]) == 5
  assert (t["nodes"]["targeted"] > 0).any()
  # summary.json's blocks are the rollout table's split means.
  with open(os.path.join(out, "summary.json")) as f:
    saved = json.load(f)
  spec = saved["students"]["student_small"]["specs"]["teacher"]
  sel = r[(r.spec == "teacher") & (r.n_nodes > 0)]
  for split, flag in (("correct", True), ("incorrect", False)):
    want = sel[sel.correct == flag]["mean_reverse_kl"].mean()
    got = spec[split]["reverse_kl"]["mean"]
    assert (got is None and not np.isfinite(want)) or np.isclose(got, want)
  # The headline within-question numbers, recomputed from rollouts.parquet and the questions'
  # relabelling draws.
  w = spec["within_question"]
  deltas, centred = [], []
  q = t["questions"].set_index(["spec", "question_id"])
  for qid, g in r[(r.spec == "teacher") & np.isfinite(r.mean_reverse_kl)].groupby("question_id"):
    if g.correct.nunique() == 2:
      d = g[~g.correct].mean_reverse_kl.mean() - g[g.correct].mean_reverse_kl.mean()
      deltas.append(d)
      centred.append(d - np.nanmean(q.loc[("teacher", qid), "null_delta_reverse_kl"]))
  assert w["num_questions"] == len(deltas)
  if deltas:
    assert w["difference"] == pytest.approx(np.mean(deltas))
    assert w["difference_vs_null"] == pytest.approx(np.mean(centred))
    assert 0 < w["p_permutation"] <= 1
  report = open(os.path.join(out, "report.md")).read()
  assert "self:correct_and_wrong_demo" in report and "Findings" in report
  assert "[tokens.html](tokens.html)" in report


def _reference_cosines(zs, zt, mask, tokens, q, n, own=None):
  """cos(ĝ*, d) of reverse and forward KL from logits and the children's (Q̂, n); own =
  (token, reward) leaves one rollout out of its child's counts. None when not informative."""
  q_hat = np.zeros(len(mask), np.float32)
  observed = np.zeros(len(mask), bool)
  for tok_id, qk, nk in zip(tokens, q, n):
    s = round(qk * nk) if nk > 0 else 0
    if own is not None and tok_id == own[0]:
      s, nk = s - own[1], nk - 1
    if nk > 0:
      q_hat[tok_id], observed[tok_id] = s / nk, True
  if observed.sum() < 2 or len(set(q_hat[observed].tolist())) < 2:
    return None
  g = gradients.ideal_direction(zs, q_hat, observed, mask)
  out = {}
  for name, d in (("reverse_kl", gradients.reverse_kl_direction(zs, zt, mask)),
                  ("forward_kl", gradients.forward_kl_direction(zs, zt, mask))):
    out[name] = float(np.dot(g, d) / (np.linalg.norm(g) * np.linalg.norm(d)))
  return out


@needs_toy
def test_node_alignment_matches_full_forwards(small_run):
  """Independent reference: each informative node's reverse-KL and forward-KL cosines from
  full forwards of prompt + prefix (no cache, no tree) and Q̂ from the node table's child
  counts; and each rollout's leave-one-out cosine there, its own reward taken out by hand."""
  cfg, out, _ = small_run
  t = _tables(out)
  task = tasks.get_task("synthetic")
  ex = {e.id: e for e in task.load(cfg["data"], limit=cfg["num_questions"])}
  s_cfg, s_params = models.load_pretrained(os.path.join(TOY, "student_small"))
  t_cfg, t_params = models.load_pretrained(os.path.join(TOY, "teacher"))
  tok = models.load_tokenizer(os.path.join(TOY, "student_small"))
  mask = models.vocab_mask(tok, s_cfg.vocab_size)
  nodes, r = t["nodes"], t["rollouts"]
  checked = loo_checked = 0
  for qid in nodes.question_id.unique():
    rows = r[(r.spec == "teacher") & (r.question_id == qid)].sort_values("rollout")
    # The on-policy rollouts enter the tree first, in order: rebuilt alone they give their
    # nodes the same ids (targeted rollouts only add nodes after them).
    rebuilt = tree.PrefixTree()
    for tokens in rows.tokens:
      rebuilt.add(list(tokens), 0.0)
    sel = nodes[(nodes.spec == "teacher") & (nodes.question_id == qid) & nodes.informative
                & (nodes.node_id < rebuilt.num_nodes)].head(3)
    prompt = tok(task.prompt(tok, ex[qid]), add_special_tokens=False)["input_ids"]
    for _, node in sel.iterrows():
      prefix = list(rebuilt.path(int(node.node_id)))
      assert len(prefix) == node.depth
      seq = np.asarray([prompt + prefix], np.int32)
      zs = models.forward(s_cfg, s_params, seq)[0, -1]
      zt = models.forward(t_cfg, t_params, seq)[0, -1]
      want = _reference_cosines(zs, zt, mask, node.child_tokens, node.child_q, node.child_n)
      for name in want:
        assert np.isclose(node[f"align_{name}"], want[name], atol=2e-4), (name, node.node_id)
      checked += 1
      for _, ro in rows.iterrows():
        if list(ro.tokens[:node.depth]) != prefix or len(ro.tokens) <= node.depth:
          continue
        own = (int(ro.tokens[node.depth]), float(ro.correct))
        loo = _reference_cosines(zs, zt, mask, node.child_tokens, node.child_q, node.child_n, own)
        got = ro.path_reverse_kl[node.depth]
        if loo is None:
          assert np.isnan(got), (qid, ro.rollout, node.depth)
        else:
          assert np.isclose(got, loo["reverse_kl"], atol=2e-4), (qid, ro.rollout, node.depth)
          loo_checked += 1
  assert checked >= 3 and loo_checked >= 3, (checked, loo_checked)


@needs_toy
def test_diagnose_in_memory_equals_the_sweep_tables(small_run):
  """The library call with the same settings (its config built here by hand, not from
  flags) gives the tables the sweep wrote through its run directory."""
  _, out, _ = small_run
  config = pipeline.DiagnoseConfig(
      num_rollouts=8, question_batch=2, seed=3,
      sampling=sampling.SamplingConfig(max_new_tokens=40),
      targeted=targeted.TargetedConfig(budget=8, num_continuations=4),
      scoring=alignment.ScoringConfig(), contexts=contexts.ContextConfig(demo_samples=4))
  task = tasks.get_task("synthetic")
  got = pipeline.diagnose("student_small", SMALL["teachers"],
                          task.load("synthetic:seed=1,n=256", limit=3), task, config)
  want = _tables(out)
  for name in want:
    table = pd.read_parquet(io.BytesIO(getattr(got, name).to_parquet()))  # lists → arrays
    pd.testing.assert_frame_equal(table, want[name], check_exact=True)
  assert set(got.summary()["students"]["student_small"]["specs"]) == set(SMALL["teachers"])


@needs_toy
def test_a_spec_alone_equals_the_spec_in_a_sweep(small_run, tmp_path):
  """The default targeting rule never looks at the specs: ``teacher`` run alone gives the
  same rollouts, nodes and questions rows as ``teacher`` next to another spec (same seed)."""
  _, out, _ = small_run
  alone = str(tmp_path / "alone")
  sweep.run(sweep.settings(**dict(SMALL, teachers=("teacher",))), alone)
  both, one = _tables(out), _tables(alone)
  for name in ("rollouts", "nodes", "questions"):
    want = both[name][both[name].spec == "teacher"].reset_index(drop=True)
    assert len(want) and (name != "questions" or (want.targeted > 0).all())
    pd.testing.assert_frame_equal(one[name], want, check_exact=True)


@needs_toy
def test_resume_gives_identical_tables(small_run, tmp_path):
  cfg, out, _ = small_run
  part = str(tmp_path / "resumed")
  assert sweep.run(cfg, part, stop_after=1) is None  # interrupted after the first group
  done = os.listdir(os.path.join(part, "parts", "student_small"))
  assert sorted(done) == ["q000000", "q000001"]
  # A half-written part (killed while writing) is redone, not trusted.
  os.makedirs(os.path.join(part, "parts", "student_small", "q000002.tmp"))
  sweep.run(cfg, part)
  full, resumed = _tables(out), _tables(part)
  for name in full:
    pd.testing.assert_frame_equal(full[name], resumed[name])


@needs_toy
def test_corrupted_part_is_recomputed_alone(small_run, tmp_path, caplog):
  """A finished part damaged on disk is named and deleted before any new work; only its group
  runs again (the group's other part is kept byte for byte) and the tables equal the
  uninterrupted run's."""
  caplog.set_level(logging.INFO, logger="gradalign_jax.rundir")
  cfg, out, _ = small_run
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  parts = os.path.join(copy, "parts", "student_small")
  bad = os.path.join(parts, "q000001", "nodes.parquet")
  with open(bad, "r+b") as f:
    f.seek(100)
    f.write(b"\xff" * 8)
  kept = {q: {n: os.stat(os.path.join(parts, q, n)).st_mtime_ns
              for n in os.listdir(os.path.join(parts, q))} for q in ("q000000", "q000002")}
  sweep.run(cfg, copy)
  assert f"{os.path.join(parts, 'q000001')} does not match its checksum" in caplog.text
  assert "1 of 2 question groups already done" in caplog.text
  for q, stamps in kept.items():
    assert {n: os.stat(os.path.join(parts, q, n)).st_mtime_ns for n in stamps} == stamps
  for name, want in _tables(out).items():
    pd.testing.assert_frame_equal(_tables(copy)[name], want, check_exact=True)


@needs_toy
def test_resume_refuses_other_settings(small_run):
  cfg, out, _ = small_run
  other = sweep.settings(**dict(SMALL, num_rollouts=4))
  with pytest.raises(ValueError, match="num_rollouts: 8 there, 4 now"):
    sweep.run(other, out)


def test_config_checks():
  with pytest.raises(ValueError, match="unknown directions"):
    sweep.settings(directions=("reverse_kl", "kl"))
  with pytest.raises(contexts.SpecError, match="Valid specs"):
    sweep.run(sweep.settings(teachers=("tacher",)), "/nonexistent/never_written")
