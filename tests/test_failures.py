"""Loud failures of the experiments (issue 17): every bad flag, file or directory ends the script
with exit status 1 and one short message naming it and the fix, and leaves every byte
already in --out (or in a user's directory) as it was; a resume with an edited data file or a
replaced checkpoint is refused; non-finite logits stop a group before any of it is written.

The scripts' main runs in-process (flags parsed, then unparsed); one case runs as a real
subprocess to show the exit status and that --help is not printed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from experiments import alignment_sweep as sweep
from experiments import flags as flags_lib
from experiments import in_context_accuracy as ica
from gradalign_jax import alignment, models, rundir
from gradalign_jax.models import checkpoint, qwen3
from gradalign_jax.tasks import synthetic

from tests.test_rundir import checkout, corrupt_config, snapshot, users_dir

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = qwen3.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=256)


def _checkpoint(path, seed=0, scale=1.0):
  """A tiny random checkpoint; ``scale`` multiplies the final norm and the head (1e30: finite
  weights whose logits overflow float32)."""
  synthetic.write_tokenizer(path)
  tok = models.load_tokenizer(path)
  params = qwen3.init_params(CFG, seed=seed)
  for leaf in (params["lm_head"], params["norm"]["weight"]):
    leaf[...] = leaf[...] * scale
  checkpoint.save_pretrained(CFG, params, path, extra_config={
      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("failures")
  data = root / "questions.jsonl"
  data.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n"
                          for i, q in enumerate(["2-7+2", "5*3+4"])))
  latin = root / "latin1.jsonl"
  latin.write_bytes('{"question": "2+3 é"}\n'.encode("latin-1"))
  chain = root / "chains.jsonl"
  chain.write_text('{"question": "2+3"}\n{"question": "two plus three"}\n')
  ckpt = _checkpoint(str(root / "student"))
  truncated = _checkpoint(str(root / "truncated"))
  weights = os.path.join(truncated, "model.safetensors")
  with open(weights, "rb") as f:
    head = f.read()
  with open(weights, "wb") as f:
    f.write(head[:len(head) // 2])
  nan = _checkpoint(str(root / "nan"))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(nan, "model.safetensors"))
  tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.nan
  save_file(tensors, os.path.join(nan, "model.safetensors"))
  return dict(root=root, data=str(data), latin=str(latin), chain=str(chain), ckpt=ckpt,
              truncated=truncated, nan=nan)


def main(module, args, capsys):
  """(exit status, stderr) of the script's main with ``args`` parsed as its flags."""
  FLAGS.unparse_flags()
  try:
    FLAGS(["prog"] + args)
    with pytest.raises(SystemExit) as e:
      flags_lib.main_function(module.GROUPS, module.run)(["prog"])
  finally:
    FLAGS.unparse_flags()
  return e.value.code, capsys.readouterr().err


def _finished_run(path):
  run = rundir.RunDir(str(path), sweep.settings(), inputs={})
  with run.open():
    run.write_parts("student_small", {0: {"nodes": [{"x": 1.0}]}})
  (path / "report.md").write_text("# the finished run's report")


def _locked(path):
  _finished_run(path)
  with open(path / "lock", "w") as f:
    json.dump({"host": "elsewhere", "pid": 4242}, f)


def _file(path):
  path.write_text("results I typed by hand")


def _nothing(path):
  pass


