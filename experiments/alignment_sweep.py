"""The main job: how well each distillation gradient aligns with the ideal one, per teacher.

For every student and question: G rollouts from the student (prompt prefilled once), verified
and folded into a prefix tree; targeted rollouts branched from cached prefixes where the
estimate matters most (the budget split across teacher specs, each choosing pairs by its
own priority; all of them refine the one shared tree); then, per teacher spec, student and
teacher logits at every node, the ideal direction ĝ* and every distillation direction,
their cosines and the covariates. Results go to ``--out``:

  nodes.parquet       one row per (student, spec, question, scored node): covariates, every
                      direction's cosine/dot/norm, Q̂ of the children with Wilson intervals
  rollouts.parquet    one row per on-policy rollout and spec: correct, its path's aggregates
                      (sums that combine exactly), per-token cosines for the token view
  questions.parquet   one row per (student, spec, question): accuracy, context status, means
  summary.json        per student and spec: correct / incorrect / all blocks, tests, findings
  report.md           the correct-vs-incorrect comparison, covariates, findings, plots
  tokens.html         every rollout's tokens coloured by alignment
  parts/              per-question results, written atomically: a rerun with the same --out
                      resumes where an interrupted run stopped and gives identical tables

With no flags it runs both bundled toy students against the toy teacher and the
self-distillation contexts on the synthetic task (a few minutes on a laptop CPU):

  python -m experiments.alignment_sweep --out=runs/sweep
  python -m experiments.alignment_sweep --students=Qwen/Qwen3-1.7B \\
      --teachers=self:correct_demo,Qwen/Qwen3-8B --task=math --data=path/to/test.jsonl \\
      --num_questions=200 --num_rollouts=32 --max_new_tokens=4096 --out=runs/math
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Sequence

import numpy as np
from absl import app, flags, logging

DIRECTIONS = ("reverse_kl", "forward_kl", "jsd", "topk_reverse_kl", "topk_reverse_kl_sg",
              "single_sample", "minillm")
COVARIATES = ("kl_pq", "kl_qp", "l2_pq", "cos_pq", "entropy_p", "entropy_q")
DEFAULT_TEACHERS = ("teacher", "teacher:correct_demo", "self:correct_demo",
                    "self:correct_and_wrong_demo", "self:summary")
DEMO_STREAM = 1 << 20  # demo rollouts fold question index + this: streams apart from scored ones

flags.DEFINE_list("students", ["student_small", "student_large"],
                  "student models: bundled toy names, checkpoint directories or hub ids")
flags.DEFINE_list("teachers", list(DEFAULT_TEACHERS),
                  "teacher specs, one per column of results (gradalign_jax/contexts.py): "
                  "self[:context] or <model>[:context]; contexts: correct_demo, "
                  "correct_demo=rollout, correct_and_wrong_demo, summary, summary_by=<model>")
flags.DEFINE_string("task", "synthetic", "task name: synthetic, boolq, mmlu, aime, gsm8k, math")
flags.DEFINE_string("data", "synthetic:seed=1,n=256",
                    "data source: a jsonl/json/parquet file or directory, hf:<name>[:<config>]"
                    ":<split>, or synthetic[:seed=S,n=N]")
flags.DEFINE_integer("num_questions", 16, "questions to use (the first ones of --data)")
flags.DEFINE_integer("num_rollouts", 16, "G: on-policy rollouts per question")
flags.DEFINE_float("temperature", 1.0, "sampling temperature T (π = softmax(z/T))")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling (1 = off)")
flags.DEFINE_integer("top_k", 0, "top-k sampling (0 = off)")
flags.DEFINE_integer("max_new_tokens", 48, "rollout horizon in generated tokens")
flags.DEFINE_enum("thinking", "task", ["task", "on", "off"],
                  "Qwen3 thinking mode of the prompts (task: the task's default)")
flags.DEFINE_integer("budget", 32, "targeted rollouts per question, split across teacher specs")
flags.DEFINE_integer("num_continuations", 4, "M: continuations per targeted (node, token) pair")
flags.DEFINE_enum("priority", "reverse_kl", ["reverse_kl", "forward_kl", "jsd", "prob_gap"],
                  "how targeted rollouts rank (node, token) pairs")
flags.DEFINE_list("directions", list(DIRECTIONS),
                  "distillation directions in the tables and report; the first is the headline")
flags.DEFINE_integer("demo_samples", 16, "extra student rollouts per question that "
                     "demonstrations are drawn from (never the scored ones); equal to "
                     "--num_rollouts, they reuse its compiled sampler")
flags.DEFINE_integer("summary_tokens", 32, "most tokens of a generated summary")
flags.DEFINE_integer("question_batch", 8, "questions sampled together (fixed groups of the "
                     "dataset order, so results do not depend on where a run was resumed)")
flags.DEFINE_float("jsd_beta", 0.5, "β of the JSD direction")
flags.DEFINE_integer("topk", 20, "k of the top-k reverse-KL directions")
flags.DEFINE_integer("chunk_nodes", 256, "nodes per scoring chunk (memory: chunk × vocab)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "weight dtype")
flags.DEFINE_integer("seed", 0, "seed of every random draw")
flags.DEFINE_string("out", "runs/sweep", "output directory (reruns resume from its parts/)")
flags.DEFINE_bool("overwrite", False, "delete --out first instead of resuming")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """Everything that determines the results (saved as config.json; a resumed run must match)."""
  students: tuple[str, ...] = ("student_small", "student_large")
  teachers: tuple[str, ...] = DEFAULT_TEACHERS
  task: str = "synthetic"
  data: str = "synthetic:seed=1,n=256"
  num_questions: int = 16
  num_rollouts: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 48
  thinking: str = "task"
  budget: int = 32
  num_continuations: int = 4
  priority: str = "reverse_kl"
  directions: tuple[str, ...] = DIRECTIONS
  demo_samples: int = 16
  summary_tokens: int = 32
  question_batch: int = 8
  jsd_beta: float = 0.5
  topk: int = 20
  chunk_nodes: int = 256
  dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    for name in ("students", "teachers", "directions"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    bad = [d for d in self.directions if d not in DIRECTIONS]
    if bad or not self.directions:
      raise ValueError(f"unknown directions {bad}; choose from {list(DIRECTIONS)}")
    if not self.students:
      raise ValueError("no student given: pass --students")
    if self.num_questions < 1 or self.num_rollouts < 2 or self.question_batch < 1:
      raise ValueError("need num_questions ≥ 1, num_rollouts ≥ 2 (a tree needs a branch) and "
                       "question_batch ≥ 1")

  @classmethod
  def from_flags(cls) -> "SweepConfig":
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: FLAGS[n].value for n in names})


# ---------------------------------------------------------------------------------------
# Models and prompts


class Model:
  """A loaded checkpoint: config, params, tokenizer, its vocab mask and sampling ids."""

  def __init__(self, ref: str, dtype: str):
    from gradalign_jax import models

    self.ref = ref
    self.cfg, self.params = models.load_pretrained(ref, dtype=dtype)
    self.tok = models.load_tokenizer(ref)
    self.mask = models.vocab_mask(self.tok, self.cfg.vocab_size)
    ends = {self.tok.eos_token_id} | {self.tok.convert_tokens_to_ids(t)
                                       for t in ("<|im_end|>", "<|endoftext|>")}
    self.eos_ids = tuple(sorted(e for e in ends if isinstance(e, int) and 0 <= e < len(self.tok)))
    pad = self.tok.pad_token_id
    self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
    self._text: dict[int, str] = {}

  def encode(self, text: str) -> list[int]:
    return self.tok(text, add_special_tokens=False)["input_ids"]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)

  def token_text(self, ids: Sequence[int]) -> list[str]:
    out = []
    for t in ids:
      if t not in self._text:
        self._text[t] = self.tok.decode([int(t)], skip_special_tokens=False)
      out.append(self._text[t])
    return out

  def sampling(self, cfg: SweepConfig, max_new_tokens: int | None = None, greedy=False):
    from gradalign_jax import sampling

    return sampling.SamplingConfig(
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        temperature=1.0 if greedy else cfg.temperature, top_p=1.0 if greedy else cfg.top_p,
        top_k=1 if greedy else cfg.top_k, eos_ids=self.eos_ids, pad_id=self.pad_id)


class Models:
  """Loads each checkpoint once; "self" resolves to the student of the moment."""

  def __init__(self, dtype: str):
    self.dtype = dtype
    self._loaded: dict[str, Model] = {}

  def get(self, ref: str, student: str) -> Model:
    from gradalign_jax import contexts

    path = contexts.resolve_model(ref, student)
    if path not in self._loaded:
      logging.info("loading %s", path)
      self._loaded[path] = Model(path, self.dtype)
    return self._loaded[path]


def thinking(cfg: SweepConfig, task) -> bool:
  if cfg.thinking == "task":
    import inspect
    return inspect.signature(task.prompt).parameters["enable_thinking"].default
  return cfg.thinking == "on"


def check_lengths(model: Model, prompts: dict[str, list[int]], extra: int, what: str) -> None:
  """Refuses, before any work, a prompt that cannot fit the model's positions."""
  cap = model.cfg.max_position_embeddings
  for qid, ids in prompts.items():
    if len(ids) + extra > cap:
      raise ValueError(
          f"{what} prompt of question {qid!r} has {len(ids)} tokens; with {extra} generated "
          f"tokens it needs {len(ids) + extra} positions but {model.ref} has {cap} "
          "(max_position_embeddings): lower --max_new_tokens, or drop long questions from "
          "--data")


