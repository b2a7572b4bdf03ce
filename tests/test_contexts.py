"""Teacher specs: parsing, errors, the context turns they build, the summary cache."""

import os

import pytest

from gradalign_jax import contexts, models
from gradalign_jax.models import loaded
from gradalign_jax.tasks import synthetic


@pytest.fixture(scope="module")
def toy_tok(tmp_path_factory):
  return models.load_tokenizer(synthetic.write_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.mark.parametrize("text,model,context,summarizer", [
    ("self", "self", "none", None),
    ("teacher", "teacher", "none", None),
    ("self:correct_demo", "self", "correct_demo", None),
    ("self:correct_demo=rollout", "self", "correct_demo=rollout", None),
    ("self:correct_and_wrong_demo", "self", "correct_and_wrong_demo", None),
    ("self:summary", "self", "summary", "self"),
    ("self:summary_by=teacher", "self", "summary_by", "teacher"),
    ("teacher:correct_demo", "teacher", "correct_demo", None),
    ("Qwen/Qwen3-8B:summary", "Qwen/Qwen3-8B", "summary", "Qwen/Qwen3-8B"),
    ("student_large:summary_by=Qwen/Qwen3-1.7B", "student_large", "summary_by", "Qwen/Qwen3-1.7B"),
])
def test_parse_spec(text, model, context, summarizer):
  spec = contexts.parse_spec(text)
  assert (spec.text, spec.model, spec.context, spec.summarizer) == (text, model, context,
                                                                    summarizer)
  assert spec.needs_rollout_demos == (context in ("correct_demo=rollout",
                                                  "correct_and_wrong_demo"))


def test_parse_spec_accepts_checkpoint_directories(tmp_path):
  spec = contexts.parse_spec(f"{tmp_path}:correct_demo")
  assert spec.model == str(tmp_path) and spec.context == "correct_demo"


@pytest.mark.parametrize("text,names", [
    ("selff", "'selff' is not 'self'"),
    ("self:corect_demo", "unknown context 'corect_demo'"),
    ("self:", "empty on one side"),
    (":summary", "empty on one side"),
    ("self:summary_by=nobody", "'nobody' is not 'self'"),
    ("self:none", "unknown context 'none'"),
])
def test_unknown_specs_are_refused_with_the_valid_ones_listed(text, names):
  with pytest.raises(contexts.SpecError) as e:
    contexts.parse_spec(text)
  assert names in str(e.value)
  for valid in ("self:correct_demo", "self:correct_and_wrong_demo", "self:summary_by=<model>",
                "<model>:correct_demo"):
    assert valid in str(e.value)


def test_parse_specs_refuses_repeats_and_nothing():
  with pytest.raises(contexts.SpecError, match="more than once"):
    contexts.parse_specs(["self:summary", "teacher", "self:summary"])
  with pytest.raises(contexts.SpecError, match="no teacher spec"):
    contexts.parse_specs([])


def test_resolve_model():
  assert loaded.resolve_model("teacher", "x") == os.path.join(loaded.TOY_DIR, "teacher")
  assert loaded.resolve_model("self", "student_small") == os.path.join(loaded.TOY_DIR,
                                                                         "student_small")
  assert loaded.resolve_model("self", "/ckpt/a") == "/ckpt/a"
  assert loaded.resolve_model("Qwen/Qwen3-8B", "x") == "Qwen/Qwen3-8B"


def test_context_turns_and_prompts(toy_tok):
  task = synthetic.SyntheticTask()
  ex = task.generate(1, seed=3)[0]
  demos = contexts.DemoPool(texts=("1+1=2\n#2", "9*9=1\n#1", "3-1=2\n#2"),
                            correct=(False, True, False))
  turns = lambda s, **kw: contexts.context_turns(contexts.parse_spec(s), task, ex, **kw)
  assert turns("teacher") == []
  assert turns("self:correct_demo") == [(ex.question, ex.solution)]
  assert turns("self:correct_demo=rollout", demos=demos) == [(ex.question, "9*9=1\n#1")]
  # The reference solution, then the first incorrect extra rollout, marked incorrect.
  assert turns("self:correct_and_wrong_demo", demos=demos) == [
      (ex.question, ex.solution), ("wrong " + ex.question, "1+1=2\n#2")]
  assert turns("self:summary", summary="7 4 #4") == [("hint " + ex.question, "7 4 #4")]
  with pytest.raises(contexts.ContextUnavailable, match="no incorrect rollout among 1"):
    turns("self:correct_and_wrong_demo", demos=contexts.DemoPool(("x",), (True,)))
  with pytest.raises(contexts.ContextUnavailable, match="no correct rollout"):
    turns("self:correct_demo=rollout", demos=contexts.DemoPool(("x",), (False,)))
  with pytest.raises(ValueError, match="DemoPool"):
    turns("self:correct_and_wrong_demo")
  with pytest.raises(ValueError, match="summary text"):
    turns("self:summary")
  # The prompt: the context turns, then the same question the student sees, at the end.
  spec = contexts.parse_spec("self:correct_and_wrong_demo")
  text = contexts.teacher_prompt(spec, task, toy_tok, ex, False, demos)
  student = task.prompt(toy_tok, ex)
  assert text.endswith(student.split("<|im_end|>\n")[-2] + "<|im_end|>\n" +
                       student.split("<|im_end|>\n")[-1])
  assert text.index(ex.solution) < text.index("wrong " + ex.question) < text.rindex(ex.question)


def test_summary_prompt_and_cache(toy_tok, tmp_path):
  task = synthetic.SyntheticTask()
  ex = task.generate(1, seed=4)[0]
  prompt = contexts.summary_prompt(task, toy_tok, ex)
  assert "summarize\n" + ex.solution in prompt and prompt.endswith("</think>\n\n")
  path = str(tmp_path / "summaries.json")
  cache = contexts.SummaryCache(path)
  assert cache.get("m", ex, ex.solution) is None
  cache.put("m", ex, ex.solution, "s1")
  cache.save()
  again = contexts.SummaryCache(path)
  assert again.get("m", ex, ex.solution) == "s1"
  assert again.get("m", ex, ex.solution + "x") is None  # another text, another summary
  assert again.get("other", ex, ex.solution) is None
