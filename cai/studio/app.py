"""`cai studio`: the constitution workbench, a FastAPI app serving one page and the API it calls.

`run_studio(settings)` checks the bind and the file, starts or connects the judge, and serves the page
on loopback. `build_app(settings, judge, file, bench)` is the factory tests call. Security: nothing binds
beyond loopback without an API key (the page is then opened once with `?key=`, kept in a cookie); a
request for another Host is refused (DNS rebinding); every state-changing request carries the token
embedded in the served page; request bodies are bounded and must be UTF-8 JSON; and the only file
written is the constitution the studio was started with: no request names a path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.constitution import UnknownPrincipleError
from cai.errors import CaiError
from cai.judge_cache import JudgeCache, default_cache_path
from cai.judge_client import JudgeClient, JudgeError
from cai.studio.edits import CardEdit, EditError
from cai.studio.judging import PeopleBench, StudioJudge
from cai.studio.preview import Preview, PreviewRequest
from cai.studio.settings import StudioSettings
from cai.studio.state import Conflict, ConstitutionFile, DraftRejected, Snapshot

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
TOKEN_HEADER = "x-studio-token"
KEY_COOKIE = "cai_studio_key"
T = TypeVar("T", bound=BaseModel)


class StudioError(CaiError, RuntimeError):
    """The studio cannot start: the judge serves another constitution, or is not there."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SaveRequest(_Body):
    base: str = Field(max_length=64, description="The file version (sha256 of its bytes) the page loaded.")
    edits: list[CardEdit] = Field(max_length=1000)


class RestoreRequest(_Body):
    base: str = Field(max_length=64)
    hash: str = Field(max_length=64, description="The constitution hash of the version to write back.")


class TryRequest(_Body):
    prompt: str = Field(min_length=1, max_length=32_000)
    answers: list[str] = Field(min_length=1, max_length=2)
    principle_id: str = Field(min_length=1, max_length=64)


class SuggestRequest(_Body):
    proposals: int = Field(default=4, ge=1, le=16, description="Principles to ask the judge model for.")


class HTTPProblem(CaiError):
    """A request the studio refuses, with its status and a message the page shows as it is."""

    def __init__(self, status: int, kind: str, message: str):
        self.status, self.kind, self.message = status, kind, message
        super().__init__(message)


def _error(status: int, kind: str, message: str, **extra) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message}, **extra})


