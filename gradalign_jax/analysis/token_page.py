"""The token explorer's page: HTML, CSS and script, with ``__DATA__`` (token_view.page_data's
JSON) and ``__DIRECTION__`` to fill in. No external resource: it opens from disk offline.
Data reach the DOM as text only (``textContent``), never as markup."""

PAGE = r"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Token explorer (__DIRECTION__)</title>
<style>
body { font-family: sans-serif; margin: 0; font-size: 14px; }
header { position: sticky; top: 0; background: #f4f4f4; border-bottom: 1px solid #ccc;
         padding: 0.5em 1em; z-index: 1; }
header label { margin-right: 0.8em; white-space: nowrap; }
select, input { font-size: 13px; }
#qinfo, .legend { font-size: 12.5px; color: #333; margin-top: 0.35em; }
main { display: flex; gap: 1em; padding: 0 1em; }
#rollouts { flex: 3; min-width: 0; }
#details { flex: 2; min-width: 22em; position: sticky; top: 7.5em; align-self: flex-start;
           max-height: calc(100vh - 8.5em); overflow: auto; font-size: 12.5px;
           border-left: 1px solid #ccc; padding-left: 1em; }
.rollout { margin: 0.6em 0 1em; }
.meta { font-size: 12px; color: #444; }
.pair { display: grid; gap: 0.6em; }
.toks { font-family: monospace; white-space: pre-wrap; line-height: 1.6; padding: 0.35em;
        border-left: 4px solid #999; }
.correct .toks { border-left-color: #1b7837; }
.incorrect .toks { border-left-color: #c51b7d; }
.tok { border-radius: 2px; cursor: pointer; }
.tok.sel { outline: 2px solid #000; }
.nl { color: #999; }
.colhead { font-size: 11.5px; color: #555; }
table { border-collapse: collapse; margin: 0.3em 0 0.8em; }
td, th { border: 1px solid #ddd; padding: 1px 5px; white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
td.t { text-align: left; font-family: monospace; white-space: pre; }
h3 { margin: 0.6em 0 0.2em; font-size: 13.5px; }
.note { color: #666; }
</style></head><body>
<header>
<div>
<label>Student <select id="student"></select></label>
<label>Question <select id="question"></select></label>
<label>Spec A <select id="specA"></select></label>
<label>Spec B <select id="specB"></select></label>
</div><div style="margin-top:0.3em">
<label>Show <select id="show"><option value="all">all</option><option value="correct">correct</option>
<option value="incorrect">incorrect</option></select></label>
<label>Sort <select id="sort"><option value="rollout">rollout</option>
<option value="len_up">length ↑</option><option value="len_down">length ↓</option>
<option value="score_up">score A ↑</option><option value="score_down">score A ↓</option></select></label>
<label>Length from <input id="minlen" type="number" min="0" style="width:4.5em"></label>
<label>to <input id="maxlen" type="number" min="0" style="width:4.5em"></label>
</div>
<div id="qinfo"></div>
<div class="legend">Leave-one-out cos(ĝ*, d) of __DIRECTION__ at each token's decision node:
<span class="tok" style="background:rgba(33,102,172,1)">&nbsp;+1&nbsp;</span>
<span class="tok" style="background:rgba(33,102,172,0.3)">&nbsp;+0.3&nbsp;</span>
<span class="tok" style="background:rgba(178,24,43,0.3)">&nbsp;−0.3&nbsp;</span>
<span class="tok" style="background:rgba(178,24,43,1)">&nbsp;−1&nbsp;</span>
<span class="tok" style="background:rgba(160,160,160,0.35)">&nbsp;not informative&nbsp;</span>
· click a token for its node.</div>
</header>
<main><div id="rollouts"></div><div id="details"><p class="note">Click a token.</p></div></main>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const S = D.strings, F = {}, G = {};
D.fields.shared.forEach((f, i) => F[f] = i);
D.fields.spec.forEach((f, i) => G[f] = i);
const $ = id => document.getElementById(id);
const st = {sel: null};

function fmt(x) {
  if (x === null || x === undefined) return "n/a";
  return Number.isInteger(x) ? String(x) : Number(x).toPrecision(4);
}
function shown(text) { return text.replace(/\n/g, "↵\n"); }
function colour(c) {
  if (c === null || c === undefined) return "rgba(160,160,160,0.35)";
  const a = Math.min(Math.abs(c) / 1000, 1).toFixed(3);
  return c >= 0 ? `rgba(33,102,172,${a})` : `rgba(178,24,43,${a})`;
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
function options(select, values, labels, keep) {
  select.replaceChildren(...values.map((v, i) => el("option", {value: v, text: labels[i]})));
  if (values.includes(keep)) select.value = keep;
}
const student = () => D.students[$("student").value];
const question = () => student().questions[Number($("question").value)];
const specs = () => [$("specA").value, $("specB").value].filter(s => s);

function fillStudent() {
  const s = student();
  options($("specA"), s.specs, s.specs, $("specA").value || s.specs[0]);
  const b = $("specB").value || (s.specs.length > 1 ? s.specs[1] : "");
  options($("specB"), [""].concat(s.specs), ["(none)"].concat(s.specs), b);
  fillQuestions(0);
}
function fillQuestions(keep) {
  const s = student(), a = $("specA").value, b = $("specB").value;
  const label = q => `${q.id} · acc ${fmt(q.accuracy)} · Δ_q ${fmt(q.delta[a])}` +
                     (b ? ` / ${fmt(q.delta[b])}` : "");
  options($("question"), s.questions.map((_, i) => String(i)), s.questions.map(label),
          String(keep));
  draw();
}

function drawInfo(q) {
  const s = student(), parts = [];
  const nc = q.rollouts.filter(r => r[1]).length;
  parts.push(`${q.id}: accuracy ${fmt(q.accuracy)} (${nc}/${q.rollouts.length} correct)`);
  for (const spec of specs()) {
    const t = s.tests[spec] || [];
    const ctx = q.context[spec] && q.context[spec] !== "ok" ? ` (no context: ${q.context[spec]})` : "";
    parts.push(`${spec}: Δ_q ${fmt(q.delta[spec])}${ctx}; run Δ ${fmt(t[0])} ` +
               `[${fmt(t[1])}, ${fmt(t[2])}], p ${fmt(t[3])} over ${fmt(t[4])} questions`);
  }
  $("qinfo").textContent = parts.join(" · ");
}

function rolloutOrder(q) {
  const a = q.specs[$("specA").value], show = $("show").value;
  const lo = Number($("minlen").value || 0), hi = Number($("maxlen").value || Infinity);
  let idx = q.rollouts.map((_, i) => i).filter(i => {
    const r = q.rollouts[i], n = r[2].length;
    return (show === "all" || (show === "correct") === !!r[1]) && n >= lo && n <= hi;
  });
  const score = i => (a && a.mean[i] !== null) ? a.mean[i] : NaN;
  const by = {
    rollout: (i, j) => q.rollouts[i][0] - q.rollouts[j][0],
    len_up: (i, j) => q.rollouts[i][2].length - q.rollouts[j][2].length,
    len_down: (i, j) => q.rollouts[j][2].length - q.rollouts[i][2].length,
    score_up: (i, j) => (isNaN(score(i)) - isNaN(score(j))) || score(i) - score(j),
    score_down: (i, j) => (isNaN(score(i)) - isNaN(score(j))) || score(j) - score(i),
  }[$("sort").value];
  return idx.sort((i, j) => by(i, j) || i - j);
}

function draw() {
  const q = question(), sp = specs();
  drawInfo(q);
  const box = $("rollouts");
  box.replaceChildren();
  const order = rolloutOrder(q);
  if (!order.length) box.append(el("p", {class: "note", text: "No rollout matches."}));
  for (const i of order) {
    const r = q.rollouts[i];
    const means = sp.map(s => `${s}: mean ${fmt(q.specs[s] ? q.specs[s].mean[i] : null)}`);
    const div = el("div", {class: "rollout " + (r[1] ? "correct" : "incorrect")},
      el("div", {class: "meta", text: `rollout ${r[0]} · ${r[1] ? "correct" : "incorrect"} · ` +
                                       `${r[2].length} tokens · ${means.join(" · ")}`}));
    const pair = el("div", {class: "pair"});
    pair.style.gridTemplateColumns = `repeat(${sp.length}, minmax(0, 1fr))`;
    for (const s of sp) {
      const cos = q.specs[s] ? q.specs[s].cos[i] : [];
      const col = el("div", {}, el("div", {class: "colhead", text: s}));
      const toks = el("div", {class: "toks"});
      r[2].forEach((k, t) => {
        const span = el("span", {class: "tok", "data-r": i, "data-t": t, "data-spec": s,
                                 title: `pos ${t} · id ${r[3][t]} · cos ${fmt(cos[t] === null || cos[t] === undefined ? null : cos[t] / 1000)}`,
                                 text: shown(S[k])});
        span.style.background = colour(cos[t]);
        if (st.sel && st.sel.r === i && st.sel.t === t) span.classList.add("sel");
        toks.append(span);
      });
      col.append(toks);
      pair.append(col);
    }
    div.append(pair);
    box.append(div);
  }
  if (st.sel && st.sel.q === q) details(q, st.sel.r, st.sel.t);
  else $("details").replaceChildren(el("p", {class: "note", text: "Click a token."}));
}

function cell(value, field, spec, i) {
  const a = {text: fmt(value), "data-field": field};
  if (spec !== undefined && spec !== null) a["data-spec"] = spec;
  if (i !== undefined) a["data-i"] = i;
  return el("td", a);
}
function table(head, rows) {
  return el("table", {}, el("tr", {}, ...head.map(h => el("th", {text: h}))), ...rows);
}

function details(q, i, t) {
  const r = q.rollouts[i], u = r[4][t], n = q.nodes[u], sp = specs();
  const box = $("details");
  box.replaceChildren();
  box.append(el("h3", {text: `Node ${u} · token ${t} of rollout ${r[0]}: ` +
                             JSON.stringify(S[r[2][t]]) + ` (id ${r[3][t]})`}));
  if (!n) { box.append(el("p", {class: "note", text: "This node was not scored."})); return; }
  const reached = n[F.targeted] > 0 ? "yes" : "no";
  box.append(el("p", {id: "node-meta", "data-node": u},
    `depth ${fmt(n[F.depth])} · informative ${n[F.informative] ? "yes" : "no"} · ` +
    `reached by targeted rollouts: ${reached} (`, el("span", {"data-field": "targeted",
    text: fmt(n[F.targeted])}), ")"));
  const loo = sp.map(s => q.specs[s] ? q.specs[s].cos[i][t] : null);
  box.append(el("p", {}, "this rollout's leave-one-out cos: " + sp.map((s, k) =>
    `${s} ${fmt(loo[k] === null ? null : loo[k] / 1000)}`).join(" · ")));
  const node = s => (q.specs[s] && q.specs[s].nodes[u]) || null;
  // Scores and covariates, one column per shown spec.
  const rows = [["align", "cos(ĝ*, d), full tree"], ["dot", "⟨ĝ*, d⟩"], ["norm", "‖d‖"],
                ["kl_pq", "KL(p‖q)"], ["kl_qp", "KL(q‖p)"], ["l2_pq", "‖p − q‖₂"],
                ["cos_pq", "cos(p, q)"], ["entropy_p", "H(p)"], ["entropy_q", "H(q)"]];
  box.append(el("h3", {text: "Scores (__DIRECTION__) and covariates"}));
  box.append(table([""].concat(sp), rows.map(([f, label]) => el("tr", {},
    el("td", {class: "t", text: label}),
    ...sp.map(s => cell(node(s) ? node(s)[G[f]] : null, f, s))))
    .concat([el("tr", {}, el("td", {class: "t", text: "‖ĝ*‖"}), cell(n[F.norm_ideal], "norm_ideal")),
             el("tr", {}, el("td", {class: "t", text: "V̂"}), cell(n[F.v_hat], "v_hat")),
             el("tr", {}, el("td", {class: "t", text: "min n_k"}), cell(n[F.min_trials], "min_trials"))])));
  // Top-k of π and of each spec's q.
  box.append(el("h3", {text: "Most likely tokens"}));
  const tops = [["π", n[F.top_p_text], n[F.top_p], "top_p", null]].concat(sp.map(s =>
    [`q ${s}`, node(s) ? node(s)[G.top_q_text] : [], node(s) ? node(s)[G.top_q] : [], "top_q", s]));
  const k = Math.max(...tops.map(x => x[1].length));
  const trs = [];
  for (let j = 0; j < k; j++) {
    trs.push(el("tr", {}, ...tops.flatMap(([, txt, pr, f, s]) => [
      el("td", {class: "t", text: j < txt.length ? JSON.stringify(S[txt[j]]) : ""}),
      j < pr.length ? cell(pr[j], f, s, j) : el("td")])));
  }
  box.append(table(tops.flatMap(x => [x[0], "prob"]), trs));
  // The children: Q̂ with Wilson intervals and trials, ĝ*_k and each spec's d_k.
  box.append(el("h3", {text: "Children (ĝ*_k = π_k (Q̂_k − V̂) on the observed ones, from the rounded numbers)"}));
  const kids = n[F.child_text].map((c, j) => {
    const nk = n[F.child_n][j], obs = nk > 0;
    const g = obs && n[F.v_hat] !== null ? n[F.child_p][j] * (n[F.child_q][j] - n[F.v_hat]) : 0;
    return el("tr", {},
      el("td", {class: "t", text: `${JSON.stringify(S[c])} (${n[F.child_tokens][j]})` +
                                   (n[F.child_tokens][j] === r[3][t] ? " ◀" : "")}),
      cell(n[F.child_p][j], "child_p", null, j),
      cell(obs ? n[F.child_q][j] : null, "child_q", null, j),
      el("td", {"data-field": "child_wilson", "data-i": j,
                text: obs ? `[${fmt(n[F.child_q_lo][j])}, ${fmt(n[F.child_q_hi][j])}]` : "n/a"}),
      cell(nk, "child_n", null, j), cell(Number(g.toPrecision(4)), "ideal", null, j),
      ...sp.map(s => cell(node(s) ? node(s)[G.child_d][j] : null, "child_d", s, j)));
  });
  box.append(table(["token", "π", "Q̂", "Wilson 95%", "n", "ĝ*"].concat(sp.map(s => `d ${s}`)),
                   kids));
}

$("rollouts").addEventListener("click", e => {
  const span = e.target.closest(".tok");
  if (!span) return;
  st.sel = {q: question(), r: Number(span.dataset.r), t: Number(span.dataset.t)};
  draw();
});
$("student").addEventListener("change", () => { st.sel = null; fillStudent(); });
$("question").addEventListener("change", () => { st.sel = null; draw(); });
for (const id of ["specA", "specB"])
  $(id).addEventListener("change", () => fillQuestions($("question").value));
for (const id of ["show", "sort", "minlen", "maxlen"])
  $(id).addEventListener(id.endsWith("len") ? "input" : "change", draw);

const names = Object.keys(D.students);
options($("student"), names, names, names[0]);
if (names.length) fillStudent();
else $("rollouts").append(el("p", {class: "note", text: "No rollouts."}));
</script></body></html>
"""