# ---------------------------------------------------------------------------------------
# Per-question results


def rollout_paths(tree, arrays) -> list[list[int]]:
  """For each rollout of the tree, its decision nodes root … parent(leaf) (one per token)."""
  out = []
  for leaf, _, _ in tree.rollouts:
    path, node = [], int(arrays.parent[leaf])
    while node >= 0:
      path.append(node)
      node = int(arrays.parent[node])
    out.append(path[::-1])
  return out


def node_table(cols: dict, arrays, paths, lengths) -> dict[str, np.ndarray]:
  """score_tree columns plus depth_norm, the edge's Q̂ interval and the children's Q̂."""
  ids = cols["node_id"]
  len_sum = np.zeros(arrays.num_nodes)
  len_cnt = np.zeros(arrays.num_nodes)
  for path, length in zip(paths, lengths):
    len_sum[path] += length
    len_cnt[path] += 1
  mean_len = np.where(len_cnt > 0, len_sum / np.maximum(len_cnt, 1), np.nan)
  table = dict(cols)
  table["depth_norm"] = arrays.depth[ids] / mean_len[ids]
  table["v_hat"] = np.where(arrays.trials[ids] > 0,
                            arrays.successes[ids] / np.maximum(arrays.trials[ids], 1), np.nan)
  q = arrays.q_hat
  kids = [arrays.children[arrays.child_start[u]:arrays.child_start[u] + arrays.child_count[u]]
          for u in ids]
  table["child_tokens"] = [arrays.token[k].tolist() for k in kids]
  table["child_q"] = [q[k].tolist() for k in kids]
  table["child_n"] = [arrays.trials[k].tolist() for k in kids]
  table["child_q_lo"] = [arrays.wilson_lo[k].tolist() for k in kids]
  table["child_q_hi"] = [arrays.wilson_hi[k].tolist() for k in kids]
  return table


