// cai studio: the page's behaviour. No framework, no build step; every text from the file or the judge is set as text.
"use strict";

const TOKEN = document.querySelector('meta[name="studio-token"]').content;
const FIELDS = ["comparison", "critique", "revision"];
const POLL_MS = 1500;
const $ = (sel) => document.querySelector(sel);

let loaded = null;          // the file version the page shows: /api/constitution
let drafts = new Map();     // card index -> {field: value} edited and not saved
let added = [];             // new cards, not saved
let deleted = new Set();    // card indexes to remove
let draftProblems = null;   // problems of a refused save, one list per shown card
let inService = null;       // the constitution hash the judge answers for
let tried = false, measured = false, peopleTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

async function api(method, path, body) {
  const init = {method, headers: {}};
  if (method !== "GET") init.headers["X-Studio-Token"] = TOKEN;
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = {error: {message: `${resp.status} ${resp.statusText}`}}; }
  if (!resp.ok) throw {status: resp.status, data};
  return data;
}

function banner(text, kind = "") {
  const b = $("#banner");
  b.hidden = !text; b.textContent = text || ""; b.className = kind;
}

function failed(e) {
  banner(e.data && e.data.error ? e.data.error.message : String(e), "error");
}

const fmt = (x, d = 3) => (x === null || x === undefined) ? "-" : Number(x).toFixed(d);
const est = (e) => !e || e.value === null ? "-" : (e.low === null ? fmt(e.value) : `${fmt(e.value)} [${fmt(e.low)}, ${fmt(e.high)}]`);
const short = (h) => h ? h.slice(0, 12) : "-";

// -- the constitution as cards -------------------------------------------------------------------

function dirty() { return drafts.size > 0 || added.length > 0 || deleted.size > 0; }

function shownCards() {
  const cards = loaded.cards.filter((c) => !deleted.has(c.index)).map((c) => ({...c, ...(drafts.get(c.index) || {}), saved: c}));
  return cards.concat(added.map((c, i) => ({...c, index: null, added: i, line: null, problems: []})));
}

async function load() {
  loaded = await api("GET", "/api/constitution");
  drafts = new Map(); added = []; deleted = new Set(); draftProblems = null;
  inService = loaded.in_service.hash;
  render();
}

function edit(card, field, value) {
  if (card.index === null) { added[card.added][field] = value; }
  else {
    const d = drafts.get(card.index) || {};
    d[field] = value;
    if (String(card.saved[field]) === String(value)) delete d[field];
    if (Object.keys(d).length) drafts.set(card.index, d); else drafts.delete(card.index);
  }
  updateDirty();
}

function updateDirty() {
  $("#save").disabled = !dirty();
  $("#dirty-note").textContent = dirty() ? "unsaved edits" : "";
  document.querySelectorAll(".card").forEach((node) => {
    const i = node.dataset.index;
    node.classList.toggle("dirty", i === "" || drafts.has(Number(i)));
  });
}

