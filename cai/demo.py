"""`cai demo`: the stages that exist so far, end to end, on the embedded default model.

1. load and check the constitution, load real prompts (Do-Not-Answer + MT-Bench),
2. the policy answers them (transformers, batched),
3. a real judge server (vLLM) critiques each answer against a sampled principle and revises it,
4. the judge compares the first answer with the revision in both orders (the soft label),
5. everything is written to OUT/demo.jsonl with its provenance.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from cai.constitution import find_constitution, load_constitution
from cai.judge import Judge, first_error
from cai.judge_client import JudgeClient, judge_endpoint
from cai.policy import Policy, SamplingConfig
from cai.prompts import load_prompts
from judge_server import protocol as P

logger = logging.getLogger(__name__)


async def _judge_all(url: str, constitution, rows: list[dict], seed: int) -> None:
    gen = P.GenerationOptions(max_tokens=96)
    async with JudgeClient(url) as client:
        judge = await Judge.connect(client, None, constitution)
        crits = await judge.critique_many([P.CritiqueRequest(prompt=r["prompt"], response=r["response"], seed=seed, generation=gen)
                                           for r in rows])
        first_error(crits)
        revs = await judge.revise_many([
            P.ReviseRequest(prompt=r["prompt"], response=r["response"], critique=c.critique, principle_id=c.principle_id, seed=seed, generation=gen)
            for r, c in zip(rows, crits)
        ])
        first_error(revs)
        labels = await judge.compare_many([
            P.CompareRequest(prompt=r["prompt"], response_a=P.or_placeholder(v.revision), response_b=r["response"], seed=seed)
            for r, v in zip(rows, revs)
        ])
        first_error(labels)
    for row, c, v, lab in zip(rows, crits, revs, labels):
        row.update(principle_id=c.principle_id, critique=c.critique, revision=v.revision, p_revision_better=lab.p_a,
                   p_shown_first=lab.p_a_shown_first, p_shown_second=lab.p_a_shown_second, compare_principles=lab.principle_ids,
                   constitution_hash=c.constitution_hash, judge_model=c.model)


def run_demo(*, model: str, constitution: str, prompts: str, n: int, out: Path, seed: int = 0, judge_url: str | None = None) -> Path:
    const_path = find_constitution(constitution)
    const = load_constitution(const_path)
    chosen = load_prompts(prompts, limit=n, seed=seed, shuffle=True)
    logger.info("constitution %s (%s), %d prompts from %s", const.name, const.short_hash, len(chosen), prompts)

    logger.info("policy %s answers %d prompts", model, len(chosen))
    # transformers here: for a handful of prompts vLLM's 30 s engine start costs more than it saves.
    policy = Policy(model)
    samples = policy.sample([p.text for p in chosen], n=1, config=SamplingConfig(max_new_tokens=96, temperature=0.0), seed=seed)
    answers = [P.or_placeholder(s[0].text) for s in samples]
    policy.close()
    rows = [{"id": p.id, "prompt": p.text, "category": p.category, "response": a, "policy_model": model, "seed": seed}
            for p, a in zip(chosen, answers)]

    out.mkdir(parents=True, exist_ok=True)
    if judge_url is None:
        logger.info("starting the judge server (vLLM, %s); the first start takes about a minute", model)
    with judge_endpoint(judge_url, model=model, constitution=const_path, log_path=out / "judge.log") as url:
        asyncio.run(_judge_all(url, const, rows, seed))

    path = out / "demo.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
