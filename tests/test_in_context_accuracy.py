"""experiments/in_context_accuracy.py on tiny random Qwen3 checkpoints with the toy tokenizer.

A random model is almost never correct, so the task's verifier is replaced by a rule on the
first generated token (even id = correct; question "never" is never correct and "always"
always, so both kinds of unavailable context occur). The reference re-samples every
(spec, question) with ``sampling.sample`` directly from prompts built here and applies the
rule to the sampled token ids (not to the decoded text the script verifies). The pure summary
is checked against numbers worked by hand.

Compilation dominates the time: the questions all have two steps and the horizons are short,
so every prompt kind falls in one length bucket (plain 32, summary request 64, rollout demo
and summary contexts 64, the others 128) and the reference reuses the script's programs.
"""

import functools
import json
import os

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from experiments import files
from experiments import in_context_accuracy as ica
from gradalign_jax import contexts, models, pipeline, sampling
from gradalign_jax.analysis import in_context, tables
from gradalign_jax.models import checkpoint, qwen3
from gradalign_jax.tasks import synthetic

CFG = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=1e4,
                        max_position_embeddings=512)
QUESTIONS = [("always", "2-7+2"), ("even", "5*3+4"), ("never", "8+1*6")]
G, HORIZON, SEED = 4, 8, 5
SPECS = ("self:correct_demo=rollout", "self:correct_and_wrong_demo", "self:summary",
         "{other}:correct_demo")
BATCHED_SPECS = ("self:correct_and_wrong_demo", "{other}:correct_demo")


def _correct(first_token: int, question_id: str) -> bool:
  """The replacement reward, on the first generated token id."""
  return {"always": True, "never": False}.get(question_id, first_token % 2 == 0)


