"""The judge's connections to OpenAI-compatible servers: one `Backend` per URL, a `BackendPool` over them.

A request goes to the healthy backend with the fewest requests in flight. What takes a backend out
is what says the backend is sick, not the request: it cannot be reached or times out; or it answers
5xx and then fails a health check, or answers 5xx to `SICK_AFTER` different requests in a row. A
request that gets 5xx from two backends is poison: it is answered with a `BackendError` (502) and
counts against no backend, however often a client retries it. A 429 is back-pressure: the request
goes to a backend that is not busy, or waits out the Retry-After (at most `MAX_RETRY_AFTER` s);
the backend stays in. A background health check (`/health`, else `/v1/models`) every
`backend_check_every` seconds takes out backends that fail it and brings back those that pass.
With none healthy (or all busy), a request waits for up to `backend_timeout` seconds, then fails
with `BackendUnavailableError`.

An answer that is not what the API promises (not JSON, HTML, wrong shape, no log-probabilities)
or a 4xx is that request's `BackendError`, naming the backend; it is not retried elsewhere (every
replica would say the same). Each backend's key is sent to that backend only, in its own client's
headers, and never over plain http to a host beyond loopback unless `backend_allow_http_key` says
so; no key is logged, echoed or put in an error message (every backend text in an error is
scrubbed of credentials and cut short), and redirects are not followed (a redirect would carry the
key to another host).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from cai.errors import CaiError
from judge_server.settings import is_loopback

logger = logging.getLogger(__name__)
SERVER_ERRORS = {500, 502, 503, 504}
SICK_AFTER = 3  # different requests answered 5xx in a row (health check passing) before a backend is taken out
MAX_RETRY_AFTER = 10.0  # seconds: the most a 429's Retry-After holds a backend back
MAX_SHOWN = 300  # characters of backend text an error message carries
# Credentials a server or proxy may echo: bearer tokens, "authorization:"/"api-key:" headers, OpenAI-style keys.
_SECRETS = re.compile(r"(?i)(bearer\s+|authorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?|api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"
                      r"|\bsk-[A-Za-z0-9_\-]{6,}")


def scrubbed(text: str, key: str | None = None, n: int = MAX_SHOWN) -> str:
    """Backend text fit for a client: without `key` or anything that looks like a credential, on one line, at most `n` chars."""
    if key:
        text = text.replace(key, "<key>")
    text = _SECRETS.sub(lambda m: (m.group(1) or "") + "<key>", " ".join(text.split()))
    return text if len(text) <= n else text[:n] + "..."


class BackendError(RuntimeError):
    """One request's failure at a backend that answered: the backend and what was wrong, never a key."""

    def __init__(self, backend: str, message: str):
        self.backend = backend
        super().__init__(f"{backend}: {scrubbed(message)}")


class InsecureBackendKeyError(CaiError, ValueError):
    """A backend key would go over plain http to a host beyond loopback; the message names the backend, never the key."""


class BackendUnavailableError(RuntimeError):
    def __init__(self, names: list[str], waited: float, last: str, flag: str = "backend"):
        who = "judge backend" if flag == "backend" else f"{flag} server"
        super().__init__(f"no {who} answered within {waited:.0f} s ({', '.join(names)}); "
                         f"last failure: {last}. Check that the servers are up, or add --{flag}-url replicas")


class BackendKeyError(CaiError, ValueError):
    """The backend key file cannot be used; the message names the file, never its content."""


def shown_url(url: str) -> str:
    """scheme://host:port/path: what logs and errors say of a backend (settings refuse credentials and queries)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}{p.path}"


def base_url(url: str) -> str:
    """The server's root, whether the user gave http://host:8000 or http://host:8000/v1."""
    return url.rstrip("/").removesuffix("/v1")


