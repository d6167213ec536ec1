"""Principles learned from where the judge and people disagree (Inverse Constitutional AI, Findeis et al. 2024).

What `cai constitution learn` and the studio's suggest action share:

1. Every labelled pair is judged under every principle of the constitution, in both orders (`cai judge eval`'s rows,
   through the judge cache, so a second run asks nothing again).
2. The pairs are split by a seeded shuffle: proposals are drawn from one part, tested on the other (held out).
3. From the proposal part, the pairs where the judge is most confidently against people (how far its probability
   for people's choice is on the wrong side of 0.5) go to the judge model in batches: each batch asks it for one
   comparison question ("Which response ...?") that would explain people's choice (the judge's /v1/propose).
   The reply is parsed; one that is not such a question is no proposal.
4. Each proposal is tested on the held-out pairs: the constitution with the proposal added (its vote averaged in,
   as each principle's is) against the constitution alone, a paired change in agreement with its 95% interval
   (`cai.judge_eval.agreement_change`). A proposal helps when that change is above zero; only those are offered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cai import intervals
from cai.constitution.files import DEFAULT_CONSTITUTION, TEXT_SUFFIXES
from cai.constitution.model import Constitution, Principle
from cai.errors import CaiError
from cai.files import json_lines, write_text_atomic
from cai.judge import JudgeConnection
from cai.judge_eval import agreement_change, compare_requests, judged_rows
from cai.models import DEFAULT_MODEL
from judge_server import protocol as P

logger = logging.getLogger(__name__)

LEARNED_PREFIX = "learned-"
QUESTION_CHARS = (20, 300)
"""A proposal's length bounds, in characters: shorter is no question, longer is rambling."""


class LearnError(CaiError, ValueError):
    """A pairs file or a setting `cai constitution learn` cannot use."""


class SuggestOptions(BaseModel):
    """How many principles to propose, from which pairs, and how they are tested (the studio's suggest action too)."""

    model_config = ConfigDict(extra="forbid")

    proposals: int = Field(default=4, ge=1, le=64, description="Principles to ask the judge model for, one per batch of "
                           "disagreement pairs.")
    batch: int = Field(default=3, ge=1, le=P.MAX_PROPOSE_PAIRS, description="Disagreement pairs shown per proposal.")
    held_out: float = Field(default=0.5, gt=0, lt=1, description="Share of the pairs held out to test proposals on "
                            "(the others are where proposals come from).")
    seed: int = Field(default=0, ge=0, description="Seeds the pair order, the A/B placement, the split and the sampling.")
    max_tokens: int = Field(default=64, ge=8, le=512, description="Tokens a proposal may take.")
    temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature of the proposals.")


# -- reading the model's reply ----------------------------------------------------------------------

_LABEL = re.compile(r"^\s*(?:[-*>\d.)\s]+)?(?:\*\*)?(?:principle|question|comparison|answer)\s*:?\s*(?:\*\*)?\s*", re.IGNORECASE)
_START = re.compile(r"^(which|what|whose|choose|select|pick|prefer)\b", re.IGNORECASE)


def parse_proposal(text: str) -> str | None:
    """The comparison question in a model's reply, or None when there is none: the first line that, once list marks,
    labels and quotes are stripped, asks which response to prefer, ends at its question mark, is 20 to 300 characters
    long, speaks of a response, and is mostly words (random tokens are not)."""
    for line in text.splitlines():
        line = _LABEL.sub("", line).strip().strip("\"'`*“”").strip()
        if not _START.match(line):
            continue
        if "?" in line:
            line = line[:line.index("?") + 1]
        elif not re.match(r"^(choose|select|pick|prefer)\b", line, re.IGNORECASE):
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in line)
        if (QUESTION_CHARS[0] <= len(line) <= QUESTION_CHARS[1] and "response" in line.lower() and letters >= 0.9 * len(line)
                and len(line.split()) >= 4):
            return " ".join(line.split())
    return None


def learned_principle(question: str) -> Principle:
    """A proposal as a principle: its id from its text (the same question, the same id), critique and revision from it."""
    digest = hashlib.sha256(question.encode("utf-8")).hexdigest()[:8]
    return Principle(id=f"{LEARNED_PREFIX}{digest}", comparison=question,
                     critique=f"Identify ways in which the last response falls short of this: {question}",
                     revision=f"Rewrite the response so that it does better on this: {question}")


# -- the pairs --------------------------------------------------------------------------------------