function render() {
  $("#hashes").textContent = `file ${short(loaded.file_hash)} · in service ${loaded.in_service.name} ${loaded.in_service.short_hash}` +
    (loaded.valid ? "" : " · the file on disk has problems: the judge keeps the version in service");
  const problems = $("#problems");
  problems.replaceChildren(...(draftProblems ? draftProblems.loose : loaded.problems).map(
    (p) => el("li", {text: `${p.line ? "line " + p.line + ": " : ""}${p.field ? p.field + ": " : ""}${p.message}`})));
  const text = loaded.format === "text";
  const cards = shownCards().map((card, k) => {
    const mine = draftProblems ? (draftProblems.cards[k] || []) : card.problems;
    const field = (name, rows) => el("label", {text: name},
      el("textarea", {rows, "data-field": name, readonly: text && name !== "comparison",
        title: text && name !== "comparison" ? "from cai's template: convert the file to YAML to edit it" : null,
        oninput: (ev) => edit(card, name, ev.target.value)}));
    const node = el("div", {class: "card" + (mine.length ? " bad" : ""), "data-index": card.index === null ? "" : card.index},
      el("div", {class: "head"},
        el("input", {class: "id", "data-field": "id", "aria-label": "id", oninput: (ev) => edit(card, "id", ev.target.value)}),
        text ? null : el("input", {class: "weight", "data-field": "weight", "aria-label": "weight", title: "weight",
          oninput: (ev) => edit(card, "weight", ev.target.value === "" ? "" : (isNaN(Number(ev.target.value)) ? ev.target.value : Number(ev.target.value)))}),
        el("button", {text: "Delete", onclick: () => { if (card.index === null) added.splice(card.added, 1); else deleted.add(card.index); render(); updateDirty(); }})),
      el("div", {class: "line", text: card.line ? `line ${card.line}` : "new"}),
      mine.length ? el("ul", {class: "problems"}, ...mine.map((p) => el("li", {text: `${p.line ? "line " + p.line + ": " : ""}${p.field ? p.field + ": " : ""}${p.message}`}))) : null,
      field("comparison", 3), field("critique", 3), field("revision", 3));
    node.querySelector('[data-field="id"]').value = card.id;
    if (!text) node.querySelector('[data-field="weight"]').value = card.weight;
    for (const f of FIELDS) node.querySelector(`[data-field="${f}"]`).value = card[f];
    return node;
  });
  $("#cards").replaceChildren(...cards);
  updateDirty();
  const select = $("#try-principle"), keep = select.value;
  select.replaceChildren(...loaded.cards.map((c) => el("option", {value: c.id, text: c.id})));
  if (keep) select.value = keep;
}

function edits() {
  const out = [];
  for (const [index, fields] of drafts) out.push({index, ...fields});
  for (const index of deleted) out.push({index, delete: true});
  for (const c of added) out.push(loaded.format === "text" ? {index: null, id: c.id, comparison: c.comparison} : {index: null, ...c});
  return out;
}

async function save(base) {
  try {
    const result = await api("PUT", "/api/constitution", {base, edits: edits()});
    $("#conflict").hidden = true;
    loaded = result; drafts = new Map(); added = []; deleted = new Set(); draftProblems = null;
    render();
    banner(`saved: ${result.in_service.name} ${result.in_service.short_hash}`, "ok");
    await afterChange();
  } catch (e) {
    if (e.status === 409) {
      $("#theirs").textContent = e.data.theirs.text;
      $("#mine").textContent = e.data.mine === null ? "(your edits could not be applied to the version you loaded)" : e.data.mine;
      $("#conflict").hidden = false;
      $("#conflict").dataset.base = e.data.theirs.file_hash;
      failed(e);
    } else if (e.status === 422 && e.data.draft) {
      draftProblems = {cards: e.data.draft.cards.map((c) => c.problems), loose: e.data.draft.problems};
      render();
      failed(e);
    } else failed(e);
  }
}

// -- what follows a new version: the page's answers again ------------------------------------------

async function afterChange() {
  const now = loaded.in_service.hash;
  if (now === inService) return;
  inService = now;
  if (tried) await tryIt();
  if (measured) await peopleRun();
  if (!$("#view-versions").hidden) await versions();
}

async function poll() {
  try {
    const v = await api("GET", "/api/version");
    if (loaded && v.file_hash !== loaded.file_hash) {
      if (dirty()) banner("the file changed on disk; saving now will show both versions", "");
      else { await load(); banner(v.valid ? "the file changed on disk: reloaded" : "the file on disk has problems (see the cards)", v.valid ? "ok" : "error"); await afterChange(); }
    }
  } catch (e) { /* the next poll tries again */ }
  setTimeout(poll, POLL_MS);
}

// -- try it ----------------------------------------------------------------------------------------

