"""Model-sharded forward, sampling, branching and tree scoring against the same on one device.

Run by tests/test_sharding.py in a subprocess with 8 forced host devices (XLA_FLAGS must be set
before jax is imported; the rest of the suite runs with one device). Standalone:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_DEFAULT_MATMUL_PRECISION=highest \
      python tests/sharded_checks.py

``--diagnose`` adds ``pipeline.diagnose`` on the bundled toy models (sampling, targeted
rollouts, scoring, tables) with ``ModelCache(mesh=)`` over data × model = 4 × 2 against the same
on one device (a few minutes on 2 CPU cores; not part of the test suite).

The reference is the same checkpoint loaded with no sharding (one device); every check prints
what differed and the script exits nonzero on the first failure. Tolerances: fp32, rtol 1e-5
and atol 1e-5 (the sharded programs sum in another order: all-reduces over the model axis).
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import make_hf_model, save_hf_checkpoint  # noqa: E402
from gradalign_jax import alignment, distributed, models, sampling, scoring, tree  # noqa: E402
from gradalign_jax.models import loaded  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
# N = 8 query heads, K = 4 kv heads, F = 128, V = 128: model = 2 and 4 split everything,
# model = 8 splits all but k/v (K = 4 < 8: replicated, the fallback).
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, head_dim=16,
             max_position_embeddings=256)
FORWARD_MESHES = [(1, 2), (1, 4), (1, 8), (2, 4)]  # (data, model), over the first data·model
PIPELINE_MESHES = [(1, 8), (2, 4)]  # the kv fallback; data and model together
PROMPTS = [[5, 9, 2, 7, 11], [3, 4]]
SAMPLING = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, eos_ids=(3,))


def check(ok: bool, what: str) -> None:
  if not ok:
    print(f"FAILED: {what}", flush=True)
    sys.exit(1)


def close(actual, expected, what: str) -> None:
  actual, expected = np.asarray(actual), np.asarray(expected)
  check(actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}")
  if expected.dtype.kind != "f":
    bad = actual != expected
    if bad.any():
      check(False, f"{what}: {int(bad.sum())} of {bad.size} entries differ, first at "
            f"{np.argwhere(bad)[0].tolist()}: {actual[bad][0]} vs {expected[bad][0]}")
    return
  nan = np.isnan(expected)
  check(np.array_equal(nan, np.isnan(actual)), f"{what}: NaNs in different places")
  a, e = actual[~nan], expected[~nan]
  err = np.abs(a - e) - (TOL["atol"] + TOL["rtol"] * np.abs(e))
  if err.size and err.max() > 0:
    i = int(np.argmax(err))
    check(False, f"{what}: {int((err > 0).sum())} of {err.size} entries beyond rtol "
          f"{TOL['rtol']}, atol {TOL['atol']}; worst {a[i]} vs {e[i]}")


def leaf(params, *parts):
  x = params
  for p in parts:
    x = x[p]
  return x[...]


def check_layout(params, reference, mesh, dm) -> None:
  """Spec of a few weights, and each device holding its 1/n slice of the right values."""
  data, model = dm
  heads_split = leaf(reference, "layers", 0, "self_attn", "k_proj").shape[0] % model == 0
  expect = {("embed_tokens",): (0, True), ("layers", 0, "self_attn", "q_proj"): (0, True),
            ("layers", 0, "self_attn", "k_proj"): (0, heads_split),
            ("layers", 1, "self_attn", "o_proj"): (1, True),
            ("layers", 0, "mlp", "gate_proj"): (0, True),
            ("layers", 1, "mlp", "down_proj"): (1, True),
            ("layers", 0, "input_layernorm", "weight"): (0, False)}
  for parts, (axis, split) in expect.items():
    x, ref = leaf(params, *parts), np.asarray(leaf(reference, *parts))
    name = ".".join(map(str, parts))
    check(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh,
          f"{dm} {name}: sharding {x.sharding} is not on the mesh")
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    want = tuple("model" if split and i == axis else None for i in range(x.ndim))
    check(spec == want, f"{dm} {name}: spec {spec}, expected {want}")
    shards = x.addressable_shards
    check(len(shards) == data * model, f"{dm} {name}: {len(shards)} shards")
    for s in shards:
      shape = list(ref.shape)
      if split:
        shape[axis] //= model
      check(list(s.data.shape) == shape, f"{dm} {name}: device {s.device} holds "
            f"{list(s.data.shape)}, expected {shape}")
      close(s.data, ref[s.index], f"{dm} {name} shard on {s.device}")


def check_reads_slices(path, mesh, dm) -> None:
  """A sharded load reads each device's slice, never a whole split tensor, and never takes
  the one-device path (jax.device_put of a whole tensor)."""
  reads = []
  real = jax.make_array_from_callback

  def recording(shape, sharding, callback, dtype=None):
    def wrapped(index):
      out = callback(index)
      reads.append((shape, sharding.spec, out.shape))
      return out
    return real(shape, sharding, wrapped, dtype)

  def refuse(*args, **kwargs):
    raise AssertionError("jax.device_put called during a sharded load")

  jax.make_array_from_callback, device_put = recording, jax.device_put
  jax.device_put = refuse
  try:
    models.load_pretrained(path, sharding=distributed.param_sharding(mesh))
  finally:
    jax.make_array_from_callback, jax.device_put = real, device_put
  check(len(reads) > 0, f"{dm}: the sharded load read nothing through make_array_from_callback")
  for shape, spec, got in reads:
    want = tuple(n // dm[1] if a == "model" else n
                 for n, a in zip(shape, tuple(spec) + (None,) * len(shape)))
    check(got == want, f"{dm}: a tensor {shape} split {spec} was read as a {got} slice, "
          f"expected {want}")


def tree_of(ro, br) -> tree.PrefixTree:
  t = tree.PrefixTree()
  for i in range(len(ro)):
    t.add(ro.sequence(i), float(i % 2))
  for i in range(len(br)):
    t.add(br.sequence(i), float(i % 3 == 0), branch_depth=int(br.branch_depth[i]))
  return t


def pipeline(cfg, params):
  """Sample, branch, then score the tree: everything the checks compare. The teacher is the
  student with a context before the question (the "self" teacher; one model keeps the number
  of compiled programs, hence the run time, down)."""
  ro = sampling.sample(cfg, params, PROMPTS, SAMPLING, num_samples=4, seed=3)
  long = [int(i) for i in np.argsort(-ro.lengths)[:2]]
  br = sampling.branch(cfg, params, ro, long, [2, 1], [7, 8], num_samples=2, seed=1)
  t = tree_of(ro, br)
  student = scoring.PromptedModel(cfg, params, PROMPTS[0])
  teacher = scoring.PromptedModel(cfg, params, [1, 2, 13, 17] + PROMPTS[0])
  ids, s_logits, t_logits, _ = scoring.node_logits(t, student, teacher, chunk_nodes=8)
  columns, _ = alignment.score_tree(t, student, teacher, chunk_nodes=8, topk=3,
                                    policy=SAMPLING)
  return ro, br, (ids, s_logits, t_logits), columns


def same_tables(a, b, what: str) -> None:
  """Two pipeline.Tables: the same columns and rows; floats (also inside list cells) close."""
  for name in ("nodes", "rollouts", "questions"):
    x, y = getattr(a, name), getattr(b, name)
    check(list(x.columns) == list(y.columns) and len(x) == len(y),
          f"{what} {name}: columns or row counts differ")
    for column in x.columns:
      for i, (u, v) in enumerate(zip(x[column], y[column])):
        if isinstance(u, str) or u is None:
          check(u == v, f"{what} {name}.{column} row {i}: {v!r} vs {u!r}")
        else:
          close(np.asarray(v), np.asarray(u), f"{what} {name}.{column} row {i}")


def check_diagnose() -> None:
  from gradalign_jax import pipeline, targeted, tasks
  task = tasks.get_task("synthetic")
  examples = task.load("synthetic:seed=1,n=256", limit=2)
  config = pipeline.DiagnoseConfig(
      num_rollouts=8, sampling=sampling.SamplingConfig(max_new_tokens=40),
      targeted=targeted.TargetedConfig(budget=8))
  specs = ["teacher", "self:correct_demo"]
  plain = pipeline.diagnose("student_small", specs, examples, task, config)
  mesh = distributed.make_mesh(4, 2)
  sharded = pipeline.diagnose("student_small", specs, examples, task, config,
                              models=loaded.ModelCache(mesh=mesh))
  same_tables(sharded, plain, "diagnose (4, 2)")
  print(f"pipeline.diagnose over (4, 2) equals one device ({len(plain.nodes)} nodes)", flush=True)


def main() -> None:
  start = time.time()
  check(jax.device_count() == 8, f"needs 8 devices, found {jax.device_count()} (set XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 before jax is imported)")
  tmp = tempfile.mkdtemp()
  student_dir = save_hf_checkpoint(make_hf_model(seed=0, **SIZES), os.path.join(tmp, "s"))
  tied_dir = save_hf_checkpoint(make_hf_model(seed=1, tie_word_embeddings=True, **SIZES),
                                os.path.join(tmp, "t"))
  cfg, params = models.load_pretrained(student_dir)
  tcfg, tparams = models.load_pretrained(tied_dir)
  tokens = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, 12)).astype(np.int32)
  ref_logits = np.asarray(models.forward(cfg, params, tokens))
  ref_tied = np.asarray(models.forward(tcfg, tparams, tokens))
  ref = pipeline(cfg, params)
  check(ref[0].lengths.max() > 4, "the reference rollouts are too short to branch")

  for dm in FORWARD_MESHES:
    mesh = distributed.make_mesh(*dm, devices=jax.devices()[:dm[0] * dm[1]])
    check(dict(mesh.shape) == {"data": dm[0], "model": dm[1]}, f"mesh {mesh.shape}")
    _, sp = models.load_pretrained(student_dir, sharding=distributed.param_sharding(mesh))
    check_layout(sp, params, mesh, dm)
    if dm == (2, 4):
      check_reads_slices(student_dir, mesh, dm)
    close(models.forward(cfg, sp, tokens), ref_logits, f"{dm} forward")
    if dm == (2, 4):  # one mesh: the tied head shares the embedding's rule
      _, tp = models.load_pretrained(tied_dir, sharding=distributed.param_sharding(mesh))
      close(models.forward(tcfg, tp, tokens), ref_tied, f"{dm} forward, tied embeddings")
    print(f"{dm}: layout and forward ok ({time.time() - start:.0f} s)", flush=True)
    if dm not in PIPELINE_MESHES:
      continue
    ro, br, logits, columns = pipeline(cfg, sp)
    for name, a, b in (("sample", ro, ref[0]), ("branch", br, ref[1])):
      close(a.tokens, b.tokens, f"{dm} {name} tokens")
      close(a.lengths, b.lengths, f"{dm} {name} lengths")
      close(a.logprobs, b.logprobs, f"{dm} {name} log-probs")
    k = ro.state.gen.k[0]
    kv_split = SIZES["num_key_value_heads"] % dm[1] == 0
    rows_split = k.shape[0] % dm[0] == 0 and dm[0] > 1
    want = ("data" if rows_split else None, "model" if kv_split else None, None, None)
    got = tuple(k.sharding.spec) + (None,) * (4 - len(k.sharding.spec))
    check(got == want, f"{dm} sampler KV cache spec {got}, expected {want}")
    for name, a, b in zip(("node ids", "student logits", "teacher logits"), logits, ref[2]):
      close(a, b, f"{dm} scoring {name}")
    check(set(columns) == set(ref[3]), f"{dm} score_tree columns differ")
    for name in ref[3]:
      close(columns[name], ref[3][name], f"{dm} score_tree {name}")
    print(f"{dm}: sample, branch, scoring ok ({time.time() - start:.0f} s)", flush=True)

  # The orbax cache restores into the same shards.
  mesh = distributed.make_mesh(2, 4)
  cache_dir = os.path.join(tmp, "orbax")
  first = models.load_pretrained(student_dir, sharding=distributed.param_sharding(mesh),
                                 cache_dir=cache_dir)[1]
  check(len(os.listdir(cache_dir)) == 1, "load_pretrained wrote no orbax cache")
  again = models.load_pretrained(student_dir, sharding=distributed.param_sharding(mesh),
                                 cache_dir=cache_dir)[1]
  check_layout(again, params, mesh, (2, 4))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(again),
                          jax.tree_util.tree_leaves(first)):
    check(a.sharding == b.sharding, f"orbax restore {jax.tree_util.keystr(path)}: "
          f"{a.sharding} != {b.sharding}")

  # LoadedModel(mesh=...) on a bundled toy model (N = 4, K = 2: model = 2 splits all).
  mesh = distributed.make_mesh(4, 2)
  plain = loaded.LoadedModel("student_small")
  sharded = loaded.ModelCache(mesh=mesh).get("self", student="student_small")
  check(distributed.mesh_of(sharded.params) == mesh and distributed.mesh_of(plain.params) is None,
        "LoadedModel(mesh=) did not place the params on the mesh")
  check_layout(sharded.params, plain.params, mesh, (4, 2))
  if "--diagnose" in sys.argv[1:]:
    check_diagnose()
  print(f"all sharding checks passed in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
