"""Preference pairs from critique -> revision rows: chosen = the final revision, rejected = the first answer.

This is the preference set the CAI paper's supervised stage yields for free (and Hugging Face's
Constitutional AI recipe trains on): it needs no comparison ability from the judge, only the ability
to revise, so it is what a user with a small or position-biased judge should train the reward model
or DPO on. `cai generate sft` writes these pairs beside its SFT rows (revision_pairs.jsonl and the
`datasets` folder revision-pairs/); `cai run` uses them with `prefs.source: revisions` (or `both`).

Each pair has `prompt, chosen, rejected` as TRL expects, `p_chosen` 1.0 (a hard label: the judge's
own revision is taken as better), `source: revision` and provenance: the SFT row's (constitution
hash, policy and judge model, seed) plus the principles applied and the number of rounds. A row
whose revision is empty or equals the first answer states no preference and gives no pair.
"""

from __future__ import annotations

from collections.abc import Iterable

from judge_server.protocol import or_placeholder


def revision_pairs(rows: Iterable[dict]) -> list[dict]:
    """The pairs of the finished (status ok) `cai generate sft` rows, in their order."""
    return [pair for row in rows if (pair := revision_pair(row)) is not None]


def revision_pair(row: dict) -> dict | None:
    """The pair of one `cai generate sft` row, or None where it gives none (not finished, or no preference stated)."""
    if row.get("status") != "ok":
        return None
    first, final = or_placeholder(row.get("initial_response") or ""), (row.get("final_response") or "").strip()
    if not final or final == first.strip():
        return None
    trajectory = row.get("trajectory") or []
    return {
        "id": row["id"], "prompt": row["prompt"], "chosen": final, "rejected": first, "p_chosen": 1.0, "source": "revision",
        "provenance": {**(row.get("provenance") or {}), "source": "revision", "rounds": len(trajectory),
                       "principle_ids": [t["principle_id"] for t in trajectory]},
    }