async function tryIt() {
  const answers = [$("#try-a").value, $("#try-b").value].filter((a) => a.trim());
  if (!$("#try-prompt").value.trim() || !answers.length) { banner("give a prompt and at least one answer", "error"); return; }
  $("#try-run").disabled = true;
  try {
    const r = await api("POST", "/api/try", {prompt: $("#try-prompt").value, answers, principle_id: $("#try-principle").value});
    tried = true;
    const out = [el("p", {id: "try-version", "data-hash": r.constitution_hash, text: `constitution ${short(r.constitution_hash)}, principle ${r.principle_id}`})];
    r.answers.forEach((a, i) => out.push(el("h3", {text: `Answer ${"AB"[i]}`}), el("h4", {text: "Critique"}), el("pre", {text: a.critique}),
      el("h4", {text: "Revision"}), el("pre", {text: a.revision})));
    if (r.labels.length) {
      out.push(el("h3", {text: "Labels per principle"}), el("table", {id: "labels"},
        el("thead", {}, el("tr", {}, ...["principle", "p_a", "A shown first", "A shown second", "same position", "option mass"].map((h) => el("th", {text: h})))),
        el("tbody", {}, ...r.labels.map((l) => el("tr", {"data-principle": l.principle_id}, el("td", {text: l.principle_id}),
          el("td", {class: "num p-a", "data-value": l.p_a, text: fmt(l.p_a, 4)}),
          el("td", {class: "num shown-first", "data-value": l.p_a_shown_first, text: fmt(l.p_a_shown_first, 4)}),
          el("td", {class: "num shown-second", "data-value": l.p_a_shown_second, text: fmt(l.p_a_shown_second, 4)}), el("td", {text: l.same_position ? "yes (position bias)" : "no"}),
          el("td", {class: "num", text: fmt(l.option_mass)}))))));
    }
    $("#try-out").replaceChildren(...out);
  } catch (e) { failed(e); } finally { $("#try-run").disabled = false; }
}

// -- against people --------------------------------------------------------------------------------

async function peopleRun() {
  try { measured = true; showPeople(await api("POST", "/api/people/run")); watchPeople(); } catch (e) { failed(e); }
}

function watchPeople() {
  clearTimeout(peopleTimer);
  peopleTimer = setTimeout(async () => {
    try {
      const r = await api("GET", "/api/people");
      showPeople(r);
      if (r.progress.state === "running") watchPeople();
      else if (!$("#view-versions").hidden) versions();
    } catch (e) { failed(e); }
  }, 700);
}

function showPeople(r) {
  const p = r.progress, bar = $("#people-progress");
  bar.hidden = p.state === "idle";
  bar.querySelector(".bar").style.width = p.total ? `${100 * p.done / p.total}%` : "0";
  bar.querySelector("span").textContent = p.state === "error" ? `failed: ${p.error}` :
    `${p.done} / ${p.total} comparisons (${p.hits} from the cache, ${p.misses} asked) ${p.state === "done" ? "· done" : "…"}`;
  bar.dataset.state = p.state;
  if (!r.current) return;
  const f = r.current.figures, out = [el("h3", {text: `Version ${short(r.current.hash)}`})];
  out.push(el("table", {id: "people-figures"}, el("tbody", {},
    el("tr", {}, el("th", {text: "agreement with people"}), el("td", {class: "num", id: "agreement", text: est(f.agreement)})),
    el("tr", {}, el("th", {text: "position consistency"}), el("td", {class: "num", text: est(f.position_consistency)})),
    el("tr", {}, el("th", {text: "option mass"}), el("td", {class: "num", text: est(f.option_mass)})),
    el("tr", {}, el("th", {text: "Brier / ECE"}), el("td", {class: "num", text: `${est(f.brier)} / ${est(f.ece)}`})),
    ...Object.entries(f.per_principle).map(([pid, e]) => el("tr", {}, el("th", {text: `agreement under ${pid}`}), el("td", {class: "num", text: est(e)}))))));
  if (r.change) out.push(...changeView(r.change));
  $("#people-out").replaceChildren(...out);
}

