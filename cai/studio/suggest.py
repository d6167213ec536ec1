"""The studio's "where the judge and people disagree" panel and its suggest action (`cai.constitution.learn`).

Both read the last against-people run: its pairs' answers come again from the judge cache (scoped per principle,
as `StudioJudge.measure` stored them), so listing the disagreements asks the judge nothing. Suggest asks the judge
model for proposals and judges the held-out pairs under each new question (cached by the question's text), then
offers the ones that help; accepting one is a save of a new card (the page's PUT /api/constitution, with its version
check), so nothing here writes a file.
"""

from __future__ import annotations

import hashlib

from cai.constitution import Constitution
from cai.constitution.learn import Asker, SuggestOptions, disagreements, judge_all, learned_principle, suggest
from cai.studio.judging import PeopleBench, StudioJudge, _scope
from cai.studio.state import ConstitutionFile
from judge_server import protocol as P

SHOWN = 20
"""Disagreements listed in the page, most confident first."""


class NotMeasured(LookupError):
    """No against-people run has finished in this session: nothing to read disagreements from."""


def _asker(judge: StudioJudge, constitution: Constitution) -> Asker:
    principles = {p.id: p for p in constitution.principles}

    def scope(req: P.CompareRequest) -> str:
        if req.comparison is not None:
            return "question:" + hashlib.sha256(req.comparison.encode("utf-8")).hexdigest()
        return _scope(principles[req.principle_ids[0]], None)

    async def compare(reqs: list[P.CompareRequest]) -> list[P.CompareResult]:
        return await judge._ask("compare", constitution, reqs, [scope(r) for r in reqs], P.CompareResult)

    async def propose(reqs: list[P.ProposeRequest]) -> list[P.ProposeResult]:
        # a proposal's own error (its one pair too long, say) stays in its place: the other proposals go on, as in the command
        return await judge._ask("propose", constitution, reqs, ["propose"] * len(reqs), P.ProposeResult, errors_in_place=True)

    return Asker(compare, propose)


def _measured(file: ConstitutionFile, bench: PeopleBench) -> Constitution:
    if bench.last is None or file.versions[bench.last].rows is None:
        raise NotMeasured("measure the constitution against people first (the Against people tab): disagreements come from "
                          "that run")
    return file.versions[bench.last].constitution


async def disagreement_list(judge: StudioJudge, file: ConstitutionFile, bench: PeopleBench, limit: int = SHOWN) -> dict:
    """The pairs of the last against-people run where the judge is most confidently against people, to read."""
    constitution = _measured(file, bench)
    rows, by_pair = await judge_all(_asker(judge, constitution), constitution, bench.pairs, bench.chosen_first, bench.seed)
    found = disagreements(bench.pairs, rows, by_pair, bench.chosen_first)
    return {"version": constitution.hash, "n_pairs": len(bench.pairs), "n_disagree": len(found), "pairs": found[:limit]}


async def suggestions(judge: StudioJudge, file: ConstitutionFile, bench: PeopleBench, options: SuggestOptions) -> dict:
    """Proposals for the last measured version, each tested on the held-out pairs; `offered` holds those that help, each
    with the card fields a save adds."""
    constitution = _measured(file, bench)
    ask = _asker(judge, constitution)
    measured = await judge_all(ask, constitution, bench.pairs, bench.chosen_first, bench.seed)
    result = await suggest(ask, constitution, bench.pairs, bench.chosen_first, options, measured)
    for c in result["offered"]:
        c["card"] = learned_principle(c["question"]).model_dump(exclude={"weight"})
    return {"version": constitution.hash, **result}