TINY = ["--students={ckpt}", "--teachers=self", "--num_questions=1", "--data={data}"]
CASES = [  # (id, what is at --out, overwrite, flags, the message)
    ("overwrite_with_teacher_typo", _finished_run, True, ["--teachers=tacher"],
     r"teacher spec 'tacher'.*Valid specs"),
    ("overwrite_users_dir", users_dir, True, TINY,
     r"is not a run directory of this tool \(it holds data, notes.txt\); nothing was changed"),
    ("users_dir", users_dir, False, TINY, r"not a run directory of this tool"),
    ("overwrite_checkout_dot", checkout, True, TINY, r"it holds .git, README.md"),
    ("out_is_a_file", _file, False, TINY, r"is a file, not a directory; pass a directory"),
    ("corrupt_config", corrupt_config, True, TINY, r"config.json cannot be read .*restore"),
    ("locked_by_another_host", _locked, False, TINY,
     r"being written by process 4242 on elsewhere.*delete the lock file"),
    ("num_continuations_0", _nothing, False, TINY + ["--num_continuations=0"],
     r"num_continuations ≥ 1"),
    ("jsd_beta_2", _nothing, False, TINY + ["--jsd_beta=2"], r"jsd_beta=2.0 must be in \[0, 1\]"),
    ("topk_0", _nothing, False, TINY + ["--topk=0"], r"topk ≥ 1"),
    ("summary_tokens_0", _nothing, False, TINY + ["--summary_tokens=0"], r"summary_tokens ≥ 1"),
    ("num_rollouts_1", _nothing, False, TINY + ["--num_rollouts=1"],
     r"num_rollouts=1 must be ≥ 2"),
    ("data_not_utf8", _nothing, False, TINY + ["--data={latin}"],
     r"latin1.jsonl line 1: not UTF-8 text .*save the file as UTF-8"),
    ("malformed_synthetic", _nothing, False, TINY + ["--data={chain}", "--num_questions=2"],
     r"chains.jsonl row 1: field 'question' is 'two plus three', not a chain"),
    ("truncated_safetensors", _nothing, False, TINY + ["--students={truncated}"],
     r"truncated/model.safetensors: tensor .* outside the file's .*download or save"),
    ("nan_weights", _nothing, False, TINY + ["--students={nan}"],
     r"tensor model.layers.0.self_attn.q_proj.weight .* 1 NaN/Inf value"),
]


@pytest.mark.parametrize("make,overwrite,args,message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_refused_with_a_short_message_and_nothing_changed(files, tmp_path, monkeypatch, capsys,
                                                          make, overwrite, args, message):
  out = tmp_path / "out"
  make(out)
  before = snapshot(tmp_path)
  if make is checkout:
    monkeypatch.chdir(out)
  where = "." if make is checkout else str(out)
  args = [a.format(**files) for a in args] + [f"--out={where}"] + (
      ["--overwrite"] if overwrite else [])
  code, err = main(sweep, args, capsys)
  assert code == 1
  assert err.startswith("error: ") and len(err.splitlines()) <= 3, err  # no --help dump
  assert "--help lists the flags" in err
  import re
  assert re.search(message, err), err
  assert snapshot(tmp_path) == before


def test_script_exit_status_and_short_message(tmp_path):
  out = tmp_path / "finished"
  _finished_run(out)
  before = snapshot(out)
  run = subprocess.run(
      [sys.executable, "-m", "experiments.alignment_sweep", f"--out={out}", "--overwrite",
       "--teachers=tacher"], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert run.returncode == 1
  assert run.stderr.startswith("error: teacher spec 'tacher'"), run.stderr[-2000:]
  assert "--budget" not in run.stderr and len(run.stderr.splitlines()) <= 3
  assert snapshot(out) == before


def _settings(files, **kw):
  return ica.settings(**dict(dict(students=(files["ckpt"],), teachers=("self",), data=files["data"],
                                  num_questions=2, num_rollouts=2, max_new_tokens=4,
                                  question_batch=1, demo_samples=2, seed=1), **kw))


def test_resume_refuses_edited_data_and_replaced_checkpoint(files, tmp_path):
  data = tmp_path / "questions.jsonl"
  data.write_text(open(files["data"]).read())
  ckpt = _checkpoint(str(tmp_path / "student"))
  s = _settings(files, data=str(data), students=(ckpt,))
  out = tmp_path / "out"
  ica.run(s, str(out))
  before = snapshot(out)
  data.write_text(data.read_text().replace("5*3+4", "5*3+5"))
  with pytest.raises(rundir.RunDirError, match=f"other inputs: --data={data} changed"):
    ica.run(s, str(out))
  assert snapshot(out) == before
  data.write_text(open(files["data"]).read())
  _checkpoint(ckpt, seed=1)  # other weights, same shapes, same path
  with pytest.raises(rundir.RunDirError, match=f"other inputs: checkpoint {ckpt} changed"):
    ica.run(s, str(out))
  assert snapshot(out) == before


def test_non_finite_logits_stop_the_group(files, tmp_path):
  """Weights that load (finite) but overflow in the forward pass: the error names the model,
  the question and the stage, and no part is written."""
  ckpt = _checkpoint(str(tmp_path / "overflow"), scale=1e30)
  out = tmp_path / "out"
  with pytest.raises(alignment.NonFiniteError,
                     match=rf"{ckpt}: non-finite logits while sampling answers of question "
                     r"'q0'; nothing of its question group was written"):
    ica.run(_settings(files, students=(ckpt,)), str(out))
  assert not os.path.exists(out / "parts") and not os.path.exists(out / "lock")