function changeView(c) {
  const a = c.agreement_change;
  const out = [el("h3", {text: `Change from ${short(c.from)} to ${short(c.to)}`}),
    el("p", {id: "agreement-change", class: a.value > 0 ? "up" : (a.value < 0 ? "down" : ""),
      text: `agreement ${a.value >= 0 ? "+" : ""}${fmt(a.value)} [${fmt(a.low)}, ${fmt(a.high)}] (paired, 95%; ${a.moved ? "moved" : "within noise"})`}),
    el("h4", {text: `${c.flipped.length} pair(s) flipped`})];
  for (const f of c.flipped) {
    out.push(el("div", {class: "flip"},
      el("p", {text: `pair ${f.pair}: people chose the first answer (${fmt(f.people_p_chosen, 2)} preferred it); the judge's p(chosen) ${fmt(f.judge_before)} → ${fmt(f.judge_after)}: ${f.agree_after > f.agree_before ? "now agrees" : "now disagrees"}`}),
      el("pre", {text: f.prompt}),
      el("div", {class: "answers"}, el("div", {}, el("h4", {text: "chosen by people"}), el("pre", {text: f.chosen})),
        el("div", {}, el("h4", {text: "rejected by people"}), el("pre", {text: f.rejected})))));
  }
  return out;
}

// -- versions --------------------------------------------------------------------------------------

async function versions() {
  const r = await api("GET", "/api/versions");
  $("#versions tbody").replaceChildren(...r.versions.map((v, i) => el("tr", {"data-hash": v.hash},
    el("td", {}, el("input", {type: "radio", name: "va", value: v.hash, disabled: !v.measured, checked: i === r.versions.length - 2})),
    el("td", {}, el("input", {type: "radio", name: "vb", value: v.hash, disabled: !v.measured, checked: i === r.versions.length - 1})),
    el("td", {text: v.short_hash + (v.hash === r.in_service ? " (in service)" : "")}), el("td", {text: v.name}), el("td", {text: v.source}),
    el("td", {text: new Date(v.seen_at * 1000).toLocaleTimeString()}), el("td", {class: "num", text: est(v.agreement)}),
    el("td", {}, v.hash === r.in_service ? null : el("button", {text: "Restore", onclick: () => restore(v.hash)})))));
}

async function restore(hash) {
  try {
    loaded = await api("POST", "/api/restore", {base: loaded.file_hash, hash});
    drafts = new Map(); added = []; deleted = new Set(); draftProblems = null;
    render(); banner(`restored ${short(hash)}`, "ok"); await afterChange(); await versions();
  } catch (e) {
    if (e.status === 409) banner("the file changed since this page loaded it: nothing was written; look at the Constitution tab, then restore again", "error");
    else failed(e);
  }
}

async function compare() {
  const a = document.querySelector('input[name="va"]:checked'), b = document.querySelector('input[name="vb"]:checked');
  if (!a || !b) { banner("pick two measured versions (A and B)", "error"); return; }
  try {
    const c = await api("GET", `/api/compare?a=${a.value}&b=${b.value}`);
    $("#compare-out").replaceChildren(...changeView(c), el("div", {class: "sides"},
      el("div", {}, el("h4", {text: short(c.from)}), el("pre", {text: c.texts[c.from]})),
      el("div", {}, el("h4", {text: short(c.to)}), el("pre", {text: c.texts[c.to]}))));
  } catch (e) { failed(e); }
}

// -- wiring ----------------------------------------------------------------------------------------

document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${tab.dataset.view}`; });
  if (tab.dataset.view === "versions") versions().catch(failed);
}));
$("#save").addEventListener("click", () => save(loaded.file_hash));
$("#add").addEventListener("click", () => { added.push({id: "", comparison: "", critique: "", revision: "", weight: 1}); render(); });
$("#take-theirs").addEventListener("click", async () => { $("#conflict").hidden = true; await load(); banner("took the file's version", "ok"); await afterChange(); });
$("#save-mine").addEventListener("click", () => save($("#conflict").dataset.base));
$("#try-run").addEventListener("click", tryIt);
$("#people-run").addEventListener("click", peopleRun);
$("#compare").addEventListener("click", compare);
document.addEventListener("keydown", (ev) => { if ((ev.ctrlKey || ev.metaKey) && ev.key === "s") { ev.preventDefault(); if (dirty()) save(loaded.file_hash); } });
load().then(() => { poll(); api("GET", "/api/people").then((r) => { if (r.current) { measured = true; showPeople(r); } }); }).catch(failed);