async def _body(request: Request, model: type[T]) -> T:
    """The request's JSON body as `model`: over the size limit 413, not UTF-8 400, not the model 422, each said plainly."""
    limit = request.app.state.settings.max_body_bytes
    too_large = (f"the request is over the studio's limit of {limit:,} bytes (--max-body-bytes): nothing was saved; "
                 "paste less, or edit the file in your editor")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "too_large", too_large)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise HTTPProblem(413, "too_large", too_large)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPProblem(400, "invalid_utf8", f"the request is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                          "nothing was saved") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "body"
        raise HTTPProblem(422, "invalid_request", f"{where}: {err['msg']}") from None


async def connect_judge(settings: StudioSettings, url: str, file: ConstitutionFile) -> StudioJudge:
    """The judge at `url`, checked to serve the studio's file (the version in service), with the answer cache."""
    client = JudgeClient(url, max_retries=settings.judge_retries)
    try:
        served = await client.constitution()
        if served.hash != file.in_service.hash:
            raise StudioError(f"the judge at {url} serves constitution {served.name} ({served.hash[:12]}, from {served.path}), not "
                              f"{file.path} ({file.in_service.short_hash}); start it on this file (`cai judge serve --constitution "
                              f"{file.path}`), or leave --judge-url out to start one here")
        model = (await client.health()).model
    except BaseException:
        await client.aclose()
        raise
    return StudioJudge(client, JudgeCache(settings.judge_cache or default_cache_path()), model, settings.max_tokens)


def load_bench(settings: StudioSettings) -> PeopleBench:
    """The labelled pairs of the against-people panel, with the seeded A/B placement `cai judge eval` uses."""
    from cai.human_labels import human_pairs
    from cai.judge_eval import placements

    pairs = human_pairs(settings.pairs, settings.limit, settings.seed)
    if not pairs:
        raise StudioError(f"{settings.pairs}: no pairs short enough to judge (each pair is kept to 1500 characters)")
    return PeopleBench(pairs, placements(pairs, settings.seed), settings.seed)


def build_app(settings: StudioSettings, judge: StudioJudge, file: ConstitutionFile, bench: PeopleBench) -> FastAPI:
    """The studio app for one file and one judge (closed with the app)."""
    preview = Preview(settings, judge)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if bench.task is not None:
            bench.task.cancel()
        preview.close()
        await judge.client.aclose()
        judge.cache.close()

    app = FastAPI(title="cai studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.token = settings, secrets.token_urlsafe(32)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    page = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True).get_template("studio.html.j2")
    hosts = {"127.0.0.1", "localhost", "::1", settings.host}
    key = settings.api_key.get_secret_value() if settings.api_key else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "").rpartition(":")[0].strip("[]") or request.headers.get("host", "")
        if key is None and host not in hosts:
            return _error(400, "bad_host", f"the studio answers for {', '.join(sorted(hosts))}, not {host!r}")
        if key is not None:
            if request.url.path == "/" and hmac.compare_digest(request.query_params.get("key", ""), key):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="strict")
                return response
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            if not (hmac.compare_digest(request.cookies.get(KEY_COOKIE, ""), key) or hmac.compare_digest(bearer, key)):
                return _error(401, "unauthorized", "open the studio with its key: http://HOST:PORT/?key=<the key>")
        if request.method not in ("GET", "HEAD") and not hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), app.state.token):
            return _error(403, "forbidden", "missing or wrong studio token: reload the page")
        return await call_next(request)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, e: HTTPProblem) -> JSONResponse:
        return _error(e.status, e.kind, e.message)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, e: Conflict) -> JSONResponse:
        return _error(409, "conflict", str(e), theirs=file.view(e.theirs), mine=e.mine)

    @app.exception_handler(DraftRejected)
    async def _rejected(request: Request, e: DraftRejected) -> JSONResponse:
        draft = file.view(Snapshot("", e.draft, None, e.problems))
        return _error(422, "invalid_constitution", f"not saved, the file keeps its version: {e}", draft=draft)

    @app.exception_handler(EditError)
    async def _edit(request: Request, e: EditError) -> JSONResponse:
        return _error(422, "invalid_edit", str(e))

    @app.exception_handler(JudgeError)
    async def _judge(request: Request, e: JudgeError) -> JSONResponse:
        return _error(502, "judge_error", f"the judge could not answer: {e}")

    @app.exception_handler(UnknownPrincipleError)
    async def _principle(request: Request, e: UnknownPrincipleError) -> JSONResponse:
        return _error(422, "unknown_principle", str(e))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page.render(token=app.state.token, path=str(file.path), judge=judge.client.base_url, model=judge.model,
                           pairs=settings.pairs, n_pairs=len(bench.pairs))

    @app.get("/api/constitution")
    async def constitution() -> dict:
        return file.view(file.read())

    @app.get("/api/version")
    async def version() -> dict:
        snapshot = file.read()
        return {"file_hash": snapshot.file_hash, "valid": snapshot.constitution is not None, "in_service": file.in_service.hash}

    @app.put("/api/constitution")
    async def save(request: Request) -> dict:
        body = await _body(request, SaveRequest)
        return file.view(file.save(body.base, body.edits))

    @app.post("/api/restore")
    async def restore(request: Request) -> dict:
        body = await _body(request, RestoreRequest)
        if body.hash not in file.versions:
            raise HTTPProblem(404, "not_found", f"no version {body.hash[:12]} in this session")
        return file.view(file.restore(body.base, body.hash))

    @app.post("/api/try")
    async def try_it(request: Request) -> dict:
        body = await _body(request, TryRequest)
        return await judge.try_it(file.in_service, body.prompt, body.answers, body.principle_id)

    @app.post("/api/people/run")
    async def people_run() -> dict:
        bench.start(judge, file)
        await asyncio.sleep(0)  # the run marks itself started before the page polls
        return bench.report(file)

    @app.get("/api/people")
    async def people() -> dict:
        return bench.report(file)

    @app.post("/api/preview/run")
    async def preview_run(request: Request) -> dict:
        body = await _body(request, PreviewRequest)
        if preview.running:
            raise HTTPProblem(409, "busy", "a data preview is under way: wait for it to finish")
        preview.start(body, file)
        return preview.report()

    @app.get("/api/preview")
    async def preview_report() -> dict:
        return preview.report()

    @app.get("/api/versions")
    async def versions() -> dict:
        return {"in_service": file.in_service.hash, "versions": [v.summary() for v in file.versions.values()]}

    @app.get("/api/compare")
    async def compare(a: str, b: str) -> dict:
        for h in (a, b):
            if h not in file.versions or file.versions[h].rows is None:
                raise HTTPProblem(404, "not_measured", f"version {h[:12]} has not been measured against people in this session")
        return {**bench.compare(file, a, b), "texts": {a: file.versions[a].text, b: file.versions[b].text},
                "figures": {a: file.versions[a].figures, b: file.versions[b].figures}}

    # -- where the judge and people disagree: the list, and principles suggested from it (cai/studio/suggest.py) --
    @app.get("/api/disagreements")
    async def disagreements() -> dict:
        from cai.studio.suggest import NotMeasured, disagreement_list

        try:
            return await disagreement_list(judge, file, bench)
        except NotMeasured as e:
            raise HTTPProblem(409, "not_measured", str(e)) from None

    @app.post("/api/suggest")
    async def suggest(request: Request) -> dict:
        from cai.constitution.learn import SuggestOptions
        from cai.studio.suggest import NotMeasured, suggestions

        body = await _body(request, SuggestRequest)
        try:
            return await suggestions(judge, file, bench, SuggestOptions(proposals=body.proposals, seed=settings.seed))
        except NotMeasured as e:
            raise HTTPProblem(409, "not_measured", str(e)) from None

    return app


def run_studio(settings: StudioSettings) -> None:
    """Check the bind, the file and the pairs, start or connect the judge, then serve the page until stopped."""
    import uvicorn

    from cai.judge_launcher import judge_endpoint

    settings.check_bind()
    if not settings.constitution.is_file():
        raise StudioError(f"{settings.constitution}: no such file; the studio edits a constitution file (copy a shipped one "
                          "from constitutions/ to start)")
    file = ConstitutionFile(settings.constitution)  # a broken file is an error here, before a judge starts
    bench = load_bench(settings)
    with judge_endpoint(settings.judge_url, model=settings.judge_model, constitution=file.path) as url:

        async def serve() -> None:
            app = build_app(settings, await connect_judge(settings, url, file), file, bench)
            config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
            logger.info("cai studio on http://%s:%d/ (editing %s; judge %s)", settings.host, settings.port, file.path, url)
            await uvicorn.Server(config).serve()

        asyncio.run(serve())
