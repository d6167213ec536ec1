"""What the judge does: critique, revise, compare and score, for a principle of the constitution.

Compare judges both orders - (A)=response_a then (A)=response_b - and averages P(response_a
better), so a judge that prefers a position cancels out; each order's probability is returned
so that bias stays visible. Labels come from the option tokens' probabilities renormalised over
the options; `option_mass` says how much probability the judge put on the options at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from contextlib import contextmanager

from cai.constitution import Constitution, Principle
from judge_server import protocol as P
from judge_server import templates
from judge_server.constitutions import ConstitutionStore
from judge_server.engine import Engine, Prompt, PromptTooLongError


class OverloadedError(RuntimeError):
    def __init__(self, depth: int, asked: int, limit: int):
        super().__init__(f"judge queue is full ({depth} in flight + {asked} asked > {limit}); retry after a short wait")


class JudgeService:
    def __init__(self, engine: Engine, store: ConstitutionStore, max_queue: int):
        self.engine = engine
        self.store = store
        self.max_queue = max_queue
        self.pending = 0  # admitted work items not yet answered

    @contextmanager
    def admit(self, n_items: int):
        """Refuse (429) rather than queue without bound: a full judge answers fast that it is full."""
        if self.pending + n_items > self.max_queue:
            raise OverloadedError(self.pending, n_items, self.max_queue)
        self.pending += n_items
        try:
            yield
        finally:
            self.pending -= n_items

    # -- endpoints ------------------------------------------------------------------------
    async def critique(self, req: P.CritiqueRequest) -> P.CritiqueResult:
        c = self.store.get(req.constitution_hash)
        principle = self._pick(c, req.principle_id, req.seed, req.prompt, req.response)
        prompt = self._encode_with_examples(lambda k: templates.critique_messages(c, principle, req.prompt, req.response, k), "critique")
        gen = await self.engine.generate(prompt, max_tokens=req.generation.max_tokens, temperature=req.generation.temperature, seed=req.seed)
        return P.CritiqueResult(critique=gen.text, principle_id=principle.id, constitution_hash=c.hash, model=self.engine.model_name,
                                prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)

    async def revise(self, req: P.ReviseRequest) -> P.ReviseResult:
        c = self.store.get(req.constitution_hash)
        principle = c.principle(req.principle_id)
        prompt = self._encode_with_examples(
            lambda k: templates.revision_messages(c, principle, req.prompt, req.response, req.critique, k), "revision")
        gen = await self.engine.generate(prompt, max_tokens=req.generation.max_tokens, temperature=req.generation.temperature, seed=req.seed)
        return P.ReviseResult(revision=gen.text, principle_id=principle.id, constitution_hash=c.hash, model=self.engine.model_name,
                              prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)

    async def propose(self, req: P.ProposeRequest) -> P.ProposeResult:
        c = self.store.get(req.constitution_hash)
        shown = [(p.prompt, p.preferred, p.other) for p in req.pairs]
        while True:  # the pairs are examples: drop them (last first) until the prompt fits, down to one
            try:
                prompt = self.engine.encode(templates.propose_messages(shown), templates.PROPOSE_PREFIX, what="proposal")
                break
            except PromptTooLongError:
                if len(shown) == 1:
                    raise
                shown.pop()
        gen = await self.engine.generate(prompt, max_tokens=req.generation.max_tokens, temperature=req.generation.temperature, seed=req.seed)
        # The continuation's first word can come without its space (decoded apart from the prefix), as the CoT prefix's does.
        text = templates.PROPOSE_PREFIX + (" " if gen.text[:1].isalnum() else "") + gen.text
        return P.ProposeResult(text=text, constitution_hash=c.hash, model=self.engine.model_name,
                               prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)

    async def compare(self, req: P.CompareRequest) -> P.CompareResult:
        c = self.store.get(req.constitution_hash)
        if self.engine.splits("A") or self.engine.splits("B"):
            raise RuntimeError(f"tokenizer of {self.engine.model_name} has no single token for 'A'/'B'")
        if req.comparison is not None:  # a proposed question under test: only its comparison text reaches the prompt
            principles = [Principle(id=P.PROPOSED_ID, critique="-", revision="-", comparison=req.comparison)]
        elif req.principle_ids:
            principles = [c.principle(pid) for pid in dict.fromkeys(req.principle_ids)]
        else:
            # Seeded by the unordered pair, so (a, b) and (b, a) are judged on the same principles.
            key = _content_key(req.seed, req.prompt, *sorted([req.response_a, req.response_b]))
            principles = c.sample_principles(min(req.n_principles, len(c.principles)), seed=key)
        votes = await asyncio.gather(*(self._vote(p, req) for p in principles))
        p_a = sum(v.p_a for v in votes) / len(votes)
        if (clamp := req.effective_clamp()) is not None:
            p_a = min(max(p_a, clamp[0]), clamp[1])
        first = sum(v.p_a_shown_first for v in votes) / len(votes)
        second = sum(v.p_a_shown_second for v in votes) / len(votes)
        return P.CompareResult(
            p_a=p_a, p_a_shown_first=first, p_a_shown_second=second, same_position=(first > 0.5) != (second > 0.5),
            option_mass=sum(v.option_mass for v in votes) / len(votes), votes=list(votes), principle_ids=[p.id for p in principles], constitution_hash=c.hash, model=self.engine.model_name,
        )

    async def score(self, req: P.ScoreRequest) -> P.ScoreResult:
        c = self.store.get(req.constitution_hash)
        principle = self._pick(c, req.principle_id, req.seed, req.prompt, req.response)
        prompt = self.engine.encode(templates.score_messages(principle, req.prompt, req.response), templates.SCORE_PREFIX, what="score")
        ratings = [str(r) for r in range(1, 11)]
        if any(self.engine.splits(r) for r in ratings[:9]):
            raise RuntimeError(f"tokenizer of {self.engine.model_name} has no single tokens for the digits 1-9")
        # A rating of 10 is one token ("10", " 10") or, with digit-by-digit tokenizers (Qwen, Gemma, Llama 2), "1" then "0": that
        # share of the first token "1" is a 10, not a 1.
        lp, (lp_ten, lp_unsplit) = await asyncio.gather(self.engine.option_logprobs(prompt, ratings),
                                                        self.engine.continued_logprobs(prompt, "1", "0"))
        probs = [math.exp(v) for v in lp]
        mass = sum(probs)
        moved = min(math.exp(lp_ten), probs[0])
        probs[0], probs[9] = probs[0] - moved, probs[9] + moved
        total = sum(probs)
        norm = [p / total for p in probs] if total > 0 else [0.1] * 10
        expected = sum((r + 1) * p for r, p in enumerate(norm))
        return P.ScoreResult(score=(expected - 5.5) / 4.5, expected_rating=expected, rating_probs=norm, option_mass=min(mass, 1.0),
                             unsplit_mass=min(math.exp(lp_unsplit), 1.0), principle_id=principle.id, constitution_hash=c.hash,
                             model=self.engine.model_name)

    # -- helpers --------------------------------------------------------------------------
    def _pick(self, c: Constitution, principle_id: str | None, seed: int, *content: str) -> Principle:
        if principle_id is not None:
            return c.principle(principle_id)
        return c.sample_principles(1, seed=_content_key(seed, *content))[0]

    def _encode_with_examples(self, build, what: str, most: int = 2) -> Prompt:
        """Few-shot examples are context, not content: drop them (last first) until the prompt fits."""
        for k in range(most, 0, -1):
            try:
                return self.engine.encode(build(k), what=what)
            except PromptTooLongError:
                continue
        return self.engine.encode(build(0), what=what)

    async def _vote(self, principle: Principle, req: P.CompareRequest) -> P.PrincipleVote:
        (pa1, mass1, why1), (pa2, mass2, why2) = await asyncio.gather(
            self._p_first_option(principle, req, req.response_a, req.response_b),
            self._p_first_option(principle, req, req.response_b, req.response_a),
        )
        shown_first, shown_second = pa1, 1.0 - pa2  # both: P(response_a is better)
        return P.PrincipleVote(
            principle_id=principle.id, p_a=(shown_first + shown_second) / 2, p_a_shown_first=shown_first,
            p_a_shown_second=shown_second, option_mass=(mass1 + mass2) / 2, rationales=[why1, why2] if req.cot else None,
        )

    async def _p_first_option(self, principle: Principle, req: P.CompareRequest, first: str, second: str) -> tuple[float, float, str]:
        """P(option A) renormalised over {A, B}, the raw mass on both, and the rationale (CoT)."""
        messages = templates.compare_messages(principle, req.prompt, first, second, req.cot)
        rationale = ""
        prefix = templates.COMPARE_PREFIX
        if req.cot:
            prompt = self.engine.encode(messages, templates.COT_PREFIX, what="comparison")
            gen = await self.engine.generate(prompt, max_tokens=req.cot_max_tokens, temperature=0.0, seed=req.seed)
            rationale = gen.text
            prefix = f"{templates.COT_PREFIX} {rationale}{templates.COT_ANSWER}"
        prompt = self.engine.encode(messages, prefix, what="comparison")
        lp_a, lp_b = await self.engine.option_logprobs(prompt, ["A", "B"])
        pa, pb = math.exp(lp_a), math.exp(lp_b)
        if pa + pb == 0.0:
            return 0.5, 0.0, rationale
        return pa / (pa + pb), pa + pb, rationale


def _content_key(seed: int, *parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return f"{seed}:{h.hexdigest()[:16]}"
