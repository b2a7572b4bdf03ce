"""The arithmetic of one question at real sizes: FLOPs, bytes moved and resident memory per
stage, and what bounds each stage on one H100 and on a TPU v5e-8 (no measurement: counts).

    PYTHONPATH=. python benchmarks/arithmetic.py

Qwen3-1.7B student, Qwen3-8B teacher (their config.json shapes), bf16 weights and KV, fp32
logits; G rollouts of L generated tokens each (every rollout runs to the horizon: an upper
bound) with no shared prefix beyond the prompt (the tree has G·L nodes: the worst case for
scoring); the student's prompt P_s tokens, the teacher's P_t (privileged context + question);
a targeted budget of T rollouts branched at mid depth (L/2 new tokens each); scoring chunks of
C nodes. A stage's time is at least max(FLOPs / peak FLOP/s, bytes / memory bandwidth); the
larger term names what bounds it. The TPU v5e-8 figures assume the 8 chips split every
matmul and the KV evenly (tensor parallel over the 8 KV heads), communication ignored.

The second table lays one node out for many questions (``LAYOUTS``): a mesh of ``data`` ×
``model`` devices, each question group on ``model`` devices that split both models' weights
and every stage's working memory evenly, ``data`` groups at once; both models stay resident
(the pipeline keeps them loaded). Per device: weights + the largest stage's working memory,
against its HBM; per question: the stage sum on ``model`` devices; per node and hour:
``data`` × 3600 / that.
"""

from __future__ import annotations

import argparse

from gradalign_jax import models

STUDENT = models.Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                             num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                             tie_word_embeddings=True, dtype="bfloat16")
TEACHER = models.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                             num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                             tie_word_embeddings=False, dtype="bfloat16")
HARDWARE = {  # name → (bf16 dense FLOP/s, HBM bytes/s, HBM bytes)
    "H100 SXM": (989e12, 3.35e12, 80e9),
    "TPU v5e-8": (8 * 197e12, 8 * 819e9, 8 * 16e9),
}
CHIPS = {  # one device: (bf16 dense FLOP/s, HBM bytes/s, HBM bytes)
    "H100 SXM": (989e12, 3.35e12, 80e9),
    "TPU v5e": (197e12, 819e9, 16e9),
}
LAYOUTS = (  # (node, device, data axis, model axis)
    ("TPU v5e-8", "TPU v5e", 1, 8),
    ("TPU v5e-8", "TPU v5e", 2, 4),
    ("8×H100", "H100 SXM", 8, 1),
)
FINAL_PASS_SWEEPS = 24  # f32 passes over [C, V] in the final pass (softmaxes, directions, top-k)


