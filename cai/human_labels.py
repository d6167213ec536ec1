"""People's labels as the yardstick of a judge: the human-labelled pairs `cai eval` and `cai judge eval` read
(a shipped set or a user's file, HH-RLHF transcripts or prompt/chosen/rejected rows with an optional soft
label `p_chosen`, the share of people preferring chosen), and how a judge's verdict on one is counted
against the people's majority."""

from __future__ import annotations

from pathlib import Path

from cai import intervals

BUILTIN_HUMAN_PAIRS = {"hh-harmless": Path(__file__).parent / "data" / "hh_harmless_pairs.jsonl"}
"""Human-labelled pairs shipped with cai (cai/data/README.md says where they come from)."""


def human_pairs(path: str, limit: int, seed: int) -> list[dict]:
    """Up to `limit` human-labelled pairs (prompt, chosen, rejected), short enough to judge, in a seeded order."""
    import random

    from cai.train.data import DatasetError, hh_pairs_from_rows, load_rows

    if path in BUILTIN_HUMAN_PAIRS:
        path = str(BUILTIN_HUMAN_PAIRS[path])
    elif not Path(path).is_file():
        raise DatasetError(f"{path}: no such file (human_pairs takes a .jsonl or .jsonl.gz of labelled pairs, "
                           f"or a built-in set: {', '.join(BUILTIN_HUMAN_PAIRS)})")
    try:
        rows = load_rows(path)
        if rows and "prompt" not in rows[0]:  # HH-RLHF: whole transcripts in chosen/rejected
            rows = hh_pairs_from_rows(rows)
        pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
        for n, (row, pair) in enumerate(zip(rows, pairs), start=1):  # an optional soft label: the share of people preferring chosen
            if "p_chosen" in row:
                label = row["p_chosen"]
                if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
                    raise DatasetError(f"{path}: row {n}: p_chosen must be a number from 0 to 1 (the share of people preferring "
                                       f"chosen), got {label!r}")
                pair["p_chosen"] = float(label)
    except KeyError as e:
        raise DatasetError(f"{path}: a row has no {e} field; human_pairs needs prompt/chosen/rejected or HH-RLHF "
                           "chosen/rejected transcripts") from None
    pairs = [p for p in pairs if len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) <= 1500]
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def agreement(p_judge_chosen: float, p_people_chosen: float) -> float:
    """1.0 when the judge sides with the people's majority, 0.0 when against it, 0.5 when the judge is
    undecided (exactly 0.5: what a fully position-biased judge gives). The people's side is "chosen" when
    p_people_chosen >= 0.5, as the reward model's held-out accuracy reads its labels (cai.train.tasks.rm_metrics)."""
    if p_judge_chosen == 0.5:
        return 0.5
    return float((p_judge_chosen > 0.5) == (p_people_chosen >= 0.5))


def human_agreement(results: list, labelled: list[dict]) -> dict:
    """How often the judge sided with the people's majority on the labelled pairs (chosen shown as A), a judge
    tie counting half, as `cai judge eval` counts it; with its Wilson interval."""
    return intervals.rate([agreement(r.p_a, pair.get("p_chosen", 1.0)) for r, pair in zip(results, labelled, strict=True)]).as_dict()
