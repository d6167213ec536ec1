"""The judge on OpenAI-compatible servers (`--backend openai`): the same answers as the in-process engine, over HTTP.

With the model's tokenizer (`CompletionsEngine`): the judge applies the chat template itself and
sends the exact prompt ids to `/v1/completions`. The option probabilities are read exactly where
the server allows it (vLLM's `logprob_token_ids`: the log-softmax of exactly the option tokens,
the same numbers the in-process engine reads); otherwise from the top-20 log-probabilities, with
`option_mass` saying how much of the options was seen.

Without it (`ChatEngine`): `/v1/chat/completions`, the server's own chat template; the assistant
turn is opened with the judge's prefix by a final assistant message the server continues
(`continue_final_message`, a vLLM and SGLang extension), and options are read from the top-20
log-probabilities of the first token; a second token (the "0" of a rating "10" written "1", "0")
is read by appending the first to the prefix and asking again.

Every answer is checked for the shape the API promises; anything else is that request's
`BackendError`, naming the backend.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from judge_server.backends import Backend, BackendError, BackendPool, backend_keys, check_key_transport, scrubbed
from judge_server.engine import Engine, Generation, Prompt, TokenizedEngine, logsumexp
from judge_server.settings import BACKEND_KEY_ENV, ServerSettings

logger = logging.getLogger(__name__)
TOP_K = 20  # the most log-probabilities OpenAI's API (and vLLM's default cap) returns per position


def start_openai_engine(settings: ServerSettings) -> Engine:
    """The engine for `--backend openai`: completions with the tokenizer when it can be loaded, chat completions otherwise."""
    b = settings.backends
    keys = backend_keys(b.backend_url, b.backend_key_file, BACKEND_KEY_ENV)
    check_key_transport(b.backend_url, keys, b.backend_allow_http_key)
    pool = BackendPool(b.backend_url, keys, timeout=b.backend_timeout, check_every=b.backend_check_every)
    tokenizer = None if b.backend_api == "chat" else _tokenizer(b.backend_tokenizer or b.backend_model, required=b.backend_api == "completions")
    if tokenizer is None:
        logger.info("judge backend: %s by chat completions on %d server(s)", b.backend_model, len(pool.backends))
        return ChatEngine(pool, b.backend_model, settings.max_new_tokens)
    logger.info("judge backend: %s by completions (exact prompt ids) on %d server(s)", b.backend_model, len(pool.backends))
    return CompletionsEngine(pool, tokenizer, b.backend_model, settings.max_prompt_tokens, settings.max_new_tokens)


def _tokenizer(name: str, *, required: bool):
    from cai.errors import ModelResolutionError
    from cai.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError, ModelResolutionError) as e:
        if required:
            raise ModelResolutionError(f"--backend-api completions needs the tokenizer of {name!r}, which cannot be loaded here "
                                       f"({type(e).__name__}); give --backend-tokenizer FOLDER, or use --backend-api chat") from None
        logger.warning("no tokenizer for %r here (%s): using chat completions, with top-%d option log-probabilities", name,
                       type(e).__name__, TOP_K)
        return None
    if tokenizer.chat_template is None:
        raise ModelResolutionError(f"tokenizer {name!r} has no chat template; the judge needs an instruction-tuned model")
    return tokenizer


class _Remote:
    """What both remote engines share: the pool, counting tokens from `usage`, checking answers' shapes."""

    pool: BackendPool

    def _count(self, doc: dict, prompt_tokens: int | None = None) -> tuple[int, int]:
        usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
        p = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else (prompt_tokens or 0)
        c = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else 0
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        self.prompt_tokens_total += p
        self.completion_tokens_total += c
        self.cached_tokens_total += cached if isinstance(cached, int) and 0 <= cached <= p else 0
        return p, c

    def backend_states(self) -> list[dict]:
        return self.pool.states()

    async def aclose(self) -> None:
        await self.pool.aclose()


def _choice(backend: Backend, doc: dict, path: str) -> dict:
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError(backend.name, f"answer of {path} has no choices")
    return choices[0]


