"""Is the judge's revision a revision? The guard `cai generate sft` applies before a revision replaces the answer.

A small judge often writes something that is not a revision: the answer back unchanged, a repetition
loop, a fragment ("I cannot."), the user's prompt, its own critique, the constitution's few-shot
example, or its instructions ("Critique request: ..."). Each would teach SFT to answer that way, so
`rejected_revision` names what a revision is instead, judged from the text alone:

- changed from the answer: at least MIN_CHANGED_WORDS words differ (punctuation and case aside; a
  tail the token limit cut off does not count as a change);
- not a loop: at least MIN_DISTINCT_SHARE of its word 4-grams are distinct, and no run of LOOP_RUN
  words comes twice;
- long enough to be an answer: at least MIN_WORDS words;
- not a copy of the prompt, the few-shot example or the critique: under COPY_SHARE of its word
  4-grams occur there, and no run of LOOP_RUN words from the critique speaks of the user, the
  response or the assistant. Text the critique puts in double quotes is a suggested wording and may
  be adopted; only the critique's own analysis counts as a copy;
- speaks to the user, not about the answer: its opening does not discuss "the response", "the
  assistant" or "the user" as a critique does ("The response is harmful because ...").

It cannot tell a harmful revision from a harmless one; the judge's critique is for that. Its errors,
measured on real SmolLM2-135M revisions labelled by hand, are in GUARD_TEST_SET.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from cai.constitution import Constitution

COPY_SHARE = 0.5
"""A revision whose word 4-grams are at least this share found in the prompt, the few-shot example or the critique's
analysis is a copy of it."""

MIN_WORDS = 4
"""Fewer words than this is not an answer ("I cannot.", "The")."""

MIN_CHANGED_WORDS = 2
"""Fewer words changed than this (a cut-off tail aside) is the answer back, not a revision."""

MIN_DISTINCT_SHARE = 0.5
"""A revision with fewer distinct word 4-grams than this share of them is a repetition loop."""

LOOP_RUN = 8
"""A run of this many words said twice is a loop too (a sentence repeated), as is one taken from the critique's analysis
that speaks of the user, the response or the assistant."""

TEMPLATE_MARKERS = ("critique request:", "revision request:", "reply with the revised response only",
                    "here is a conversation between a user and an ai assistant")
"""Phrases of the judge's own prompts (judge_server/templates.py): a revision holding one copies its instructions."""

_META = re.compile(r"\b(?:the|this|that) (?:assistant'?s? ?|original |previous |revised |last |ai'?s? )?"
                   r"(?:response|revision|critique|assistant)\b|\bthe user\b|\brevised version\b")
_META_OPENING = 120  # characters: a critique states its subject first; an answer may mention "the response" later

GUARD_TEST_SET = {"real": {"labelled": 88, "good": 2, "missed": 6, "false_alarms": 0},
                  "hand-written": {"labelled": 11, "good": 6, "missed": 1, "false_alarms": 1}}
"""The guard on tests/data/revisions_labelled.jsonl (each revision labelled by hand; a test recounts it). Of 88 real
SmolLM2-135M revisions, 86 are not revisions: it lets 6 through (7%): edits that keep the answer's substance or
fabrications ("the answer shortened, keeping its fabricated facts"), a critique sentence spliced in, a request that
asks the user back. Of the 2 good ones it rejects neither, too few to bound its false alarms; so 11 hand-written hard
cases (6 good): it rejects a good answer opening "The user manual's method ..." and lets through the critique
paraphrased ("This answer is harmful because ..."). The guard at 37624ad missed 27 of the 86."""

_META_WORDS = {"user", "user's", "response", "response's", "assistant", "assistant's", "ai", "ai's", "critique", "revision"}
_QUOTED = re.compile(r"\"[^\"]*\"|\u201c[^\u201d]*\u201d")
_WORD = re.compile(r"[^\w']+")


def _words(text: str) -> list[str]:
    return [w for w in (_WORD.sub("", t) for t in text.lower().split()) if w]


def _four_grams(words: list[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + 4]) for i in range(len(words) - 3)]


def _runs(words: list[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + LOOP_RUN]) for i in range(len(words) - LOOP_RUN + 1)]


def copied_share(text: str, source: str) -> float:
    """The share of `text`'s word 4-grams that also occur in `source` (0 for a text under four words)."""
    grams = set(_four_grams(_words(text)))
    return len(grams & set(_four_grams(_words(source)))) / len(grams) if grams else 0.0


def changed_words(revision: str, answer: str) -> int:
    """Words inserted, deleted or replaced going from `answer` to `revision`, not counting the answer's tail
    missing at the end (both are cut at a token limit, at different places)."""
    a, b = _words(answer), _words(revision)
    ops = [op for op in SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if ops and ops[-1][2] == len(a) and ops[-1][4] == len(b) and _cut_from(b[ops[-1][3]:], a[ops[-1][1]:]):
        ops.pop()
    return sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in ops)


def _cut_from(tail: list[str], full: list[str]) -> bool:
    """`tail` is the start of `full`, cut off there (its last word may be cut in the middle)."""
    if len(tail) > len(full) or tail[:-1] != full[:len(tail) - 1]:
        return False
    return not tail or full[len(tail) - 1].startswith(tail[-1])


def rejected_revision(revision: str, *, answer: str, prompt: str, critique: str, constitution: Constitution) -> str | None:
    """Why `revision` (of `answer` to `prompt`, after `critique`) is not a revision, or None when it is one."""
    words = _words(revision)
    if not words:
        return "empty"
    lowered = " ".join(revision.lower().split())
    if any(marker in lowered for marker in TEMPLATE_MARKERS):
        return "copies the judge's instructions"
    if len(words) < MIN_WORDS:
        return "too short to be an answer"
    grams = _four_grams(words)
    runs = _runs(words)
    if (grams and len(set(grams)) < MIN_DISTINCT_SHARE * len(grams)) or len(set(runs)) < len(runs):
        return "repetition loop"
    if changed_words(revision, answer) < MIN_CHANGED_WORDS:
        return "unchanged"
    if words == _words(prompt) or copied_share(revision, prompt) >= COPY_SHARE:
        return "copies the prompt"
    examples = "\n".join(f"{e.prompt}\n{e.response}\n{e.critique}\n{e.revision}" for e in constitution.examples)
    if examples and copied_share(revision, examples) >= COPY_SHARE:
        return "copies the constitution's few-shot example"
    analysis = _QUOTED.sub(" ", critique)
    shared_runs = set(runs) & set(_runs(_words(analysis)))
    if copied_share(revision, analysis) >= COPY_SHARE or any(_META_WORDS & set(run) for run in shared_runs):
        return "repeats the critique"
    if _META.search(lowered[:_META_OPENING]):
        return "comments on the answer instead of answering"
    return None
