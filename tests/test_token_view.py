"""The token explorer (analysis/token_view.py): its data from small tables, and the page in a
real headless Chromium with the network off — select a student, question and two specs, click
a token, read the node's numbers from the details panel and compare them with nodes.parquet."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

import headless
from gradalign_jax.analysis import token_view
from gradalign_jax.gradients import COVARIATES

STUDENTS = ("s_small", "s_large")
SPECS = ("teacher", "self:correct_demo", "teacher:summary")
D = "reverse_kl"


def _tables(seed=0):
  """Small consistent tables: per (student, question) 5 rollouts whose node_ids point at
  nodes of every spec; s_large's q1 has no context for teacher:summary (no rows)."""
  rng = np.random.default_rng(seed)
  texts = ["The", " answer", " is", " 4", "\n", "<|im_end|>", " </script><b>&", "7"]
  nodes, rollouts, questions = [], [], []
  for student in STUDENTS:
    for q in ("q0", "q1"):
      specs = SPECS if (student, q) != ("s_large", "q1") else SPECS[:2]
      paths, next_id = [], 1
      for r in range(5):
        n = int(rng.integers(2, 7))
        paths.append([0] + list(range(next_id, next_id + n - 1)))
        next_id += n - 1
      correct = [r % 2 == 0 for r in range(5)]
      ids = sorted({u for p in paths for u in p})
      shared = {}  # π, the children and their counts: one tree for every spec
      for u in ids:
        k = int(rng.integers(1, 4))
        child_n = rng.integers(0, 6, k)
        child_q = np.where(child_n > 0, rng.uniform(0, 1, k), np.nan)
        shared[u] = dict(node_id=u, depth=u % 7, informative=bool(u % 3),
                         targeted=int(u % 4 == 0) * 2, v_hat=float(rng.uniform()),
                         norm_ideal=float(rng.uniform()), min_trials=int(child_n.min()),
                         child_tokens=rng.integers(0, 8, k).tolist(),
                         child_p=rng.uniform(0, 1, k).tolist(), child_q=child_q.tolist(),
                         child_q_lo=(np.nan_to_num(child_q) * 0.5).tolist(),
                         child_q_hi=(np.nan_to_num(child_q) * 0.5 + 0.5).tolist(),
                         child_n=child_n.tolist(), child_text=[texts[i] for i in range(k)],
                         top_p_text=texts[:5],
                         top_p=np.sort(rng.dirichlet(np.ones(5)))[::-1].tolist())
      for spec in SPECS:
        ok = spec in specs
        questions.append(dict(student=student, spec=spec, question_id=q, accuracy=0.6,
                              n_rollouts=5, context="ok" if ok else "no summary for q1"))
        if not ok:
          continue
        for r, path in enumerate(paths):
          cos = rng.uniform(-1, 1, len(path))
          cos[0] = np.nan
          toks = rng.integers(0, len(texts), len(path))
          rollouts.append(dict(student=student, spec=spec, question_id=q, rollout=r,
                               correct=correct[r], length=len(path), tokens=toks.tolist(),
                               token_text=[texts[t] for t in toks], node_ids=path,
                               mean_reverse_kl=float(np.nanmean(cos)), path_reverse_kl=cos))
        for u in ids:
          k = len(shared[u]["child_n"])
          row = dict(student=student, spec=spec, question_id=q, **shared[u],
                     top_q_text=texts[3:8], top_q=np.sort(rng.dirichlet(np.ones(5)))[::-1].tolist(),
                     **{c: float(rng.uniform(0, 2)) for c in COVARIATES})
          row.update({f"align_{D}": float(rng.uniform(-1, 1)), f"dot_{D}": float(rng.normal()),
                      f"norm_{D}": float(rng.uniform()),
                      f"child_d_{D}": rng.normal(size=k).tolist()})
          nodes.append(row)
  return pd.DataFrame(nodes), pd.DataFrame(rollouts), pd.DataFrame(questions)


def _summary():
  within = {"difference": 0.0123, "ci_low": -0.05, "ci_high": 0.07, "p_permutation": 0.4,
            "num_questions": 2}
  return {"students": {s: {"specs": {spec: {"tests": {D: {"within_question": within}}}
                                     for spec in SPECS}} for s in STUDENTS}}


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
  """The tables written to parquet and read back, as the sweep's files are."""
  out = tmp_path_factory.mktemp("run")
  for name, df in zip(("nodes", "rollouts", "questions"), _tables()):
    df.to_parquet(out / f"{name}.parquet")
  return {name: pd.read_parquet(out / f"{name}.parquet")
          for name in ("nodes", "rollouts", "questions")}, out


def test_page_data_is_compact_and_complete(parquet):
  t, _ = parquet
  data = token_view.page_data(t["nodes"], t["rollouts"], t["questions"], _summary(), D)
  assert list(data["students"]) == list(STUDENTS)
  q = data["students"]["s_large"]["questions"][1]
  assert set(q["specs"]) == set(SPECS[:2]) and q["context"]["teacher:summary"] != "ok"
  # One copy of each rollout's tokens, whatever the number of specs; texts interned.
  assert len(q["rollouts"]) == 5 and len(data["strings"]) == len(set(data["strings"]))
  # Δ_q from the rollouts' leave-one-out means.
  r = t["rollouts"]
  sel = r[(r.student == "s_large") & (r.question_id == "q1") & (r.spec == "teacher")]
  want = (sel[~sel.correct].mean_reverse_kl.mean() - sel[sel.correct].mean_reverse_kl.mean())
  assert q["delta"]["teacher"] == pytest.approx(want, rel=1e-3)
  assert data["students"]["s_small"]["tests"]["teacher"][0] == pytest.approx(0.0123)