def rollout_rows(cols: dict, arrays, paths, tree, num_onpolicy: int, directions,
                 model: Model) -> list[dict]:
  """One row per on-policy rollout: its path's informative-node aggregates (MATH.md)."""
  row_of = np.full(arrays.num_nodes, -1)
  row_of[cols["node_id"]] = np.arange(len(cols["node_id"]))
  rows = []
  for r in range(num_onpolicy):
    leaf, reward, _ = tree.rollouts[r]
    path = np.asarray(paths[r], np.int64)
    idx = row_of[path]
    info = cols["informative"][idx].astype(bool)
    tokens = [int(t) for t in tree.path(leaf)]
    length = len(tokens)
    sel = idx[info]
    row = dict(rollout=r, correct=bool(reward > 0.5), length=length, n_nodes=int(info.sum()),
               tokens=tokens, token_text=model.token_text(tokens),
               sum_gg=float(np.sum(cols["norm_ideal"][sel] ** 2)))
    for d in directions:
      a = cols[f"align_{d}"]
      row[f"mean_{d}"] = float(np.mean(a[sel])) if len(sel) else float("nan")
      row[f"sum_dot_{d}"] = float(np.sum(cols[f"dot_{d}"][sel]))
      row[f"sum_normprod_{d}"] = float(np.sum(cols["norm_ideal"][sel] * cols[f"norm_{d}"][sel]))
      row[f"sum_dd_{d}"] = float(np.sum(cols[f"norm_{d}"][sel] ** 2))
      row[f"n_pos_{d}"] = int(np.sum(a[sel] > 0))
      row[f"path_{d}"] = np.where(info, a[idx], np.nan).tolist()
    for c in COVARIATES:
      row[c] = float(np.mean(cols[c][sel])) if len(sel) else float("nan")
    depth = np.arange(length)[info]
    row["depth_norm"] = float(np.mean(depth / length)) if len(sel) else float("nan")
    rows.append(row)
  return rows


