// cai studio: where the judge and people disagree, and principles suggested from it. Uses studio.js's helpers
// (api, el, banner, failed, fmt, est, short, loaded, render, afterChange); every text from the judge is set as text.
"use strict";

function disagreementView(d) {
  const people = d.people_p_chosen >= 0.5 ? "the first answer" : "the second answer";
  return el("div", {class: "flip disagreement", "data-pair": d.pair, "data-wrong-by": d.wrong_by},
    el("p", {text: `pair ${d.pair}: people chose ${people} (${fmt(d.people_p_chosen, 2)} preferred the first); the judge's ` +
      `p(first) ${fmt(d.judge_p_chosen)}, wrong by ${fmt(d.wrong_by)}`}),
    el("table", {class: "by-principle"}, el("tbody", {}, ...Object.entries(d.by_principle).map(([pid, p]) =>
      el("tr", {"data-principle": pid}, el("th", {text: `p(first) under ${pid}`}), el("td", {class: "num", "data-value": p, text: fmt(p)}))))),
    el("pre", {text: d.prompt}),
    el("div", {class: "answers"}, el("div", {}, el("h4", {text: "first answer"}), el("pre", {text: d.chosen})),
      el("div", {}, el("h4", {text: "second answer"}), el("pre", {text: d.rejected}))));
}

async function listDisagreements() {
  try {
    const r = await api("GET", "/api/disagreements");
    $("#disagree-out").replaceChildren(
      el("h3", {id: "disagree-count", text: `${r.n_disagree} of ${r.n_pairs} pairs against people (version ${short(r.version)})`}),
      ...r.pairs.map(disagreementView));
  } catch (e) { failed(e); }
}

function suggestionCard(c) {
  const ch = c.change, card = el("div", {class: "card suggestion", "data-id": c.card.id});
  card.append(el("p", {class: "question", text: c.question}),
    el("p", {class: "figures", text: `on ${c.n_held_out} held-out pairs: agreement ${est(c.agreement_before)} → ${est(c.agreement_with)} ` +
      `with it (change ${ch.value >= 0 ? "+" : ""}${fmt(ch.value)} [${fmt(ch.low)}, ${fmt(ch.high)}], paired 95%); alone ${est(c.agreement_alone)}`}),
    el("button", {class: "accept primary", text: "Accept", onclick: () => acceptSuggestion(c, card)}),
    el("button", {class: "drop", text: "Drop", onclick: () => card.remove()}));
  return card;
}

async function runSuggest() {
  const out = $("#suggestions");
  out.replaceChildren(el("p", {class: "hint", text: "asking the judge model for proposals and testing them…"}));
  try {
    const r = await api("POST", "/api/suggest", {});
    const parsed = r.replies.filter((x) => x.question !== null).length;
    out.replaceChildren(el("p", {id: "suggest-summary", text: `${r.replies.length} asked, ${parsed} parsed as a question, ` +
      `${r.candidates.length} tested on ${r.held_out_pairs.length} held-out pairs, ${r.offered.length} help`}),
      ...r.offered.map(suggestionCard));
  } catch (e) { out.replaceChildren(); failed(e); }
}

async function acceptSuggestion(c, card) {
  if (dirty()) { banner("save or drop your card edits first: accepting saves the file", "error"); return; }
  const edit = loaded.format === "text" ? {id: c.card.id, comparison: c.card.comparison} : {...c.card};
  try {
    loaded = await api("PUT", "/api/constitution", {base: loaded.file_hash, edits: [{index: null, ...edit}]});
    render(); card.remove();
    banner(`accepted ${c.card.id}: saved as ${loaded.in_service.name} ${loaded.in_service.short_hash}`, "ok");
    await afterChange();
  } catch (e) {
    if (e.status === 409) banner("the file changed since this page loaded it: nothing was written; reload it (Constitution tab), then accept again", "error");
    else failed(e);
  }
}

$("#disagree-load").addEventListener("click", listDisagreements);
$("#suggest-run").addEventListener("click", runSuggest);