def backend_keys(urls: list[str], key_file: Path | None, env: str, flag: str = "backend") -> list[str | None]:
    """One key per URL: from `key_file` (one line for all, or one per URL), else the environment variable, else none.
    `flag` names the options in messages (--backend-url for the judge's backends, --policy-url for the policy's)."""
    if key_file is not None:
        try:
            lines = [line.strip() for line in Path(key_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise BackendKeyError(f"cannot read the backend key file {key_file}: {type(e).__name__}") from None
        if len(lines) == 1:
            return lines * len(urls)
        if len(lines) != len(urls):
            raise BackendKeyError(f"backend key file {key_file} has {len(lines)} keys for {len(urls)} backend URLs: "
                                  f"give one key for all, or one line per URL in the order of --{flag}-url")
        return lines
    key = os.environ.get(env, "").strip() or None
    return [key] * len(urls)


def check_key_transport(urls: list[str], keys: list[str | None], allow_http: bool, flag: str = "backend") -> None:
    """Refuse to send a key in clear text beyond this machine: http:// to a host that is not loopback, unless allowed."""
    for i, (url, key) in enumerate(zip(urls, keys)):
        host = urlsplit(url).hostname or ""
        if key and urlsplit(url).scheme == "http" and not is_loopback(host.strip("[]")) and not allow_http:
            raise InsecureBackendKeyError(
                f"backend {i + 1} ({shown_url(base_url(url))}) is plain http:// to a host beyond loopback: the backend API key "
                f"would cross the network in clear text. Use https://, or pass --{flag}-allow-http-key if that network is trusted")


@dataclass(eq=False)
class Backend:
    url: str
    index: int
    client: httpx.AsyncClient = field(repr=False)
    key: str | None = field(default=None, repr=False)  # only to keep it out of error messages; sent by `client`
    healthy: bool = True
    in_flight: int = 0
    failures: int = 0
    requests: int = 0
    busy_until: float = 0.0  # monotonic time its last 429 asked us to wait until
    failing: set[str] = field(default_factory=set, repr=False)  # requests (by body hash) answered 5xx since its last success

    @property
    def name(self) -> str:
        return f"backend {self.index + 1} ({shown_url(self.url)})"


class BackendPool:
    def __init__(self, urls: list[str], keys: list[str | None], *, timeout: float, check_every: float, flag: str = "backend",
                 key_env: str = "CAI_BACKEND_API_KEY"):
        self.timeout = timeout
        self.flag, self.key_hint = flag, f"check --{flag}-key-file or ${key_env}"  # what errors tell the user to look at
        self.check_every = check_every
        self.backends = [Backend(base_url(u), i, self._client(base_url(u), k, timeout), k) for i, (u, k) in enumerate(zip(urls, keys))]
        self._checker: asyncio.Task | None = None
        self._changed = asyncio.Event()

    @staticmethod
    def _client(url: str, key: str | None, timeout: float) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        return httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
                                 limits=limits, follow_redirects=False, trust_env=False)

    # -- health ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background health check (needs the running event loop)."""
        if self._checker is None:
            self._checker = asyncio.get_running_loop().create_task(self._check_forever(), name="backend-health")

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            await asyncio.gather(*(self.check(b) for b in self.backends))

    async def check(self, backend: Backend) -> bool:
        ok = await self._probe(backend)
        if ok != backend.healthy:
            self._mark(backend, ok, "passed a health check" if ok else "failed a health check")
        return ok

    async def _probe(self, backend: Backend) -> bool:
        timeout = min(5.0, self.timeout)
        try:
            resp = await backend.client.get("/health", timeout=timeout)
            if resp.status_code == 404:  # not vLLM: any OpenAI-compatible server lists its models
                resp = await backend.client.get("/v1/models", timeout=timeout)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    def _mark(self, backend: Backend, healthy: bool, why: str) -> None:
        if backend.healthy and not healthy:
            backend.failures += 1
            logger.warning("%s taken out: %s; its requests go to the others", backend.name, why)
        elif healthy and not backend.healthy:
            logger.info("%s back in: %s", backend.name, why)
        backend.healthy = healthy
        self._changed.set()

    def states(self) -> list[dict]:
        return [{"backend": b.name, "healthy": b.healthy, "in_flight": b.in_flight, "requests": b.requests, "failures": b.failures}
                for b in self.backends]

    # -- requests ---------------------------------------------------------------------------
    async def post(self, path: str, body: dict) -> tuple[Backend, dict]:
        """POST `body` to `path` of a healthy backend; the backend that answered and its JSON object."""
        self.start()
        deadline = time.monotonic() + self.timeout
        request = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        last = "none tried"
        failed_at: list[Backend] = []  # backends that answered this request 5xx
        while True:
            backend = self._pick(exclude=failed_at)
            if backend is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailableError([b.name for b in self.backends], self.timeout, last, self.flag)
                busy = [b.busy_until for b in self.backends if b.healthy and b not in failed_at]
                if busy:  # all busy (429): wait out the earliest Retry-After, with jitter so waiters don't come back at once
                    await asyncio.sleep(min(left, max(0.0, min(busy) - time.monotonic()) + random.uniform(0, 0.1)))
                    continue
                self._changed.clear()
                await self._wait_for_change(min(left, self.check_every))
                if self._pick(exclude=failed_at) is None:  # no change seen: probe now rather than wait for the checker
                    await asyncio.gather(*(self.check(b) for b in self.backends))
                continue
            backend.in_flight += 1
            backend.requests += 1
            try:
                resp = await backend.client.post(path, json=body)
            except httpx.HTTPError as e:  # unreachable or timed out: the backend, whatever the request
                last = f"{backend.name}: {type(e).__name__}"
                self._mark(backend, False, f"{type(e).__name__} on {path}")
                continue
            finally:
                backend.in_flight -= 1
            if resp.status_code == 429:
                backend.busy_until = time.monotonic() + _retry_after(resp)
                last = f"{backend.name}: HTTP 429 (busy)"
                continue
            if resp.status_code in SERVER_ERRORS:
                last = f"{backend.name}: HTTP {resp.status_code}"
                if failed_at and await self.check(backend):  # a second backend that passes its health check: the request is poison
                    self._forgive(request)
                    raise BackendError(backend.name, f"HTTP {resp.status_code} on {path}, as on {failed_at[0].name}: this request "
                                       f"fails on backends that pass their health checks ({_error_message(resp, backend.key)})")
                if failed_at or not await self._server_error(backend, request, resp.status_code, path):
                    continue  # sick after all: taken out, and the request goes to another
                failed_at.append(backend)
                if not any(b.healthy and b not in failed_at for b in self.backends):  # no second opinion to ask
                    raise BackendError(backend.name, f"HTTP {resp.status_code} on {path}, and no other backend to try "
                                       f"({_error_message(resp, backend.key)})")
                continue
            backend.failing.clear()
            return backend, _json_object(backend, resp, self.key_hint)

    async def _server_error(self, backend: Backend, request: str, status: int, path: str) -> bool:
        """A 5xx: take the backend out if it fails a health check, or if SICK_AFTER different requests in a row failed
        there. Whether it is still in."""
        backend.failing.add(request)
        if not await self.check(backend):
            return False
        if len(backend.failing) >= SICK_AFTER:
            self._mark(backend, False, f"HTTP {status} on {path} for {len(backend.failing)} different requests in a row")
            backend.failing.clear()
            return False
        return True

    def _forgive(self, request: str) -> None:
        for b in self.backends:
            b.failing.discard(request)

    def _pick(self, exclude: list[Backend] = ()) -> Backend | None:
        now = time.monotonic()
        ready = [b for b in self.backends if b.healthy and b not in exclude and b.busy_until <= now]
        return min(ready, key=lambda b: (b.in_flight, b.requests)) if ready else None

    async def _wait_for_change(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
        for b in self.backends:
            await b.client.aclose()


def _json_object(backend: Backend, resp: httpx.Response, key_hint: str) -> dict:
    """The answer's JSON object, or a BackendError saying what came instead (status, type, a short excerpt)."""
    if resp.status_code != 200:
        detail = _error_message(resp, backend.key)
        if resp.status_code in (401, 403):
            detail = f"refused the API key ({key_hint})"
        raise BackendError(backend.name, f"HTTP {resp.status_code} on {resp.request.url.path}: {detail}")
    try:
        doc = resp.json()
    except ValueError:
        kind = scrubbed(resp.headers.get("content-type", "no content type"), backend.key, 60)
        raise BackendError(backend.name, f"answered {resp.request.url.path} with {kind}, not JSON: "
                                         f"{scrubbed(resp.text, backend.key, 200)}") from None
    if not isinstance(doc, dict):
        raise BackendError(backend.name, f"answered {resp.request.url.path} with a JSON {type(doc).__name__}, not an object")
    return doc


def _error_message(resp: httpx.Response, key: str | None) -> str:
    """The server's own error message, scrubbed of `key` (a server may echo the request's headers) and cut short."""
    try:
        doc = resp.json()
        err = doc.get("error", doc) if isinstance(doc, dict) else doc
        message = err.get("message") if isinstance(err, dict) else None
        return scrubbed(str(message if message else err), key, 200)
    except ValueError:
        return scrubbed(resp.text, key, 200)


def _retry_after(resp: httpx.Response) -> float:
    """A 429's Retry-After (seconds or an HTTP date) within [0, MAX_RETRY_AFTER]; 1 s when it gives none."""
    value = resp.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            seconds = 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else 1.0