def write_part(out: str, student_tag: str, qid_index: int, tables: dict) -> None:
  """Writes one question's three tables as a directory, renamed into place at the end."""
  import pandas as pd

  final = part_dir(out, student_tag, qid_index)
  tmp = final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, rows in tables.items():
    pd.DataFrame(rows).to_parquet(os.path.join(tmp, f"{name}.parquet"))
  os.rename(tmp, final)


def part_dir(out: str, student_tag: str, index: int) -> str:
  return os.path.join(out, "parts", student_tag, f"q{index:06d}")


def student_tag(student: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in student)


# ---------------------------------------------------------------------------------------
# The run


def generate_summaries(cfg: SweepConfig, task, specs, student_name, models: Models, examples,
                       cache) -> dict[tuple[str, str], str]:
  """{(spec text, question id): summary}, generating (greedily) what the cache lacks."""
  from gradalign_jax import contexts, sampling

  out = {}
  for spec in specs:
    if spec.summarizer is None:
      continue
    writer = models.get(spec.summarizer, student_name)
    missing = [i for i, ex in enumerate(examples)
               if cache.get(writer.ref, ex, task.reference_response(ex)) is None]
    if missing:
      logging.info("%s: writing %d summaries with %s", spec.text, len(missing), writer.ref)
      prompts = [writer.encode(contexts.summary_prompt(task, writer.tok, examples[i]))
                 for i in missing]
      scfg = writer.sampling(cfg, cfg.summary_tokens, greedy=True)
      for lo in range(0, len(missing), cfg.question_batch):
        idx = missing[lo:lo + cfg.question_batch]
        ro = sampling.sample(writer.cfg, writer.params, prompts[lo:lo + len(idx)], scfg,
                             num_samples=1, seed=cfg.seed, question_ids=idx,
                             vocab_mask=writer.mask)
        for j, i in enumerate(idx):
          text = writer.tok.decode(ro.sequence(j), skip_special_tokens=True).strip()
          cache.put(writer.ref, examples[i], task.reference_response(examples[i]), text)
      cache.save()
    for ex in examples:
      out[(spec.text, ex.id)] = cache.get(writer.ref, ex, task.reference_response(ex))
  return out


def sample_demo_pools(cfg: SweepConfig, task, student: Model, prompts: list[list[int]], exs,
                      indices: list[int]) -> list:
  """The DemoPool of each question: ``cfg.demo_samples`` extra student rollouts, keyed by
  dataset index + DEMO_STREAM so they never coincide with the scored rollouts (which use the
  plain index), decoded and verified. prompts: the student's prompt ids, one per example."""
  from gradalign_jax import contexts, sampling

  n = cfg.demo_samples
  dro = sampling.sample(student.cfg, student.params, prompts, student.sampling(cfg),
                        num_samples=n, seed=cfg.seed,
                        question_ids=[DEMO_STREAM + i for i in indices], vocab_mask=student.mask)
  pools = []
  for j, ex in enumerate(exs):
    texts = [student.decode(dro.sequence(r)) for r in range(j * n, (j + 1) * n)]
    pools.append(contexts.DemoPool(tuple(texts), tuple(bool(task.verify(t, ex)) for t in texts)))
  return pools