def test_page_escapes_and_is_offline(parquet):
  t, _ = parquet
  html = token_view.render(t["nodes"], t["rollouts"], t["questions"], _summary(), D)
  assert not re.search(r"https?://", html)
  # A token text cannot close the data's <script> element early.
  assert html.count("</script>") == 2 and "\\u003c/script>" in html
  # The embedded JSON is exactly page_data.
  blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
  got = json.loads(blob.group(1))
  assert got == json.loads(json.dumps(token_view.page_data(
      t["nodes"], t["rollouts"], t["questions"], _summary(), D)))


def test_missing_columns_name_the_fix(parquet):
  t, _ = parquet
  with pytest.raises(ValueError, match="node_ids.*rerun the sweep"):
    token_view.render(t["nodes"], t["rollouts"].drop(columns="node_ids"), t["questions"])
  assert "No rollouts." in token_view.render(pd.DataFrame(), pd.DataFrame(), pd.DataFrame())


def _close(text, want):
  if want is None or (isinstance(want, float) and not math.isfinite(want)):
    return text == "n/a"
  return math.isclose(float(text), float(want), rel_tol=1e-3, abs_tol=1e-9)


needs_chromium = pytest.mark.skipif(
    headless.find() is None,
    reason="Chromium not installed: `apt-get install -y chromium` (.ci/run installs it) to "
           "test the token explorer in a real browser")


@needs_chromium
def test_explorer_in_headless_chromium(parquet, tmp_path):
  t, _ = parquet
  page = tmp_path / "tokens.html"
  page.write_text(token_view.render(t["nodes"], t["rollouts"], t["questions"], _summary(), D),
                  encoding="utf-8")
  student, qid, spec_a, spec_b = "s_large", "q0", "teacher:summary", "self:correct_demo"
  r = t["rollouts"]
  mine = r[(r.student == student) & (r.question_id == qid) & (r.spec == spec_a)]
  row = mine.sort_values("rollout").iloc[3]
  tok = 2
  node_id = int(row.node_ids[tok])
  with headless.Browser() as b:
    b.open(str(page))
    b.select("#student", student)
    b.select("#question", "0")
    b.select("#specA", spec_a)
    b.select("#specB", spec_b)
    b.select("#sort", "len_down")
    assert b.eval("document.querySelectorAll('.pair > div').length") == 2 * 5
    heads = b.eval("[...document.querySelectorAll('.colhead')].slice(0, 2)"
                   ".map(e => e.textContent)")
    assert heads == [spec_a, spec_b]
    b.click(f'.tok[data-r="3"][data-t="{tok}"][data-spec="{spec_a}"]')
    assert b.eval("document.querySelector('#node-meta').dataset.node") == str(node_id)
    cells = b.eval("[...document.querySelectorAll('#details [data-field]')].map(e => "
                   "[e.dataset.field, e.dataset.spec || null, e.dataset.i === undefined ? null "
                   ": Number(e.dataset.i), e.textContent])")
    info = b.eval("document.querySelector('#qinfo').textContent")
    # Filters: only incorrect rollouts, then a length window.
    b.select("#show", "incorrect")
    assert b.eval("document.querySelectorAll('.rollout.correct').length") == 0
    assert b.eval("document.querySelectorAll('.rollout').length") == int((~mine.correct).sum())
    assert not [u for u in b.requests if not u.startswith(("file:", "data:", "about:"))]
  n = t["nodes"]
  at = lambda spec: n[(n.student == student) & (n.question_id == qid) & (n.spec == spec)
                      & (n.node_id == node_id)].iloc[0]
  want = {spec: at(spec) for spec in (spec_a, spec_b)}
  shared = want[spec_a]
  checked = set()
  for field, spec, i, text in cells:
    if field in ("align", "dot", "norm"):
      value = want[spec][f"{field}_{D}"]
    elif field in COVARIATES:
      value = want[spec][field]
    elif field == "child_d":
      value = want[spec][f"child_d_{D}"][i]
    elif field == "top_q":
      value = want[spec]["top_q"][i]
    elif field in ("top_p", "child_p", "child_q", "child_n"):
      value = shared[field][i]
      if field == "child_q" and shared["child_n"][i] == 0:
        value = None
    elif field == "child_wilson":
      lo, hi = re.findall(r"[-\d.e]+", text) if shared["child_n"][i] else ("n/a", "n/a")
      assert text == "n/a" or (_close(lo, shared["child_q_lo"][i])
                               and _close(hi, shared["child_q_hi"][i])), (text, i)
      checked.add(field)
      continue
    elif field == "ideal":
      ok = shared["child_n"][i] > 0
      value = shared["child_p"][i] * (shared["child_q"][i] - shared["v_hat"]) if ok else 0.0
      assert math.isclose(float(text), value, rel_tol=2e-3, abs_tol=1e-3), (text, value)
      checked.add(field)
      continue
    else:
      value = shared[field]
    assert _close(text, value), (field, spec, i, text, value)
    checked.add(field)
  assert checked >= {"align", "dot", "norm", *COVARIATES, "top_p", "top_q", "child_p",
                     "child_q", "child_wilson", "child_n", "child_d", "ideal", "targeted",
                     "v_hat", "norm_ideal"}
  assert f"{spec_a}: Δ_q" in info and "run Δ 0.01230" in info