def split(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Pair indexes (proposal part, held-out part), by a seeded shuffle; each part holds at least one pair."""
    if n < 2:
        raise LearnError(f"learning needs at least 2 labelled pairs (some to propose from, some to test on), got {n}")
    order = list(range(n))
    random.Random(f"{seed}:learn-split").shuffle(order)
    k = min(max(round(n * held_out), 1), n - 1)
    return sorted(order[k:]), sorted(order[:k])


def _people_chose_first(pair: dict) -> bool:
    return pair.get("p_chosen", 1.0) >= 0.5  # the majority, as cai.human_labels.agreement reads it


def disagreements(pairs: list[dict], rows: list[dict], by_pair: list[list[P.CompareResult]], chosen_first: list[bool],
                  among: Sequence[int] | None = None) -> list[dict]:
    """The pairs (of `among`, default all) where the judge's label is against people's majority, most confident first
    (`wrong_by`: how far its probability for people's choice is below 0.5), each readable: prompt, both answers,
    people's share for the first, the judge's p(chosen) overall and per principle."""
    out = []
    for i in among if among is not None else range(len(pairs)):
        pair, row, first = pairs[i], rows[i], chosen_first[i]
        wrong_by = (0.5 - row["p_chosen"]) if _people_chose_first(pair) else (row["p_chosen"] - 0.5)
        if wrong_by <= 0:
            continue
        out.append({"pair": i, "prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                    "people_p_chosen": pair.get("p_chosen", 1.0), "judge_p_chosen": row["p_chosen"], "wrong_by": wrong_by,
                    "by_principle": {r.principle_ids[0]: r.p_a if first else 1.0 - r.p_a for r in by_pair[i]}})
    return sorted(out, key=lambda d: (-d["wrong_by"], d["pair"]))


def propose_requests(found: list[dict], options: SuggestOptions) -> list[P.ProposeRequest]:
    """One request per proposal, batch k showing the disagreements k*batch, k*batch+1, ... (cycling when they run out),
    each with people's choice as the preferred response, seeded per proposal."""
    reqs = []
    generation = P.GenerationOptions(max_tokens=options.max_tokens, temperature=options.temperature)
    for k in range(options.proposals):
        shown = [found[(k * options.batch + j) % len(found)] for j in range(min(options.batch, len(found)))]
        reqs.append(P.ProposeRequest(
            pairs=[P.PreferredPair(prompt=d["prompt"], preferred=P.or_placeholder(d["chosen" if d["people_p_chosen"] >= 0.5 else "rejected"]),
                                   other=P.or_placeholder(d["rejected" if d["people_p_chosen"] >= 0.5 else "chosen"])) for d in shown],
            seed=options.seed + k, generation=generation))
    return reqs


def question_requests(pairs: list[dict], chosen_first: list[bool], held: Sequence[int], question: str, seed: int) -> list:
    """The held-out pairs judged under a proposed question, in the same A/B placement and seeds as the constitution's."""
    base = compare_requests([pairs[i] for i in held], [chosen_first[i] for i in held], None, seed)
    return [r.model_copy(update={"comparison": question, "seed": seed + i}) for r, i in zip(base, held)]


# -- the test on held-out pairs ---------------------------------------------------------------------


def evaluate(question: str, constitution: Constitution, pairs: list[dict], chosen_first: list[bool], held: Sequence[int],
             by_pair: list[list[P.CompareResult]], answers: list[P.CompareResult], seed: int) -> dict:
    """A proposal's figures on the held-out pairs from the judge's answers: its agreement alone, the constitution's before
    and with it added, and the paired change (Newcombe / McNemar, or a bootstrap when a judgement tied); `helps` when the
    change is above zero."""
    held_pairs, first = [pairs[i] for i in held], [chosen_first[i] for i in held]
    before = judged_rows(constitution.name, constitution, held_pairs, first, [r for i in held for r in by_pair[i]])
    after = judged_rows(constitution.name, constitution, held_pairs, first,
                        [r for i, mine in zip(held, answers) for r in [*by_pair[i], mine]])
    alone = judged_rows(constitution.name, constitution, held_pairs, first, answers)
    change = agreement_change(before, after, seed)
    return {"question": question, "principle": learned_principle(question).model_dump(), "n_held_out": len(held),
            "agreement_alone": intervals.rate([r["agree"] for r in alone]).as_dict(),
            "agreement_before": intervals.rate([r["agree"] for r in before]).as_dict(),
            "agreement_with": intervals.rate([r["agree"] for r in after]).as_dict(),
            "change": {**change.as_dict(), "moved": change.moved}, "helps": change.value is not None and change.value > 0}


@dataclass
class Asker:
    """How the judge is asked: every comparison answered (or an error raised), and proposals answered or their error in place."""

    compare: Callable[[list[P.CompareRequest]], Awaitable[list[P.CompareResult]]]
    propose: Callable[[list[P.ProposeRequest]], Awaitable[list]]


async def judge_all(ask: Asker, constitution: Constitution, pairs: list[dict], chosen_first: list[bool],
                    seed: int) -> tuple[list[dict], list[list[P.CompareResult]]]:
    """Every pair under every principle: `cai judge eval`'s rows, and each pair's answers (one per principle)."""
    ids = [p.id for p in constitution.principles]
    results = await ask.compare(compare_requests(pairs, chosen_first, ids, seed))
    by_pair = [results[i * len(ids):(i + 1) * len(ids)] for i in range(len(pairs))]
    return judged_rows(constitution.name, constitution, pairs, chosen_first, results), by_pair


async def try_questions(ask: Asker, constitution: Constitution, pairs: list[dict], chosen_first: list[bool], held: Sequence[int],
                         by_pair: list[list[P.CompareResult]], questions: Sequence[str], seed: int) -> list[dict]:
    """Each question's figures on the held-out pairs (all questions' comparisons asked in one go)."""
    reqs = [r for q in questions for r in question_requests(pairs, chosen_first, held, q, seed)]
    answers = await ask.compare(reqs) if reqs else []
    n = len(held)
    return [evaluate(q, constitution, pairs, chosen_first, held, by_pair, answers[k * n:(k + 1) * n], seed)
            for k, q in enumerate(questions)]


async def suggest(ask: Asker, constitution: Constitution, pairs: list[dict], chosen_first: list[bool], options: SuggestOptions,
                  measured: tuple[list[dict], list[list[P.CompareResult]]] | None = None) -> dict:
    """Steps 1 to 4: the disagreements of the proposal part, the model's replies (each parsed), every new question's
    figures on the held-out pairs, and `offered`: the questions that help, best first."""
    rows, by_pair = measured or await judge_all(ask, constitution, pairs, chosen_first, options.seed)
    source, held = split(len(pairs), options.held_out, options.seed)
    found = disagreements(pairs, rows, by_pair, chosen_first, source)
    out: dict = {"n_pairs": len(pairs), "proposal_pairs": source, "held_out_pairs": held, "disagreements": len(found),
                 "replies": [], "candidates": [], "offered": []}
    if not found:
        logger.info("the judge agrees with people on every pair proposals come from: nothing to learn from")
        return out
    replies = await ask.propose(propose_requests(found, options))
    known = {p.comparison.strip().lower() for p in constitution.principles}
    questions: list[str] = []
    for reply in replies:
        if isinstance(reply, P.ProposeResult):
            question = parse_proposal(reply.text)
            out["replies"].append({"text": reply.text, "question": question})
        else:  # this proposal's own error (a JudgeError): no proposal, the rest go on
            question = None
            out["replies"].append({"text": None, "error": str(reply), "question": None})
        if question is not None and question.lower() not in known and question not in questions:
            questions.append(question)
    out["candidates"] = await try_questions(ask, constitution, pairs, chosen_first, held, by_pair, questions, options.seed)
    out["offered"] = sorted((c for c in out["candidates"] if c["helps"]), key=lambda c: -c["change"]["value"])
    logger.info("%d replies, %d questions parsed, %d help on %d held-out pairs", len(replies), len(questions), len(out["offered"]),
                len(held))
    return out


# -- the pairs file ---------------------------------------------------------------------------------


def check_pairs_file(path: str) -> None:
    """A .jsonl pairs file read line by line first, so a bad row is named by file and line (what `human_pairs` reads next)."""
    file = Path(path)
    if file.suffix != ".jsonl" or not file.is_file():
        return  # a shipped set, a gzip or a folder: human_pairs checks those
    for n, row, error in json_lines(file.read_text(encoding="utf-8", errors="replace").splitlines()):
        if error is not None:
            raise LearnError(f"{path}, line {n}: invalid JSON ({error.msg})")
        if not isinstance(row, dict):
            raise LearnError(f"{path}, line {n}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
        needed = ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected")
        for name in needed:
            if not isinstance(row.get(name), str):
                raise LearnError(f"{path}, line {n}: field {name!r} must be a string (a row holds prompt/chosen/rejected, "
                                 f"or HH-RLHF chosen/rejected transcripts), got {row.get(name)!r:.60}")


# -- cai constitution learn -------------------------------------------------------------------------


class LearnJob(JudgeConnection, SuggestOptions):
    """Settings of one `cai constitution learn` run (its command-line options are made from these fields)."""

    pairs: str = Field(description="Human-labelled pairs: a .jsonl of prompt/chosen/rejected rows (optional p_chosen: the "
                       "share of people preferring chosen) or HH-RLHF chosen/rejected transcripts, or hh-harmless.")
    out: Path = Field(description="The constitution YAML to write: the constitution with the principles that helped added, "
                      "each annotated with its held-out figures (and OUT.learn.json beside it, every proposal's figures).")
    constitution: str = Field(default=DEFAULT_CONSTITUTION, description="The constitution to start from (a file or shipped "
                              "name); a judge given by judge_url must serve it.")
    judge_model: str = Field(default=DEFAULT_MODEL, description="Model of the judge started here (without --judge-url); it "
                             "also writes the proposals.")
    limit: int = Field(default=64, ge=2, description="Use at most this many pairs (seeded order).")
    judge_cache: Path | None = Field(default=None, description="The judge answer cache (default ~/.cache/cai/judge-cache.sqlite): "
                                     "a second run with the same settings asks nothing again.")


def annotated_yaml(base_text: str, constitution: Constitution, base_format: str, offered: list[dict]) -> str:
    """The constitution's text with each offered principle added at the end of its list, a comment above each saying
    its held-out figures; comments and layout of the rest kept (YAML), or the plain text converted to YAML first."""
    from cai.constitution.text import to_yaml
    from cai.studio.edits import CardEdit, apply_yaml

    text = to_yaml(constitution, source="learn") if base_format == "text" else base_text
    principles = [learned_principle(c["question"]) for c in offered]
    text = apply_yaml(text, [CardEdit(id=p.id, comparison=p.comparison, critique=p.critique, revision=p.revision)
                             for p in principles])
    for p, c in zip(principles, offered):
        note = [f"learned by cai constitution learn on {c['n_held_out']} held-out pairs (95% intervals, the change paired):",
                (f"  agreement {_estimate(c['agreement_before'])} -> {_estimate(c['agreement_with'])} with it, change "
                f"{_estimate(c['change'])}; alone {_estimate(c['agreement_alone'])}")]
        text = re.sub(rf"^(\s*)- id: {re.escape(p.id)}$", lambda m, note=note: "".join(f"{m.group(1)}# {n}\n" for n in note) + m.group(0),
                      text, count=1, flags=re.MULTILINE)
    return text


def _estimate(e: dict) -> str:
    if e.get("low") is None:
        return f"{e['value']:+.3f}" if "moved" in e else f"{e['value']:.3f}"
    sign = "+" if "moved" in e else ""
    return f"{e['value']:{sign}.3f} [{e['low']:{sign}.3f}, {e['high']:{sign}.3f}]"


def run_learn(job: LearnJob) -> dict:
    """Judge the pairs, ask for proposals, test them on the held-out pairs, and write OUT (atomically; the same
    settings give the same file, every answer then from the judge cache)."""
    import asyncio

    from cai.constitution import find_constitution, load_constitution
    from cai.human_labels import human_pairs
    from cai.judge import compare_all, open_judge
    from cai.judge_cache import default_cache_path
    from cai.judge_eval import placements

    if Path(job.out).suffix not in (".yaml", ".yml"):
        raise LearnError(f"--out {job.out}: the learned constitution is written as YAML; name it .yaml or .yml")
    check_pairs_file(job.pairs)
    path = find_constitution(job.constitution)
    constitution = load_constitution(path)
    pairs = human_pairs(job.pairs, job.limit, job.seed)
    if len(pairs) < 2:
        raise LearnError(f"{job.pairs}: {len(pairs)} pair(s) short enough to judge (each pair is kept to 1500 characters); "
                         "learning needs at least 2")
    chosen_first = placements(pairs, job.seed)
    options = SuggestOptions(**job.model_dump(include=set(SuggestOptions.model_fields)))

    async def run() -> dict:
        async with open_judge(job, constitution=constitution, constitution_path=path, cache=job.judge_cache or default_cache_path(),
                              log_path=Path(job.out).with_suffix(".judge.log")) as judge:
            async def compare(reqs):
                return await compare_all(judge, reqs, "learn: pairs", chunk=16)

            async def propose(reqs):
                return await judge.propose_many(reqs)

            return await suggest(Asker(compare, propose), constitution, pairs, chosen_first, options)

    result = asyncio.run(run())
    base_format = "text" if path.suffix in TEXT_SUFFIXES else "yaml"
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, annotated_yaml(path.read_text(encoding="utf-8"), constitution, base_format, result["offered"]))
    report = {"constitution": str(path), "pairs": job.pairs, "settings": options.model_dump(), **result}
    write_text_atomic(out.with_suffix(".learn.json"), json.dumps(report, indent=2))
    return {"out": str(out), **report}