def _number(backend: Backend, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-6:
        raise BackendError(backend.name, f"{what} is {scrubbed(repr(value), backend.key, 60)}, not a log-probability")
    return float(value)


class CompletionsEngine(_Remote, TokenizedEngine):
    def __init__(self, pool: BackendPool, tokenizer, model_name: str, max_prompt_tokens: int, max_new_tokens: int):
        super().__init__(tokenizer, model_name, max_prompt_tokens, max_new_tokens)
        self.pool = pool
        self.exact = True  # the server takes logprob_token_ids; False once it showed it does not

    async def generate(self, prompt: Prompt, *, max_tokens: int, temperature: float, seed: int) -> Generation:
        body = {"model": self.model_name, "prompt": prompt.ids, "max_tokens": min(max_tokens, self.max_new_tokens),
                "temperature": temperature}
        if temperature > 0:
            body["seed"] = seed
        backend, doc = await self.pool.post("/v1/completions", body)
        text = _choice(backend, doc, "/v1/completions").get("text")
        if not isinstance(text, str):
            raise BackendError(backend.name, "answer of /v1/completions has no text")
        _, completion = self._count(doc, len(prompt.ids))
        return Generation(text=text.strip(), prompt_tokens=len(prompt.ids), completion_tokens=completion)

    async def token_logprobs(self, prompt_ids: list[int], token_ids: list[int]) -> dict[int, float]:
        if self.exact:
            body = {"model": self.model_name, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
                    "logprob_token_ids": list(token_ids), "return_tokens_as_token_ids": True}
            try:
                backend, doc = await self.pool.post("/v1/completions", body)
                seen = self._read(backend, doc)
            except BackendError as e:
                if "HTTP 4" not in str(e) or not any(w in str(e) for w in ("logprob_token_ids", "return_tokens_as_token_ids", "xtra")):
                    raise
                seen = None  # a server without vLLM's extension refused it
            if seen is not None and all(t in seen for t in token_ids):
                self._count(doc, len(prompt_ids))
                return seen
            logger.warning("the judge backend does not return chosen tokens' log-probabilities (vLLM's logprob_token_ids): "
                           "reading the top %d instead; option_mass shows how much of the options was seen", TOP_K)
            self.exact = False
        body = {"model": self.model_name, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0.0, "logprobs": TOP_K}
        backend, doc = await self.pool.post("/v1/completions", body)
        seen = self._read(backend, doc)
        self._count(doc, len(prompt_ids))
        return {t: seen.get(t, -math.inf) for t in token_ids}

    def _read(self, backend: Backend, doc: dict) -> dict[int, float]:
        """The first position's {token id: log-prob}; keys as 'token_id:N' (vLLM) or token text (matched by decoding)."""
        logprobs = _choice(backend, doc, "/v1/completions").get("logprobs")
        top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(top, list) or not top or not isinstance(top[0], dict):
            raise BackendError(backend.name, "answer of /v1/completions has no log-probabilities (is logprobs supported?)")
        out: dict[int, float] = {}
        for key, value in top[0].items():
            lp = _number(backend, value, f"log-probability of token {scrubbed(repr(key), backend.key, 40)}")
            if isinstance(key, str) and key.startswith("token_id:") and key[9:].isdigit():
                out[int(key[9:])] = lp
            elif (tid := self._id_of_text(key)) is not None:
                out[tid] = lp
        return out

    def _id_of_text(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else []
        return ids[0] if len(ids) == 1 else None


class ChatEngine(_Remote, Engine):
    def __init__(self, pool: BackendPool, model_name: str, max_new_tokens: int):
        self.pool = pool
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0

    def encode(self, messages: list[dict[str, str]], assistant_prefix: str = "", what: str = "") -> Prompt:
        return Prompt(messages, assistant_prefix)  # the server applies its template and checks the length

    def _body(self, prompt: Prompt, **extra) -> dict:
        body = {"model": self.model_name, "messages": list(prompt.messages), **extra}
        if prompt.prefix:  # open the assistant's turn with the prefix: the server continues it
            body["messages"].append({"role": "assistant", "content": prompt.prefix})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    async def generate(self, prompt: Prompt, *, max_tokens: int, temperature: float, seed: int) -> Generation:
        extra = {"max_tokens": min(max_tokens, self.max_new_tokens), "temperature": temperature}
        if temperature > 0:
            extra["seed"] = seed
        backend, doc = await self.pool.post("/v1/chat/completions", self._body(prompt, **extra))
        message = _choice(backend, doc, "/v1/chat/completions").get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise BackendError(backend.name, "answer of /v1/chat/completions has no message content")
        p, c = self._count(doc)
        return Generation(text=text.strip(), prompt_tokens=p, completion_tokens=c)

    async def option_logprobs(self, prompt: Prompt, options: list[str]) -> list[float]:
        top = await self._top(prompt)
        return [logsumexp([lp for token, lp in top if token in (o, " " + o)]) for o in options]

    async def continued_logprobs(self, prompt: Prompt, first: str, then: str) -> tuple[float, float]:
        """The server cannot be handed a token, only text: each spelling of `first` seen in the top 20 is appended to the
        assistant's prefix, which the server continues, and `then` is read from the top 20 after it. One that does not
        show `then` there is unseen (its share is below the 20th log-probability, but not known)."""
        top = await self._top(prompt)
        firsts = [(token, lp) for token, lp in top if token in (first, " " + first)]
        after = await asyncio.gather(*(self._top(Prompt(prompt.messages, prompt.prefix + token)) for token, _ in firsts))
        seen = [(lp, logsumexp([n for t, n in nxt if t == then])) for (_, lp), nxt in zip(firsts, after)]
        return logsumexp([a + b for a, b in seen if b > -math.inf]), logsumexp([a for a, b in seen if b == -math.inf])

    async def _top(self, prompt: Prompt) -> list[tuple[str, float]]:
        """The top-20 (token text, log-prob) of the first position after the prompt."""
        body = self._body(prompt, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=TOP_K)
        backend, doc = await self.pool.post("/v1/chat/completions", body)
        logprobs = _choice(backend, doc, "/v1/chat/completions").get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        top = content[0].get("top_logprobs") if isinstance(content, list) and content and isinstance(content[0], dict) else None
        if not isinstance(top, list):
            raise BackendError(backend.name, "answer of /v1/chat/completions has no top log-probabilities (is logprobs supported?)")
        self._count(doc)
        out = []
        for entry in top:
            if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
                raise BackendError(backend.name, "a top log-probability of /v1/chat/completions has no token")
            out.append((entry["token"], _number(backend, entry.get("logprob"),
                                                f"log-probability of token {scrubbed(repr(entry['token']), backend.key, 40)}")))
        return out
