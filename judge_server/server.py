"""Run the judge app under uvicorn, refusing an unsafe bind before anything starts."""

from __future__ import annotations

import logging

import uvicorn

from judge_server.app import build_app
from judge_server.settings import ServerSettings

logger = logging.getLogger(__name__)


def serve(settings: ServerSettings) -> None:
    """Resolve the constitution (a file or a shipped name), refuse an unsafe bind, then serve until stopped."""
    from cai.constitution import find_constitution, load_constitution

    settings.check_bind()
    path = find_constitution(settings.constitution)
    load_constitution(path)  # a broken file is an error here, before the engine starts
    settings = settings.model_copy(update={"constitution": str(path)})
    app = build_app(settings)
    # Connections beyond limit_concurrency get 503 from uvicorn itself; the judge's own queue (429)
    # bounds work. Keep-alive outlasts a busy client's pause, so pooled connections aren't closed
    # under it (the race shows as a ReadError on the client under heavy load).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", limit_concurrency=2048,
                timeout_keep_alive=75, timeout_graceful_shutdown=10)
