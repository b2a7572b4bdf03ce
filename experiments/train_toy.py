"""Trains the bundled toy models on the synthetic task and saves them in Hugging Face layout.

Three Qwen3 models of different sizes learn chains of arithmetic mod 10
(``gradalign_jax/tasks/synthetic.py``): two students, meant to be right 30–80% of the time
when sampled at T=1 so that both correct and incorrect rollouts are plentiful, and a larger
teacher that is clearly better. Some training prompts carry a demonstration as an earlier
chat turn (the same question solved correctly, the same question solved wrongly, or another
question), so the models learn to use in-context demonstrations, which is what privileged
teacher contexts give them.

Training stops early once the mean probability a model gives the reference solution (a lower
bound on its sampled accuracy) reaches its cap in ``MODELS``: low for the students, so they
stay imperfect, high for the teacher. A second phase on prompts with contexts then teaches
every model to read them (``CONTEXT_PHASE``).

  python -m experiments.train_toy --out=assets/toy
"""

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags, logging

flags.DEFINE_string("out", "assets/toy", "where the three checkpoints and the tokenizer go")
flags.DEFINE_list("models", ["student_small", "student_large", "teacher"], "which to train")
flags.DEFINE_integer("batch", 64, "sequences per step")
flags.DEFINE_integer("seed", 0, "data and init seed")
flags.DEFINE_integer("incontext_steps", 400, "students: most steps of the second phase, "
                     "on prompts with contexts")
flags.DEFINE_integer("teacher_incontext_steps", 400, "teacher: most steps of its second "
                     "phase, mostly on prompts with contexts")
flags.DEFINE_bool("continue_saved", False, "start from the checkpoints already in --out (skip "
                  "phase 1 where one exists)")
flags.DEFINE_integer("eval_every", 20, "steps between evaluations (learning is abrupt: a "
                     "student can go from 0.2 to 0.85 reference probability in 200 steps)")
FLAGS = flags.FLAGS

# Batches of one kind each, so that lengths bucket well (attention cost grows with length²):
# kind: (padded length, share of batches).
BATCH_KINDS = {
    "plain": (80, 0.45),       # the question alone
    "demo": (144, 0.25),       # one earlier turn: a solution, a wrong solution, or a summary
    "demo2": (208, 0.15),      # the same question solved correctly and wrongly, in either order
    "summarize": (96, 0.15),   # "summarize\n<solution>" → the summary (self:summary contexts)
}

# name: (architecture, max steps, peak learning rate, stop once p_reference ≥ this)
MODELS = {
    "student_small": (dict(hidden_size=48, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=12), 1500, 3e-3, 0.35),
    "student_large": (dict(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4,
                           num_kv_heads=2, head_dim=24), 1500, 3e-3, 0.55),
    "teacher": (dict(hidden_size=128, intermediate_size=320, num_layers=3, num_heads=8,
                     num_kv_heads=4, head_dim=16), 1000, 2e-3, 0.9),
}
# The second phase (see train_one), name: (share of each batch kind, plain p_reference band
# within which the params that read a demonstration best are kept). Prompts with contexts
# only: with plain prompts mixed in, the models improved at the task instead (the teacher with
# a quarter plain batches: plain 0.68 → 0.87, with a demonstration 0.48 → 0.76 in 220 steps).
# The students must stay imperfect; the teacher (whose phase 1 left it worse with a
# demonstration than without, 0.68 → 0.48) must stay clearly better than the students.
CONTEXT_PHASE = {
    "student_small": ({"demo": 0.5, "demo2": 0.25, "summarize": 0.25}, (0.175, 0.5)),
    "student_large": ({"demo": 0.5, "demo2": 0.25, "summarize": 0.25}, (0.275, 0.7)),
    "teacher": ({"demo": 0.5, "demo2": 0.25, "summarize": 0.25}, (0.6, 0.85)),
}
VOCAB_SIZE = 64  # padded past the tokenizer's ids, as real Qwen3 pads its vocabulary