def kv_bytes(cfg) -> int:
  """Bytes of one token's keys and values over every layer (bf16)."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


def attn_flops(cfg, queries: float, context: float) -> float:
  """q·k and p·v for ``queries`` tokens each attending ``context`` slots."""
  return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * queries * context


def weight_flops(cfg, tokens: float) -> float:
  """Matmul FLOPs of the projections, MLP and LM head (the embedding lookup is free)."""
  return 2.0 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (
      0 if cfg.tie_word_embeddings else 1)) * tokens


def stages(g, length, p_s, p_t, budget, m, chunk, sources=None):
  s, t = STUDENT, TEACHER
  w_s, w_t = 2 * s.num_params(), 2 * t.num_params()  # bf16 weight bytes
  u = g * length  # tree nodes (no sharing)
  out = []
  # 1. sample: prefill P_s once, then L decode steps of G rows; each step reads the weights,
  # the prompt's KV once (shared by the G rows) and every row's written KV (staged decode).
  ctx = g * (p_s * length + length * length / 2)  # Σ over rows and steps of the live context
  read = p_s * length + g * length * length / 2
  out.append(dict(stage="sample (student, G rows × L steps)",
                  flops=weight_flops(s, p_s + u) + attn_flops(s, 1, ctx),
                  bytes=length * w_s + kv_bytes(s) * read,
                  resident=w_s + g * (p_s + length) * kv_bytes(s), weights=w_s))
  # 2. tree scoring, both models: U nodes in chunks of C, each attending P + L + C slots (the
  # stack of ancestors); per chunk the weights and the stack are read once.
  chunks = u / chunk
  for name, cfg, w, p in (("student", s, w_s, p_s), ("teacher", t, w_t, p_t)):
    out.append(dict(stage=f"score tree ({name} logits)",
                    flops=weight_flops(cfg, p + u) + attn_flops(cfg, u, p + length + chunk),
                    bytes=chunks * (w + (p + length + chunk) * kv_bytes(cfg))
                    + u * cfg.vocab_size * 4,
                    resident=w + (p + length + chunk) * kv_bytes(cfg) + chunk * cfg.vocab_size * 4,
                    weights=w))
  # 3. final pass: elementwise over [U, V] f32 in chunks (memory-bound by construction).
  out.append(dict(stage="final pass (every direction, covariates)",
                  flops=FINAL_PASS_SWEEPS * 4.0 * u * s.vocab_size,
                  bytes=FINAL_PASS_SWEEPS * 4.0 * u * s.vocab_size,
                  resident=FINAL_PASS_SWEEPS * 4.0 * chunk * s.vocab_size, weights=0))
  # 4. targeted: T rows (T/M requests of M rows) decode L/2 tokens each after a prefix of
  # P_s + L/2, copied once per distinct source row (``sources``, default one per request:
  # the worst case) and read once per step by all the rows on it.
  half, requests = length / 2, budget / m
  sources = requests if sources is None else min(sources, requests)
  ctx_t = budget * ((p_s + half) * half + half * half / 2)
  read_t = sources * (p_s + half) * half + budget * half * half / 2
  out.append(dict(stage=f"targeted ({budget} rollouts × L/2, M = {m})",
                  flops=weight_flops(s, budget * half) + attn_flops(s, 1, ctx_t),
                  bytes=half * w_s + kv_bytes(s) * read_t,
                  resident=w_s + (sources * (p_s + length) + budget * half) * kv_bytes(s),
                  weights=w_s))
  return out


def layout(rows, chip: str, data: int, model: int) -> dict:
  """One node's layout for many questions: GB per device, whether it fits, seconds per
  question on ``model`` devices (lower bound) and questions per node-hour."""
  flops, bw, hbm = CHIPS[chip]
  weights = 2 * (STUDENT.num_params() + TEACHER.num_params()) / model
  working = max(r["resident"] - r["weights"] for r in rows) / model
  seconds = sum(max(r["flops"] / (model * flops), r["bytes"] / (model * bw)) for r in rows)
  return dict(weights=weights, working=working, fits=weights + working <= hbm, hbm=hbm,
              seconds=seconds, per_hour=data * 3600 / seconds)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--g", type=int, default=32)
  ap.add_argument("--length", type=int, default=4096)
  ap.add_argument("--student_prompt", type=int, default=256)
  ap.add_argument("--teacher_prompt", type=int, default=1024)
  ap.add_argument("--budget", type=int, default=64)
  ap.add_argument("--continuations", type=int, default=4, help="M rows per targeted request")
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--sources", type=int, default=None,
                  help="distinct source rollouts of the targeted requests (default: one per "
                       "request, the worst case; requests on one source share its KV)")
  a = ap.parse_args()
  rows = stages(a.g, a.length, a.student_prompt, a.teacher_prompt, a.budget, a.continuations,
                a.chunk, a.sources)
  hw = list(HARDWARE)
  print(f"student {STUDENT.num_params() / 1e9:.2f}B params, "
        f"teacher {TEACHER.num_params() / 1e9:.2f}B;"
        f" KV per token {kv_bytes(STUDENT) / 1024:.0f} KiB / {kv_bytes(TEACHER) / 1024:.0f} KiB; "
        f"G = {a.g}, L = {a.length}, tree nodes {a.g * a.length:,}")
  print("| stage | TFLOP | GB moved | GB resident | "
        + " | ".join(f"{h}: s (bound)" for h in hw) + " |")
  print("|---|---:|---:|---:|" + "---:|" * len(hw))
  totals = {h: 0.0 for h in hw}
  for r in rows:
    cells = []
    for h in hw:
      flops, bw, _ = HARDWARE[h]
      tc, tm = r["flops"] / flops, r["bytes"] / bw
      totals[h] += max(tc, tm)
      cells.append(f"{max(tc, tm):.2f} ({'compute' if tc >= tm else 'memory'})")
    print(f"| {r['stage']} | {r['flops'] / 1e12:,.1f} | {r['bytes'] / 1e9:,.0f} | "
          f"{r['resident'] / 1e9:.1f} | " + " | ".join(cells) + " |")
  print("| total (lower bound) | | | | " + " | ".join(f"{totals[h]:.1f}" for h in hw) + " |")
  print()
  print("| node | mesh (data × model) | a question on | GB per device: weights + working "
        "(HBM) | s per question (lower bound) | questions per node-hour |")
  print("|---|---|---|---|---:|---:|")
  for node, chip, data, model in LAYOUTS:
    r = layout(rows, chip, data, model)
    print(f"| {node} | data={data} × model={model} | {model} {chip} | "
          f"{r['weights'] / 1e9:.1f} + {r['working'] / 1e9:.1f} = "
          f"{(r['weights'] + r['working']) / 1e9:.1f} ({r['hbm'] / 1e9:.0f}"
          f"{'' if r['fits'] else ', does not fit'}) | {r['seconds']:.1f} | "
          f"{r['per_hour']:,.0f} |")
  for chip, (_, _, hbm) in CHIPS.items():
    if 2 * TEACHER.num_params() > hbm:
      print(f"\nThe teacher's bf16 weights ({2 * TEACHER.num_params() / 1e9:.1f} GB) exceed one "
            f"{chip}'s {hbm / 1e9:.0f} GB: a mesh with model ≥ 2 is needed there.")


if __name__ == "__main__":
  main()
