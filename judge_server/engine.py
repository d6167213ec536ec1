"""The judge's only inference path: a vLLM async engine in the server process.

`JudgeEngine` turns chat messages into token ids (the model's own chat template), generates
text, and reads the log-probabilities of chosen next tokens (vLLM's `logprob_token_ids`, which
returns the raw log-softmax of exactly the tokens asked for, wherever they rank).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

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


class JudgeEngine:
    """Wraps `vllm.v1.engine.async_llm.AsyncLLM`; construct with `JudgeEngine.start(settings)`."""

    def __init__(self, llm, tokenizer, model_name: str, max_prompt_tokens: int, max_new_tokens: int):
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self._ids = itertools.count()

    @classmethod
    def start(cls, settings) -> JudgeEngine:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from cai.models import ModelResolutionError, resolve_model, vllm_engine_args

        resolved = resolve_model(settings.model)
        engine = vllm_engine_args(max_model_len=settings.max_model_len, kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=0.85,
                                  dtype=settings.dtype)
        args = AsyncEngineArgs(model=resolved.path, seed=settings.seed, **engine)
        logger.info("starting vLLM engine for %s (%s, %s)", settings.model, resolved.path, engine["dtype"])
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        if tokenizer.chat_template is None:
            raise ModelResolutionError(f"model {settings.model} has no chat template; the judge needs an instruction-tuned model")
        return cls(llm, tokenizer, settings.model, settings.max_prompt_tokens, settings.max_new_tokens)

    def shutdown(self) -> None:
        self.llm.shutdown()

    # -- prompts ------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, str]], assistant_prefix: str = "", what: str = "") -> list[int]:
        """Chat-template the messages, open the assistant turn, append a prefix; check the length."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.max_prompt_tokens, what)
        return ids

    def token_ids(self, text: str) -> list[int]:
        """Ids of the single-token spellings of `text` (with and without a leading space)."""
        out = []
        for variant in (text, " " + text):
            ids = self.tokenizer.encode(variant, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return out

    # -- inference ----------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], *, max_tokens: int, temperature: float, seed: int) -> Generation:
        from vllm import SamplingParams

        max_tokens = min(max_tokens, self.max_new_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed if temperature > 0 else None)
        final = await self._run(prompt_ids, params)
        out = final.outputs[0]
        self.completion_tokens_total += len(out.token_ids)
        return Generation(text=out.text.strip(), prompt_tokens=len(prompt_ids), completion_tokens=len(out.token_ids))

    async def next_token_logprobs(self, prompt_ids: list[int], token_ids: list[int]) -> dict[int, float]:
        """Raw log P(next token = t) for each t in token_ids (one forward step, no sampling)."""
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
        return final