def context_prompt(cfg: SweepConfig, task, spec, model: Model, example, think: bool, demos,
                   summary: str | None) -> tuple[list[int] | None, str]:
  """(prompt ids, "ok") of ``model`` reading the spec's context before ``example``, or
  (None, why) when the question cannot carry that context (contexts.ContextUnavailable).
  Refuses a prompt that leaves no room for ``cfg.max_new_tokens``."""
  from gradalign_jax import contexts

  try:
    text = contexts.teacher_prompt(spec, task, model.tok, example, think, demos, summary)
  except contexts.ContextUnavailable as e:
    return None, str(e)
  ids = model.encode(text)
  check_lengths(model, {example.id: ids}, cfg.max_new_tokens, f"teacher ({spec.text})")
  return ids, "ok"


def scoring_shapes(cfg: SweepConfig):
  """Padding for every scoring pass of the run, fixed by the settings (so results never
  depend on which questions came first): prompts padded to ≥ 64 tokens, and when the largest
  possible tree (every rollout distinct) fits 8192 cache slots, one cache size and full
  chunks, so each model compiles a few scoring programs in all rather than a few per tree
  size (on the toy models compilation is most of the run time)."""
  from gradalign_jax import scoring
  from gradalign_jax.shapes import bucket

  most = 256 + 1 + (cfg.num_rollouts + cfg.budget) * cfg.max_new_tokens
  if most <= 8192:
    return scoring.Shapes(min_prompt=64, min_capacity=bucket(most), full_chunks=True)
  return scoring.Shapes(min_prompt=64)