def _verifier(tok):
  def verify(self, response_text, example):
    ids = tok(response_text, add_special_tokens=False)["input_ids"]
    return bool(ids) and _correct(ids[0], example.id)
  return verify


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two random checkpoints, and the script's outputs for question_batch 1 (interrupted after
  one group, then resumed) and 2 (fewer specs: what batching could change)."""
  root = tmp_path_factory.mktemp("ica")
  paths = {}
  for name, seed in (("student", 0), ("other", 1)):
    path = str(root / name)
    synthetic.write_tokenizer(path)
    tok = models.load_tokenizer(path)
    checkpoint.save_pretrained(CFG, qwen3.init_params(CFG, seed=seed), path, extra_config={
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    paths[name] = path
  data = str(root / "questions.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps({"id": i, "question": q}) + "\n" for i, q in QUESTIONS)
  tok = models.load_tokenizer(paths["student"])

  def config(specs, **kw):
    return ica.settings(
        students=(paths["student"],), teachers=[s.format(other=paths["other"]) for s in specs],
        data=data, num_questions=len(QUESTIONS), num_rollouts=G, max_new_tokens=HORIZON,
        demo_samples=G, summary_tokens=3, seed=SEED, **kw)

  outs = {1: str(root / "qb1"), 2: str(root / "qb2")}
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(synthetic.SyntheticTask, "verify", _verifier(tok))
    assert ica.run(config(SPECS, question_batch=1), outs[1], stop_after=1) is None
    ica.run(config(SPECS, question_batch=1), outs[1])
    ica.run(config(BATCHED_SPECS, question_batch=2), outs[2])
  return paths, tok, data, outs


@functools.lru_cache(maxsize=None)
def _load(path):
  return models.load_pretrained(path)


def _sample(path, tok, prompt_text, qid, num_samples):
  """Independent re-sampling of one prompt: (first token ids, decoded texts, prompt ids)."""
  cfg, params = _load(path)
  sc = sampling.SamplingConfig(max_new_tokens=HORIZON, eos_ids=(tok.pad_token_id,
                               tok.eos_token_id), pad_id=tok.pad_token_id)
  ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
  ro = sampling.sample(cfg, params, [ids], sc, num_samples=num_samples, seed=SEED,
                       question_ids=[qid], vocab_mask=np.arange(CFG.vocab_size) < len(tok))
  texts = [tok.decode(ro.sequence(r), skip_special_tokens=False) for r in range(num_samples)]
  return ro.tokens[:, 0], texts, ids


def test_counts_match_independent_resampling(setup):
  paths, tok, data, outs = setup
  table = pd.read_parquet(os.path.join(outs[1], "accuracy.parquet"))
  task = synthetic.SyntheticTask()
  examples = task.load(data)
  cache = contexts.SummaryCache(os.path.join(outs[1], "summaries.json"))
  specs = {s: contexts.parse_spec(s.format(other=paths["other"])) for s in SPECS}
  assert len(table) == len(QUESTIONS) * (1 + len(specs))
  unavailable, demo_differs_from_scored = [], 0
  for i, ex in enumerate(examples):
    rows = table[table["question_index"] == i].set_index("spec")
    plain = task.prompt(tok, ex, enable_thinking=False)
    first, scored_texts, plain_ids = _sample(paths["student"], tok, plain, i, G)
    scored_ok = [_correct(t, ex.id) for t in first]
    assert rows.loc[in_context.BASELINE, "n_correct"] == sum(scored_ok)
    # Demonstrations come from the extra rollouts (question id + DEMO_STREAM) ...
    demo_first, demo_texts, _ = _sample(paths["student"], tok, plain, pipeline.DEMO_STREAM + i, G)
    pool = contexts.DemoPool(tuple(demo_texts), tuple(_correct(t, ex.id) for t in demo_first))
    scored_pool = contexts.DemoPool(tuple(scored_texts), tuple(scored_ok))
    summary = cache.get(paths["student"], ex, task.reference_response(ex))
    assert summary is not None
    for text, spec in specs.items():
      row = rows.loc[spec.text]
      try:
        prompt = contexts.teacher_prompt(spec, task, tok, ex, False, pool, summary)
      except contexts.ContextUnavailable as e:
        assert (row["context"], row["n_samples"], row["prompt_hash"]) == (str(e), 0, "")
        assert np.isnan(row["accuracy"])
        unavailable.append((ex.id, text))
        continue
      path = paths["other"] if spec.model == paths["other"] else paths["student"]
      first_t, _, ids = _sample(path, tok, prompt, i, G)
      n_correct = sum(_correct(t, ex.id) for t in first_t)
      assert row["context"] == "ok"
      assert row["prompt_hash"] == tables.prompt_hash(ids), (text, ex.id)
      assert (row["n_samples"], row["n_correct"]) == (G, n_correct), (text, ex.id)
      assert row["accuracy"] == n_correct / G
      assert row["context_tokens"] == len(ids) - len(plain_ids)
      # ... and not from the scored samples (which would give another prompt).
      if spec.needs_rollout_demos:
        try:
          leaked = contexts.teacher_prompt(spec, task, tok, ex, False, scored_pool)
        except contexts.ContextUnavailable:
          leaked = None
        demo_differs_from_scored += leaked != prompt
  assert demo_differs_from_scored > 0
  assert ("never", "self:correct_demo=rollout") in unavailable
  assert ("always", "self:correct_and_wrong_demo") in unavailable


def test_results_do_not_depend_on_question_batch(setup):
  paths, _, _, outs = setup
  one, two = (pd.read_parquet(os.path.join(outs[q], "accuracy.parquet")) for q in (1, 2))
  keep = [in_context.BASELINE] + [s.format(other=paths["other"]) for s in BATCHED_SPECS]
  one = one[one["spec"].isin(keep)].reset_index(drop=True)
  assert len(one) == len(two) == len(QUESTIONS) * len(keep)
  pd.testing.assert_frame_equal(one, two)


def test_outputs(setup):
  paths, _, _, outs = setup
  out = outs[1]
  for name in ("accuracy.csv", "report.md", "in_context_accuracy.png", "config.json",
               "summaries.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  table = pd.read_parquet(os.path.join(out, "accuracy.parquet"))
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  entries = summary["students"][paths["student"]]
  assert summary["specs"][0] == in_context.BASELINE
  assert set(entries) == set(table["spec"])
  for spec, e in entries.items():
    ok = table[(table["spec"] == spec) & (table["context"] == "ok")]
    assert e["n_questions"] == len(ok)
    assert e["n_questions"] + e["n_unavailable"] == len(QUESTIONS)
    assert e["n_correct"] == ok["n_correct"].sum()
  with open(os.path.join(out, "report.md")) as f:
    report = f.read()
  assert f"| {in_context.BASELINE} |" in report and "in_context_accuracy.png" in report


def test_unknown_spec_is_refused_before_any_work(tmp_path):
  with pytest.raises(contexts.SpecError, match=r"unknown context 'hint'.*Valid specs: self, "):
    ica.run(ica.settings(students=("student_small",), teachers=("self:hint",)),
            str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")


# A two-student table worked by hand: q0..q2, 4 samples each.
HAND = pd.DataFrame(
    [("a", in_context.BASELINE, "q0", 4, 1, "ok"), ("a", in_context.BASELINE, "q1", 4, 2, "ok"),
     ("a", in_context.BASELINE, "q2", 4, 4, "ok"),
     ("a", "self:x", "q0", 4, 3, "ok"), ("a", "self:x", "q1", 0, 0, "no correct rollout"),
     ("a", "self:x", "q2", 4, 4, "ok"),
     ("b", in_context.BASELINE, "q0", 4, 0, "ok"), ("b", in_context.BASELINE, "q1", 4, 0, "ok"),
     ("b", in_context.BASELINE, "q2", 4, 2, "ok"),
     ("b", "self:x", "q0", 4, 4, "ok"), ("b", "self:x", "q1", 4, 2, "ok"),
     ("b", "self:x", "q2", 4, 2, "ok")],
    columns=["student", "spec", "question_id", "n_samples", "n_correct", "context"])
HAND["accuracy"] = np.where(HAND["n_samples"] > 0, HAND["n_correct"] / HAND["n_samples"].clip(1),
                            np.nan)


@pytest.mark.parametrize("student,spec,accuracy,n_q,n_unavail,baseline_same,difference", [
    ("a", in_context.BASELINE, 7 / 12, 3, 0, 7 / 12, 0.0),
    ("a", "self:x", 7 / 8, 2, 1, 5 / 8, 0.25),          # paired on q0, q2 only
    ("b", in_context.BASELINE, 1 / 6, 3, 0, 1 / 6, 0.0),
    ("b", "self:x", 2 / 3, 3, 0, 1 / 6, 0.5),
])
def test_summarize_by_hand(student, spec, accuracy, n_q, n_unavail, baseline_same, difference):
  e = in_context.summarize(HAND, n_boot=200)["students"][student][spec]
  assert e["accuracy"] == pytest.approx(accuracy)
  assert (e["n_questions"], e["n_unavailable"]) == (n_q, n_unavail)
  assert e["baseline_same_questions"] == pytest.approx(baseline_same)
  assert e["difference"] == pytest.approx(difference)
  lo, hi = e["ci"]
  assert lo <= e["accuracy"] <= hi


def test_report_cells(tmp_path):
  summary = in_context.summarize(HAND, n_boot=200)
  text = in_context.render_report(summary, "p.png")
  assert "| spec | a | b |" in text
  assert "| self:x | 0.88 [0.75, 1.00] |" in text  # q0 0.75, q2 1.0: bootstrap hits both ends
  assert "2/3 (1× no correct rollout)" in text
  assert "![in-context accuracy](p.png)" in text
  fig = in_context.plot_accuracy(summary)
  assert isinstance(fig, Figure) and not os.listdir(tmp_path)  # building it writes nothing
  files.save_figure(fig, str(tmp_path / "p.png"))
  assert os.path.getsize(tmp_path / "p.png") > 0