def training_text(task, tok, kind, ex, other, rng):
  """(prompt, target) of one example for a batch of ``kind`` (see BATCH_KINDS).

  A "demo" prompt shows one earlier turn: the same question solved (35%), solved wrongly and
  marked so (15%), a summary of its solution (25%), or another question solved (25%).
  """
  from gradalign_jax.tasks import synthetic

  if kind == "plain":
    return task.prompt(tok, ex), ex.solution
  if kind == "summarize":
    text = ex.solution if rng.random() < 0.8 else synthetic.wrong_solution(ex, rng)
    return (models_chat(tok, task.summary_request(text)), synthetic.summarize(text))
  right = task.context_turn(ex, "correct", ex.solution)
  wrong = task.context_turn(ex, "incorrect", synthetic.wrong_solution(ex, rng))
  if kind == "demo2":
    demos = [right, wrong] if rng.random() < 0.5 else [wrong, right]
  else:
    r = rng.random()
    demos = [right if r < 0.35 else wrong if r < 0.5 else
             task.context_turn(ex, "summary", synthetic.summarize(ex.solution)) if r < 0.75 else
             task.context_turn(other, "correct", other.solution)]
  return task.prompt(tok, ex, demonstration=demos), ex.solution


def models_chat(tok, user):
  from gradalign_jax import models
  return models.chat_prompt(tok, user, enable_thinking=False)


def make_batch(task, tok, rng, batch, shares=None):
  """tokens int32[B, L] (right-padded) and a loss mask over target tokens. shares: {kind:
  probability} of the batch kinds (default BATCH_KINDS' shares)."""
  from gradalign_jax.tasks import synthetic

  shares = shares or {k: share for k, (_, share) in BATCH_KINDS.items()}
  kinds = list(shares)
  kind = kinds[rng.choice(len(kinds), p=[shares[k] for k in kinds])]
  length = BATCH_KINDS[kind][0]
  exs = [synthetic.make_example(rng, int(rng.integers(task.min_steps, task.max_steps + 1)), "")
         for _ in range(2 * batch)]
  tokens = np.full((batch, length), tok.pad_token_id, np.int32)
  mask = np.zeros((batch, length), np.float32)
  for i in range(batch):
    prompt, target = training_text(task, tok, kind, exs[i], exs[batch + i], rng)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    seq = p + t
    if len(seq) > length:
      raise AssertionError(f"{kind} training sequence of {len(seq)} tokens exceeds its "
                           f"{length} bucket")
    tokens[i, :len(seq)] = seq
    mask[i, len(p):len(seq)] = 1.0
  return tokens, mask


