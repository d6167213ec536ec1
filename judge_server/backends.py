"""The judge's connections to OpenAI-compatible servers: one `Backend` per URL, a `BackendPool` over them.

A request goes to the healthy backend with the fewest requests in flight. A backend that cannot be
reached, times out or answers 5xx is taken out and the request goes to another; a background
health check (`/health`, else `/v1/models`) every `backend_check_every` seconds takes out backends
that fail it and brings back those that pass. With none healthy, a request waits for one for up
to `backend_timeout` seconds, then fails with `BackendUnavailableError`.

An answer that is not what the API promises (not JSON, HTML, wrong shape, no log-probabilities)
or a 4xx is that request's `BackendError`, naming the backend; it is not retried elsewhere (every
replica would say the same). Each backend's key is sent to that backend only, in its own client's
headers; no key is logged, echoed or put in an error message, and redirects are not followed (a
redirect would carry the key to another host).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from cai.errors import CaiError

logger = logging.getLogger(__name__)
RETRY_STATUSES = {429, 500, 502, 503, 504}


class BackendError(RuntimeError):
    """One request's failure at a backend that answered: the backend and what was wrong, never a key."""

    def __init__(self, backend: str, message: str):
        self.backend = backend
        super().__init__(f"{backend}: {message}")


class BackendUnavailableError(RuntimeError):
    def __init__(self, names: list[str], waited: float, last: str):
        super().__init__(f"no judge backend answered within {waited:.0f} s ({', '.join(names)}); last failure: {last}. "
                         "Check that the servers are up, or add --backend-url replicas")


class BackendKeyError(CaiError, ValueError):
    """The backend key file cannot be used; the message names the file, never its content."""


def shown_url(url: str) -> str:
    """scheme://host:port/path: what logs and errors say of a backend (settings refuse credentials and queries)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}{p.path}"


def base_url(url: str) -> str:
    """The server's root, whether the user gave http://host:8000 or http://host:8000/v1."""
    return url.rstrip("/").removesuffix("/v1")


def backend_keys(urls: list[str], key_file: Path | None, env: str) -> list[str | None]:
    """One key per URL: from `key_file` (one line for all, or one per URL), else the environment variable, else none."""
    if key_file is not None:
        try:
            lines = [line.strip() for line in Path(key_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise BackendKeyError(f"cannot read the backend key file {key_file}: {type(e).__name__}") from None
        if len(lines) == 1:
            return lines * len(urls)
        if len(lines) != len(urls):
            raise BackendKeyError(f"backend key file {key_file} has {len(lines)} keys for {len(urls)} backend URLs: "
                                  "give one key for all, or one line per URL in the order of --backend-url")
        return lines
    key = os.environ.get(env, "").strip() or None
    return [key] * len(urls)


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

    @property
    def name(self) -> str:
        return f"backend {self.index + 1} ({shown_url(self.url)})"


class BackendPool:
    def __init__(self, urls: list[str], keys: list[str | None], *, timeout: float, check_every: float):
        self.timeout = timeout
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
        last = "none tried"
        while True:
            backend = self._pick()
            if backend is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailableError([b.name for b in self.backends], self.timeout, last)
                self._changed.clear()
                await self._wait_for_change(min(left, self.check_every))
                if self._pick() is None:  # no change seen: probe now rather than wait for the checker
                    await asyncio.gather(*(self.check(b) for b in self.backends))
                continue
            backend.in_flight += 1
            backend.requests += 1
            try:
                resp = await backend.client.post(path, json=body)
            except httpx.HTTPError as e:
                last = f"{backend.name}: {type(e).__name__}"
                self._mark(backend, False, f"{type(e).__name__} on {path}")
                continue
            finally:
                backend.in_flight -= 1
            if resp.status_code in RETRY_STATUSES:
                last = f"{backend.name}: HTTP {resp.status_code}"
                self._mark(backend, False, f"HTTP {resp.status_code} on {path}")
                continue
            return backend, _json_object(backend, resp)

    def _pick(self) -> Backend | None:
        healthy = [b for b in self.backends if b.healthy]
        return min(healthy, key=lambda b: (b.in_flight, b.requests)) if healthy else None

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


def _json_object(backend: Backend, resp: httpx.Response) -> dict:
    """The answer's JSON object, or a BackendError saying what came instead (status, type, a short excerpt)."""
    if resp.status_code != 200:
        detail = _error_message(resp)
        if resp.status_code in (401, 403):
            detail = "refused the API key (check --backend-key-file or $CAI_BACKEND_API_KEY)"
        raise BackendError(backend.name, _scrubbed(backend, f"HTTP {resp.status_code} on {resp.request.url.path}: {detail}"))
    try:
        doc = resp.json()
    except ValueError:
        kind = resp.headers.get("content-type", "no content type")
        raise BackendError(backend.name, _scrubbed(backend, f"answered {resp.request.url.path} with {kind}, not JSON: "
                                                   f"{_excerpt(resp.text)}")) from None
    if not isinstance(doc, dict):
        raise BackendError(backend.name, f"answered {resp.request.url.path} with a JSON {type(doc).__name__}, not an object")
    return doc


def _scrubbed(backend: Backend, text: str) -> str:
    """`text` without the backend's key, should a server echo the request's headers in an error."""
    return text.replace(backend.key, "<key>") if backend.key else text


def _error_message(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
        err = doc.get("error", doc) if isinstance(doc, dict) else doc
        message = err.get("message") if isinstance(err, dict) else None
        return _excerpt(str(message if message else err))
    except ValueError:
        return _excerpt(resp.text)


def _excerpt(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
