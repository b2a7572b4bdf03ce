"""Model sharding (distributed.py): the rules as a table, and on 8 forced host devices the
sharded forward, sampling, branching and tree scoring against the same on one device."""

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from gradalign_jax import distributed

HERE = os.path.dirname(os.path.abspath(__file__))

# (path, shape, model axis size) -> expected spec: the rules of distributed.py, worked by hand
# for Qwen3-8B's shapes (N = 32, K = 8, H = 128, D = 4096, F = 12288, V = 151936).
RULES = {
    "q_proj over query heads": (("layers", 0, "self_attn", "q_proj"), (32, 128, 4096), 8,
                                P("model", None, None)),
    "k_proj over kv heads": (("layers", 0, "self_attn", "k_proj"), (8, 128, 4096), 8,
                             P("model", None, None)),
    "k_proj: 8 kv heads over 16 → replicated": (("layers", 0, "self_attn", "k_proj"),
                                                 (8, 128, 4096), 16, P()),
    "v_bias over kv heads": (("layers", 2, "self_attn", "v_bias"), (8, 128), 4, P("model", None)),
    "o_proj over its input heads": (("layers", 0, "self_attn", "o_proj"), (4096, 32, 128), 8,
                                    P(None, "model", None)),
    "o_bias replicated": (("layers", 0, "self_attn", "o_bias"), (4096,), 8, P()),
    "gate_proj over F": (("layers", 1, "mlp", "gate_proj"), (12288, 4096), 8, P("model", None)),
    "up_proj over F": (("layers", 1, "mlp", "up_proj"), (12288, 4096), 8, P("model", None)),
    "down_proj over its input F": (("layers", 1, "mlp", "down_proj"), (4096, 12288), 8,
                                   P(None, "model")),
    "embedding over the vocabulary": (("embed_tokens",), (151936, 4096), 8, P("model", None)),
    "head over the vocabulary": (("lm_head",), (151936, 4096), 8, P("model", None)),
    "odd vocabulary → replicated": (("lm_head",), (1001, 64), 8, P()),
    "q/k norms replicated": (("layers", 0, "self_attn", "k_norm", "weight"), (128,), 8, P()),
    "layer norm replicated": (("layers", 0, "input_layernorm", "weight"), (4096,), 8, P()),
    "final norm replicated": (("norm", "weight"), (4096,), 8, P()),
    "one device: nothing split": (("layers", 0, "self_attn", "q_proj"), (32, 128, 4096), 1, P()),
}


@pytest.mark.parametrize("case", RULES)
def test_param_spec(case):
  parts, shape, model, expected = RULES[case]
  assert distributed.param_spec(parts, shape, model) == expected


def test_every_parameter_has_a_rule():
  """Each parameter of a model with every optional weight (bias, untied head) is either in
  the split table or one of the replicated kinds: a new weight cannot slip through unnoticed."""
  from gradalign_jax.models import checkpoint, qwen3
  cfg = qwen3.Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=4, attention_bias=True)
  names = {checkpoint.param_path(p)[-1] for p, _ in
           jax.tree_util.tree_leaves_with_path(qwen3.abstract_params(cfg))}
  assert names - set(distributed._SPLIT_AXIS) == {"weight", "o_bias"}


# (data, model), array shape -> expected spec: KV per layer (keys [B, K, H, S], values
# [B, K, S, H]: the same rule), validity/positions [B, S], per-row [B], the write index []
CACHE_RULES = {
    "kv: rows over data, kv heads over model": ((2, 4), (16, 8, 64, 128),
                                                P("data", "model", None, None)),
    "kv: 8 kv heads over 16 → replicated heads": ((1, 16), (16, 8, 64, 128),
                                                   P(None, None, None, None)),
    "kv: one row over data 2 → replicated rows": ((2, 4), (1, 8, 64, 128),
                                                  P(None, "model", None, None)),
    "validity: rows over data": ((2, 4), (16, 64), P("data", None)),
    "per-row positions over data": ((2, 4), (16,), P("data")),
    "odd rows → replicated": ((2, 4), (3,), P(None)),
    "write index replicated": ((2, 4), (), P()),
}


@pytest.mark.parametrize("case", CACHE_RULES)
def test_cache_spec(case):
  axes, shape, expected = CACHE_RULES[case]
  mesh = jax.sharding.AbstractMesh(axes, ("data", "model"))
  assert distributed.cache_spec(mesh, shape) == expected


def test_make_mesh_refuses_a_mismatch():
  with pytest.raises(ValueError, match="needs 4 devices"):
    distributed.make_mesh(2, 2, devices=jax.devices()[:1])
  mesh = distributed.make_mesh()
  assert mesh.axis_names == ("data", "model") and mesh.size == jax.local_device_count()


def test_one_device_params_have_no_mesh():
  from gradalign_jax.models import qwen3
  cfg = qwen3.Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=4)
  assert distributed.mesh_of(qwen3.init_params(cfg)) is None


@pytest.mark.slow
def test_sharded_equals_unsharded_on_8_devices():
  """tests/sharded_checks.py in a subprocess (XLA_FLAGS must be set before jax is imported):
  forward over model = 2, 4, 8 and data × model = 2 × 4; sample, branch and score_tree over
  model = 8 (kv heads replicated) and 2 × 4; the layout of the loaded weights; orbax restore."""
  pytest.importorskip("torch")  # the checkpoints are written by transformers
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py")], env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, f"sharded checks failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
  assert "all sharding checks passed" in run.stdout


@pytest.mark.slow
def test_sweep_with_model_parallel_equals_one_device(tmp_path):
  """The main job on 8 forced devices with --model_parallel=2 (each model split over 2, the
  sampler's rows over 4) writes the one-device run's tables: same tokens, rewards and nodes,
  floats within 1e-4 (reductions are split across devices)."""
  import numpy as np
  import pandas as pd
  flags = ["--students=student_small", "--teachers=teacher,self:correct_demo",
           "--num_questions=4", "--num_rollouts=8", "--demo_samples=8", "--budget=8",
           "--permutations=50", "--question_batch=2"]
  base = dict(os.environ, JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                          os.environ.get("PYTHONPATH", "")]))
  runs = {"one": ([], base),
          "eight": (["--model_parallel=2"],
                    dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8"))}
  for name, (extra, env) in runs.items():
    run = subprocess.run([sys.executable, "-m", "experiments.alignment_sweep", *flags, *extra,
                          f"--out={tmp_path / name}"], env=env, capture_output=True, text=True,
                         timeout=900, cwd=os.path.dirname(HERE))
    assert run.returncode == 0, f"{name}: {run.stderr[-4000:]}"
    assert ("data=4 × model=2" in run.stderr) == (name == "eight"), run.stderr[-2000:]
  for table in ("nodes", "rollouts", "questions"):
    a = pd.read_parquet(tmp_path / "one" / f"{table}.parquet")
    b = pd.read_parquet(tmp_path / "eight" / f"{table}.parquet")
    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    exact = [c for c in a.columns if a[c].dtype.kind in "iub"]
    pd.testing.assert_frame_equal(a[exact], b[exact], check_exact=True)
    np.testing.assert_allclose(b[floats].to_numpy(), a[floats].to_numpy(), rtol=1e-4,
                               atol=1e-4, err_msg=table)