def reference_probability(cfg, params, task, tok, examples, with_demo=False):
  """Mean over examples of P(reference solution + EOS | prompt) under the model (T=1); with
  ``with_demo`` the prompt first shows the same question solved (``self:correct_demo``)."""
  import jax
  import jax.numpy as jnp

  from gradalign_jax import models

  length = BATCH_KINDS["demo" if with_demo else "plain"][0]
  tokens = np.full((len(examples), length), tok.pad_token_id, np.int32)
  target = np.zeros((len(examples), length), bool)  # positions whose next token is scored
  for i, ex in enumerate(examples):
    demo = [task.context_turn(ex, "correct", ex.solution)] if with_demo else None
    p = tok(task.prompt(tok, ex, demonstration=demo), add_special_tokens=False)["input_ids"]
    t = tok(ex.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tokens[i, :len(p) + len(t)] = p + t
    target[i, len(p) - 1:len(p) + len(t) - 1] = True
  logp = jax.nn.log_softmax(models.forward(cfg, params, jnp.asarray(tokens)), axis=-1)
  next_logp = jnp.take_along_axis(logp[:, :-1], jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  seq_logp = jnp.sum(jnp.where(jnp.asarray(target[:, :-1]), next_logp, 0.0), axis=1)
  return float(jnp.mean(jnp.exp(seq_logp)))


def _trainer(cfg, opt):
  import jax
  import jax.numpy as jnp
  import optax

  from gradalign_jax.models import qwen3

  def loss_fn(params, tokens, mask):
    logits = qwen3.bind(cfg, params)(tokens[:, :-1])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  @jax.jit
  def step(params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train_one(name, task, tok, out_dir):
  """Phase 1: the full mixture until the reference probability reaches the model's cap.
  Phase 2 (``--incontext_steps`` for the students, ``--teacher_incontext_steps`` for the
  teacher): mostly prompts with contexts (demonstrations, summaries; ``CONTEXT_PHASE``) at a
  fifth of the learning rate, so the model learns to use them; the params kept are those that
  read a demonstration best while the plain reference probability stays in the model's
  band."""
  import jax
  import optax

  from gradalign_jax import models
  from gradalign_jax.models import checkpoint, qwen3

  arch, steps, lr, cap = MODELS[name]
  path = os.path.join(out_dir, name)
  held_out = task.generate(32, seed=10_000 + FLAGS.seed)
  rng = np.random.default_rng([FLAGS.seed, sum(map(ord, name))])
  t0, history = time.perf_counter(), []

  def evaluate(phase, i, loss):
    rec = {"phase": phase, "step": i, "loss": float(loss),
           "p_reference": reference_probability(cfg, params, task, tok, held_out),
           "p_reference_with_demo": reference_probability(cfg, params, task, tok, held_out,
                                                          with_demo=True),
           "seconds": time.perf_counter() - t0}
    history.append(rec)
    logging.info("%s %s step %d loss %.4f p_ref %.3f with demo %.3f (%.0fs)", name, phase, i,
                 rec["loss"], rec["p_reference"], rec["p_reference_with_demo"], rec["seconds"])
    return rec

  if FLAGS.continue_saved and os.path.exists(os.path.join(path, "model.safetensors")):
    cfg, params = models.load_pretrained(path)
    with open(os.path.join(path, "training.json")) as f:
      history = [h for h in json.load(f)["history"] if h.get("phase", "mixture") == "mixture"]
    logging.info("%s: continuing from %s (phase 1 done: %s)", name, path, history[-1])
  else:
    cfg = qwen3.Qwen3Config(vocab_size=VOCAB_SIZE, rope_theta=10_000.0,
                            max_position_embeddings=512, **arch)
    params = qwen3.init_params(cfg, seed=FLAGS.seed)
    warmup = min(100, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                  lr * 0.05)
    opt = optax.adamw(schedule, weight_decay=0.01)
    opt_state, step = opt.init(params), _trainer(cfg, opt)
    for i in range(1, steps + 1):
      tokens, mask = make_batch(task, tok, rng, FLAGS.batch)
      params, opt_state, loss = step(params, opt_state, tokens, mask)
      if i % FLAGS.eval_every == 0 or i == steps:
        if evaluate("mixture", i, loss)["p_reference"] >= cap:
          break
  shares, (low, high) = CONTEXT_PHASE[name]
  context_steps = FLAGS.teacher_incontext_steps if name == "teacher" else FLAGS.incontext_steps
  if context_steps > 0:
    # Keep the evaluated params that read demonstrations best while the plain reference
    # probability stays within the model's band.
    opt = optax.adamw(lr / 5, weight_decay=0.01)
    opt_state, step = opt.init(params), _trainer(cfg, opt)
    # The phase's data stream restarts from the seed, so a run from scratch and a
    # --continue_saved run from the same phase-1 checkpoint see the same batches.
    rng = np.random.default_rng([FLAGS.seed, sum(map(ord, name))])
    best, best_demo = params, -1.0
    for i in range(1, context_steps + 1):
      tokens, mask = make_batch(task, tok, rng, FLAGS.batch, shares)
      params, opt_state, loss = step(params, opt_state, tokens, mask)
      if i % FLAGS.eval_every == 0 or i == context_steps:
        rec = evaluate("contexts", i, loss)
        if low <= rec["p_reference"] <= high and rec["p_reference_with_demo"] > best_demo:
          best, best_demo = params, rec["p_reference_with_demo"]
          history[-1]["kept"] = True
        if rec["p_reference"] > high or rec["p_reference_with_demo"] >= 0.95:
          break
    params = best
  checkpoint.save_pretrained(cfg, jax.device_get(params), path, extra_config={
      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
  from gradalign_jax.tasks import synthetic
  synthetic.write_tokenizer(path)
  final = evaluate("final", 0, float("nan"))
  with open(os.path.join(path, "training.json"), "w") as f:
    json.dump({"model": name, "params": cfg.num_params(), "config": dataclasses.asdict(cfg),
               "batch": FLAGS.batch, "seed": FLAGS.seed, "history": history}, f, indent=2)
  return final


def main(argv):
  del argv
  from gradalign_jax import compilation, models
  from gradalign_jax.tasks import synthetic

  compilation.enable()  # a rerun skips compiles

  tok_dir = synthetic.write_tokenizer(os.path.join(FLAGS.out, "tokenizer"))
  tok = models.load_tokenizer(tok_dir)
  if len(tok) > VOCAB_SIZE:
    raise SystemExit(f"tokenizer has {len(tok)} ids > VOCAB_SIZE={VOCAB_SIZE}")
  task = synthetic.SyntheticTask()
  for name in FLAGS.models:
    if name not in MODELS:
      raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    last = train_one(name, task, tok, FLAGS.out)
    print(f"{name}: {last}")


if __name__ == "__main__":
  app.run(main)
