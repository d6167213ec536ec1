"""The judge's HTTP layer: a thin FastAPI router over `JudgeService`.

`router` holds the routes; each reads the service, the constitution store and the metrics from
`request.app.state`. The four judging operations (critique, revise, compare, score) each get a
single-item route and a batch route from `_judging_routes`. `build_app(settings)` is the factory
(tests and `cai judge serve` both call it); the engine starts in the lifespan. Every error is an
`ErrorResponse` JSON body with a type and a message - never a stack trace.
"""

# No `from __future__ import annotations`: `_judging_routes` annotates each route's body with the
# operation's request model, a variable, and FastAPI reads the body type from that annotation.

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from cai.constitution import UnknownPrincipleError
from judge_server import protocol as P
from judge_server.backends import BackendError, BackendUnavailableError
from judge_server.constitutions import ConstitutionStore, UnknownConstitutionError
from judge_server.engine import Engine, PromptTooLongError
from judge_server.service import JudgeService, OverloadedError
from judge_server.settings import ServerSettings

logger = logging.getLogger(__name__)
R = TypeVar("R")
OPEN_PATHS = {"/health", "/docs", "/openapi.json"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("judge_requests_total", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("judge_request_seconds", "Request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.items = Counter("judge_items_total", "Work items judged (a batch counts each item)", ["endpoint"], registry=self.registry)
        self.queue = Gauge("judge_queue_depth", "Admitted work items not yet answered", registry=self.registry)
        self.tokens = Gauge("judge_tokens_total", "Tokens through the engine (kind: prompt, completion, "
                             "cached = prompt tokens found in the prefix cache)", ["kind"], registry=self.registry)


def _error(status: int, kind: str, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorBody(type=kind, message=message, field=field))
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True), headers=headers)


class BodyLimitMiddleware:
    """413 for bodies over the limit, whether declared by Content-Length or streamed chunked."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, "too_large", f"request body exceeds {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _Answer(Exception):
    """Carries a ready error response out of `_run` to the exception handler."""

    def __init__(self, response: JSONResponse):
        self.response = response


def start_engine(settings: ServerSettings) -> Engine:
    """The engine the settings ask for: vLLM in this process, or OpenAI-compatible servers."""
    if settings.backends.backend == "openai":
        from judge_server.openai_engine import start_openai_engine

        return start_openai_engine(settings)
    from judge_server.engine import VLLMEngine

    return VLLMEngine.start(settings)


def build_app(settings: ServerSettings, engine_factory: Callable[[ServerSettings], Engine] = start_engine) -> FastAPI:
    """The judge's app for these settings; its engine is `engine_factory(settings)`, started in the app's lifespan."""
    store = ConstitutionStore(settings.constitution)  # a bad file fails here, before the engine starts
    app = FastAPI(title="cai judge", version="1", lifespan=partial(_lifespan, engine_factory),
                  responses={code: {"model": P.ErrorResponse} for code in (401, 409, 413, 422, 429, 500, 502, 503)})
    app.state.settings = settings
    app.state.store = store
    app.state.metrics = Metrics()
    app.middleware("http")(_auth_and_metrics)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(_Answer, _answer)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    return app


@asynccontextmanager
async def _lifespan(engine_factory: Callable[[ServerSettings], Engine], app: FastAPI):
    settings, store = app.state.settings, app.state.store
    engine = engine_factory(settings)
    app.state.service = JudgeService(engine, store, settings.max_queue)
    try:
        # The first request through a fresh CPU engine is many times slower: pay it before serving. On a
        # backend it checks the servers answer the model's log-probabilities before anything is admitted.
        await app.state.service.compare(P.CompareRequest(prompt="Hi", response_a="Hello!", response_b="Hey."))
        logger.info("judge ready: %s, constitution %s", engine.model_name, store.current().short_hash)
        yield
    finally:
        await engine.aclose()


async def _auth_and_metrics(request: Request, call_next):
    started = time.perf_counter()
    path = request.url.path
    metrics: Metrics = request.app.state.metrics
    api_key = request.app.state.settings.api_key
    # Label metrics by route, not raw path: unknown paths would grow the label set without bound.
    endpoint = path if path in {getattr(r, "path", None) for r in request.app.routes} else "other"
    if api_key is not None and path not in OPEN_PATHS:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.get_secret_value().encode()):
            metrics.requests.labels(endpoint, "401").inc()
            return _error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": "Bearer"})
    try:
        response = await call_next(request)
    except Exception:  # noqa: BLE001 - the last line of defence: log it, answer typed JSON
        logger.exception("unhandled error on %s", path)
        response = _error(500, "internal", "internal error in the judge; the server log has details")
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    return response


async def _invalid(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return _error(422, "invalid_request", f"body is not valid JSON: {detail}".rstrip(": "))
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return _error(422, "invalid_request", f"{'.'.join(loc) or 'body'}: {first['msg']}{more}", field=".".join(loc) or None)


async def _http(request: Request, exc: HTTPException):
    kinds = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    message = "could not parse the request body as UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
    return _error(exc.status_code, kinds.get(exc.status_code, "invalid_request"), message)


async def _answer(request: Request, exc: _Answer):
    return exc.response


def _service(request: Request) -> JudgeService:
    return request.app.state.service


async def _run(request: Request, endpoint: str, items: int, work: Awaitable[R]) -> R:
    """Admission, then the typed-error mapping every judging route shares."""
    service = _service(request)
    metrics: Metrics = request.app.state.metrics
    try:
        with service.admit(items):
            metrics.queue.set(service.pending)
            result = await work
    except OverloadedError as e:
        work.close()
        raise _Answer(_error(429, "overloaded", str(e), headers={"Retry-After": "1"})) from None
    except ITEM_ERRORS as e:
        status, body = _item_error(e)
        raise _Answer(_error(status, body.type, body.message, body.field)) from None
    finally:
        metrics.queue.set(service.pending)
    metrics.items.labels(endpoint).inc(items)
    return result


router = APIRouter()


def _judging_routes(operation: str, item: type[BaseModel], result: type[BaseModel], batch: type[BaseModel],
                    batch_result: type[BaseModel]) -> None:
    """POST /v1/<operation> (one item: its error is the response's) and /v1/<operation>/batch (many: an item's own
    error stands in its place) on `router`, both answered by `JudgeService.<operation>`."""

    async def single(req: item, request: Request):
        return await _run(request, operation, 1, getattr(_service(request), operation)(req))

    async def many(req: batch, request: Request):
        judge = getattr(_service(request), operation)
        return batch_result(results=await _run(request, operation, len(req.items), _all(judge, req.items)))

    router.add_api_route(f"/v1/{operation}", single, methods=["POST"], response_model=result, name=operation)
    router.add_api_route(f"/v1/{operation}/batch", many, methods=["POST"], response_model=batch_result, name=f"{operation}_batch")


_judging_routes("critique", P.CritiqueRequest, P.CritiqueResult, P.CritiqueBatch, P.CritiqueBatchResult)
_judging_routes("revise", P.ReviseRequest, P.ReviseResult, P.ReviseBatch, P.ReviseBatchResult)
_judging_routes("compare", P.CompareRequest, P.CompareResult, P.CompareBatch, P.CompareBatchResult)
_judging_routes("score", P.ScoreRequest, P.ScoreResult, P.ScoreBatch, P.ScoreBatchResult)
_judging_routes("propose", P.ProposeRequest, P.ProposeResult, P.ProposeBatch, P.ProposeBatchResult)


@router.get("/health", response_model=P.Health)
async def health(request: Request):
    s = _service(request)
    states = s.engine.backend_states()
    return P.Health(status="ok", model=s.engine.model_name, constitution_hash=request.app.state.store.current().hash,
                    queue_depth=s.pending, max_queue=s.max_queue,
                    backends_up=sum(b["healthy"] for b in states) if states is not None else None,
                    backends_total=len(states) if states is not None else None)


@router.get("/v1/constitution", response_model=P.ConstitutionInfo)
async def constitution(request: Request):
    store: ConstitutionStore = request.app.state.store
    c = store.current()
    return P.ConstitutionInfo(name=c.name, hash=c.hash, path=str(store.path), reload_error=store.reload_error,
                              principles=[P.PrincipleInfo(**p.model_dump()) for p in c.principles])


@router.get("/v1/backends", response_model=list[P.BackendState])
async def backends(request: Request):
    """With --backend openai: each backend's health and load (empty for the in-process engine)."""
    return [P.BackendState(**state) for state in _service(request).engine.backend_states() or []]


@router.get("/metrics")
async def prometheus(request: Request):
    # The engine's token totals as of now, read when asked: set after each request they missed the start-up
    # comparison, so the first request's difference counted its tokens too.
    eng, tokens = _service(request).engine, request.app.state.metrics.tokens
    tokens.labels("prompt").set(eng.prompt_tokens_total)
    tokens.labels("completion").set(eng.completion_tokens_total)
    tokens.labels("cached").set(eng.cached_tokens_total)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


ITEM_ERRORS = (UnknownPrincipleError, UnknownConstitutionError, PromptTooLongError, BackendError, BackendUnavailableError)


def _item_error(exc: Exception) -> tuple[int, P.ErrorBody]:
    """HTTP status and typed body for the errors that belong to one request item."""
    if isinstance(exc, UnknownPrincipleError):
        return 422, P.ErrorBody(type="invalid_request", message=str(exc), field="principle_id")
    if isinstance(exc, UnknownConstitutionError):
        return 409, P.ErrorBody(type="conflict", message=str(exc), field="constitution_hash")
    if isinstance(exc, BackendError):
        return 502, P.ErrorBody(type="backend_error", message=str(exc))
    if isinstance(exc, BackendUnavailableError):
        return 503, P.ErrorBody(type="backend_unavailable", message=str(exc))
    return 422, P.ErrorBody(type="invalid_request", message=str(exc))


async def _all(fn, items) -> list:
    """Judge every item; one item's own error (unknown principle, too long) doesn't sink the batch."""
    outcomes = await asyncio.gather(*(fn(item) for item in items), return_exceptions=True)
    results = []
    for out in outcomes:
        if isinstance(out, ITEM_ERRORS):
            results.append(P.ErrorResponse(error=_item_error(out)[1]))
        elif isinstance(out, BaseException):
            raise out
        else:
            results.append(out)
    return results