def run_batch(cfg: SweepConfig, task, specs, student: Model, teachers: dict, examples,
              indices: list[int], summaries) -> dict[int, dict]:
  """Every result of a fixed group of questions: {dataset index: {table: rows}}."""
  from gradalign_jax import sampling, scoring, targeted

  think = thinking(cfg, task)
  shapes = scoring_shapes(cfg)
  exs = [examples[i] for i in indices]
  g = cfg.num_rollouts
  scfg = student.sampling(cfg)
  prompts = [student.encode(task.prompt(student.tok, ex, enable_thinking=think)) for ex in exs]
  ro = sampling.sample(student.cfg, student.params, prompts, scfg, num_samples=g,
                       seed=cfg.seed, question_ids=indices, vocab_mask=student.mask)
  reward_fns = [lambda ids, ex=ex: float(task.verify(student.decode(ids), ex)) for ex in exs]
  pools = []
  for j in range(len(exs)):
    pool = targeted.RolloutPool()
    rows = list(range(j * g, (j + 1) * g))
    pool.add(ro, [reward_fns[j](tuple(ro.sequence(r))) for r in rows], rows)
    pools.append(pool)
  demo_pools = [None] * len(exs)
  if any(s.needs_rollout_demos for s in specs):
    demo_pools = sample_demo_pools(cfg, task, student, prompts, exs, indices)
  # Teacher prompts per spec and question (or why the context is unavailable).
  policies: dict[str, list] = {}
  status: dict[str, list[str]] = {}
  for spec in specs:
    model = teachers[spec.text]
    policies[spec.text], status[spec.text] = [], []
    for j, ex in enumerate(exs):
      ids, why = context_prompt(cfg, task, spec, model, ex, think, demo_pools[j],
                                summaries.get((spec.text, ex.id)))
      policies[spec.text].append(
          None if ids is None else scoring.Policy(model.cfg, model.params, ids, model.tok))
      status[spec.text].append(why)
  students = [scoring.Policy(student.cfg, student.params, p, student.tok) for p in prompts]
  # Targeted rollouts: each spec spends its share of the budget by its own priority.
  # Shares in whole multiples of M where possible, so that pairs get exactly M continuations
  # (one branch program) rather than remainders.
  m = cfg.num_continuations
  units, rest = divmod(cfg.budget, m)
  shares = [m * (units // len(specs) + (k < units % len(specs))) for k in range(len(specs))]
  shares[0] += rest
  for k, (spec, share) in enumerate(zip(specs, shares)):
    live = [j for j in range(len(exs)) if policies[spec.text][j] is not None]
    if share == 0 or not live:
      continue
    tcfg = targeted.TargetedConfig(budget=share, num_continuations=cfg.num_continuations,
                                   priority=cfg.priority, jsd_beta=cfg.jsd_beta)
    targeted.targeted_rollouts([pools[j] for j in live], [students[j] for j in live],
                               [policies[spec.text][j] for j in live], tcfg,
                               [reward_fns[j] for j in live], student.mask, cfg.temperature,
                               seed=cfg.seed * 7919 + k, chunk_nodes=cfg.chunk_nodes,
                               shapes=shapes)
  # The final pass: every spec scored on the refreshed tree.
  results = {}
  for j, (i, ex) in enumerate(zip(indices, exs)):
    tree = pools[j].tree
    arrays = tree.arrays()
    paths = rollout_paths(tree, arrays)
    lengths = [len(p) for p in paths]
    tables = {"nodes": [], "rollouts": [], "questions": []}
    n_correct = int(sum(tree.rollouts[r][1] > 0.5 for r in range(g)))
    for spec in specs:
      key = dict(student=None, spec=spec.text, question_id=ex.id)
      policy = policies[spec.text][j]
      qrow = dict(key, question_index=i, n_rollouts=g, n_correct=n_correct,
                  accuracy=n_correct / g, context=status[spec.text][j],
                  prompt_tokens=0 if policy is None else len(policy.prompt),
                  context_tokens=0 if policy is None else len(policy.prompt) - len(prompts[j]),
                  targeted=len(tree.rollouts) - g, n_nodes=0, n_informative=0)
      if policy is None:
        qrow.update({f"mean_{d}": float("nan") for d in cfg.directions})
        tables["questions"].append(qrow)
        continue
      cols, _ = scoring.score_tree(tree, students[j], policy, cfg.chunk_nodes, student.mask,
                                   cfg.jsd_beta, cfg.topk, cfg.temperature, shapes)
      info = cols["informative"].astype(bool)
      qrow.update(n_nodes=len(info), n_informative=int(info.sum()))
      qrow.update({f"mean_{d}": float(np.mean(cols[f"align_{d}"][info])) if info.any()
                   else float("nan") for d in cfg.directions})
      tables["questions"].append(qrow)
      nt = node_table(cols, arrays, paths, lengths)
      keep = [c for c in nt if not any(c == f"{p}_{d}" for p in ("align", "dot", "norm")
                                       for d in DIRECTIONS if d not in cfg.directions)]
      for u in range(len(nt["node_id"])):
        tables["nodes"].append(dict(key, **{c: _py(nt[c][u]) for c in keep}))
      for row in rollout_rows(cols, arrays, paths, tree, g, cfg.directions, student):
        tables["rollouts"].append(dict(key, **row))
    results[i] = tables
  return results


def _py(x):
  return x.item() if isinstance(x, np.generic) else x


def save_config(cfg: SweepConfig, out: str) -> None:
  """Writes config.json, or checks that a resumed run asks for the same thing."""
  path = os.path.join(out, "config.json")
  mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
  if os.path.exists(path):
    with open(path) as f:
      theirs = json.load(f)
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
      raise ValueError(
          f"{out} holds a run with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
          "pass the same flags to resume it, another --out, or --overwrite to start over")
    return
  os.makedirs(out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(mine, f, indent=1)


def run(cfg: SweepConfig, out: str, *, overwrite: bool = False, stop_after: int | None = None):
  """Runs (or resumes) the sweep into ``out`` and writes the tables and the report.

  stop_after: stop after this many question groups of this call (tests simulate an
  interruption with it). Returns the summary dict, or None when stopped early.
  """
  from gradalign_jax import contexts, scoring, tasks

  if overwrite:
    shutil.rmtree(out, ignore_errors=True)
  specs = contexts.parse_specs(cfg.teachers)
  task = tasks.get_task(cfg.task)
  examples = task.load(cfg.data, limit=cfg.num_questions)
  if not examples:
    raise ValueError(f"--data={cfg.data!r} gave no questions")
  save_config(cfg, out)
  models = Models(cfg.dtype)
  cache = contexts.SummaryCache(os.path.join(out, "summaries.json"))
  start, groups_done = time.time(), 0
  for name in cfg.students:
    student = models.get(name, name)
    teachers = {}
    for spec in specs:
      teachers[spec.text] = student if spec.is_self else models.get(spec.model, name)
      scoring.check_compatible(student.cfg, teachers[spec.text].cfg, student.tok,
                               teachers[spec.text].tok)
    think = thinking(cfg, task)
    check_lengths(student, {ex.id: student.encode(task.prompt(student.tok, ex,
                                                               enable_thinking=think))
                            for ex in examples}, cfg.max_new_tokens, "student")
    tag = student_tag(name)
    groups = [list(range(lo, min(lo + cfg.question_batch, len(examples))))
              for lo in range(0, len(examples), cfg.question_batch)]
    todo = [grp for grp in groups
            if not all(os.path.isdir(part_dir(out, tag, i)) for i in grp)]
    if len(todo) < len(groups):
      logging.info("%s: %d of %d question groups already done in %s; resuming", name,
                   len(groups) - len(todo), len(groups), out)
    if not todo:
      continue
    summaries = generate_summaries(cfg, task, specs, name, models, examples, cache)
    for n, grp in enumerate(todo):
      if stop_after is not None and groups_done >= stop_after:
        return None
      t0 = time.time()
      results = run_batch(cfg, task, specs, student, teachers, examples, grp, summaries)
      for i, tables in results.items():
        if os.path.isdir(part_dir(out, tag, i)):
          continue
        for rows in tables.values():
          for row in rows:
            row["student"] = name
        write_part(out, tag, i, tables)
      groups_done += 1
      left = len(todo) - n - 1
      bar = "#" * (20 * (n + 1) // len(todo))
      logging.info("%s [%-20s] questions %d–%d done (group %d/%d in %.1f s; %.0f s elapsed, "
                   "~%.0f s left for this student)", name, bar, grp[0], grp[-1], n + 1,
                   len(todo), time.time() - t0, time.time() - start,
                   left * (time.time() - t0))
  return finish(cfg, out, examples, time.time() - start)


def load_tables(cfg: SweepConfig, out: str, num_examples: int):
  """The three tables concatenated from every finished part, in a fixed order."""
  import pandas as pd

  tables = {"nodes": [], "rollouts": [], "questions": []}
  for name in cfg.students:
    for i in range(num_examples):
      d = part_dir(out, student_tag(name), i)
      for t in tables:
        tables[t].append(pd.read_parquet(os.path.join(d, f"{t}.parquet")))
  return {t: pd.concat(v, ignore_index=True) for t, v in tables.items()}


def finish(cfg: SweepConfig, out: str, examples, seconds: float) -> dict:
  """Writes the tables, summary.json, report.md, the plots and the token view."""
  from experiments.files import save_figure, write_text
  from gradalign_jax.analysis import plots, report, token_view

  tables = load_tables(cfg, out, len(examples))
  for name, df in tables.items():
    df.to_parquet(os.path.join(out, f"{name}.parquet"))
  flat = [c for c in tables["rollouts"].columns if not c.startswith("path_")
          and c not in ("tokens", "token_text")]
  tables["rollouts"][flat].to_csv(os.path.join(out, "rollouts.csv"), index=False)
  tables["questions"].to_csv(os.path.join(out, "questions.csv"), index=False)
  config = dict(dataclasses.asdict(cfg), num_questions_loaded=len(examples), seconds=seconds)
  summary = report.summarize(tables["rollouts"], tables["questions"], tables["nodes"],
                             list(cfg.directions), config)
  with open(os.path.join(out, "summary.json"), "w") as f:
    f.write(report.to_json(summary))
  primary = cfg.directions[0]
  figures = {"correct_vs_incorrect.png": plots.plot_correct_vs_incorrect(summary),
             "by_depth.png": plots.plot_alignment_by_depth(tables["nodes"], primary),
             "directions.png": plots.plot_directions(summary),
             "covariates.png": plots.plot_covariates(tables["nodes"], primary)}
  for name, fig in figures.items():
    save_figure(fig, os.path.join(out, name))
  write_text(os.path.join(out, "report.md"), report.render(summary, list(figures)))
  write_text(os.path.join(out, "tokens.html"), token_view.render(tables["rollouts"], primary))
  logging.info("wrote %s (report.md, summary.json, tables, plots, tokens.html)", out)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
  from gradalign_jax import contexts

  try:
    cfg = SweepConfig.from_flags()
    run(cfg, FLAGS.out, overwrite=FLAGS.overwrite)
  except (contexts.SpecError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  print(f"report: {os.path.join(FLAGS.out, 'report.md')}")


if __name__ == "__main__":
  app.run(main)
