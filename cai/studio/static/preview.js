// cai studio, the data it would make: a few prompts through `cai generate sft`'s critique -> revision (cai/studio/preview.py).
// Uses studio.js's helpers (api, el, $, fmt, failed); every text from a model is set as text.
"use strict";

let previewTimer = null;

function previewBody() {
  const prompts = $("#preview-prompts").value.split("\n").map((s) => s.trim()).filter((s) => s);
  const pasted = $("#preview-answers").value;
  const answers = pasted.trim() ? pasted.split(/\n-{3,}\n/).map((s) => s.trim()) : [];
  return {prompts, answers, count: Number($("#preview-count").value), seed: Number($("#preview-seed").value),
    rounds: Number($("#preview-rounds").value)};
}

async function previewRun() {
  try { showPreview(await api("POST", "/api/preview/run", previewBody())); watchPreview(); } catch (e) { failed(e); }
}

function watchPreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(async () => {
    try {
      const r = await api("GET", "/api/preview");
      showPreview(r);
      if (r.state === "running") watchPreview();
    } catch (e) { failed(e); }
  }, 700);
}

function previewSettings(r) {
  $("#preview-source").textContent = `${r.prompts}, seeded as --limit takes them`;
  $("#preview-policy").textContent = `${r.policy} (${r.backend})`;
  $("#preview-count").max = r.max_prompts; $("#preview-rounds").max = r.max_rounds;
  $("#preview-cap").textContent = r.max_tokens;
}

function showPreview(r) {
  previewSettings(r);
  const bar = $("#preview-progress");
  bar.hidden = r.state === "idle";
  bar.dataset.state = r.state;
  bar.querySelector(".bar").style.width = r.total ? `${100 * r.done / r.total}%` : "0";
  bar.querySelector("span").textContent = r.state === "error" ? `failed: ${r.error}` :
    `${r.done} / ${r.total} steps (policy answers, critiques, revisions) ${r.state === "done" ? "· done" : `… ${r.phase}`}`;
  $("#preview-run").disabled = r.state === "running";
  if (r.state !== "done") return;
  const written = r.rows.filter((s) => s.written).length;
  const out = [el("p", {id: "preview-summary", text: `constitution ${short(r.version)}: ${written} of ${r.rows.length} row(s) written to sft.jsonl, ` +
    `${r.rows.filter((s) => s.revision_pair).length} revision pair(s)`})];
  if (r.command) out.push(el("p", {class: "hint", text: "The same rows from the command line:"}), el("pre", {class: "command", text: r.command}));
  r.rows.forEach((s, i) => out.push(previewRow(s, i)));
  $("#preview-out").replaceChildren(...out);
}

function previewRow(s, i) {
  const row = s.row;
  const node = el("div", {class: `preview-row ${s.written ? "written" : "dropped"}`, "data-id": row.id},
    el("h3", {text: `Prompt ${i + 1}${row.category ? ` · ${row.category}` : ""}`}), el("pre", {text: row.prompt}),
    el("h4", {text: s.answer_from === "pasted" ? "Your answer (pasted)" : `The policy's answer (finish: ${row.initial_finish_reason})`}),
    el("pre", {text: row.initial_response || "(empty)"}));
  for (const step of s.steps) {
    node.append(el("div", {class: "step"},
      el("h4", {text: `Round ${step.round + 1} · principle ${step.principle_id}`}),
      el("div", {class: "sides"}, el("div", {}, el("h5", {text: "Critique"}), el("pre", {text: step.critique || "(empty)"})),
        el("div", {}, el("h5", {text: "Revision"}), el("pre", {text: step.revision || "(empty)"}))),
      el("p", {class: `verdict ${step.rejected ? "rejected" : "kept"}`, text: `revision guard: ${step.verdict}`})));
  }
  node.append(el("p", {class: "outcome", text: s.outcome}),
    el("details", {}, el("summary", {text: "the row as cai generate sft logs it"}), el("pre", {text: JSON.stringify(row, null, 2)})));
  return node;
}

$("#preview-run").addEventListener("click", previewRun);
api("GET", "/api/preview").then((r) => { showPreview(r); if (r.state === "running") watchPreview(); }).catch(failed);
