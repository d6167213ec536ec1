"""Run the judge app under uvicorn, refusing an unsafe bind before anything starts."""

from __future__ import annotations

import logging

import uvicorn

from judge_server.app import build_app
from judge_server.settings import ServerSettings

logger = logging.getLogger(__name__)


def serve(settings: ServerSettings) -> None:
    settings.check_bind()
    app = build_app(settings)
    # Connections beyond limit_concurrency get 503 from uvicorn itself; the judge's own queue (429)
    # bounds work. Keep-alive outlasts a busy client's pause, so pooled connections aren't closed
    # under it (the race shows as a ReadError on the client under heavy load).
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", limit_concurrency=2048,
                timeout_keep_alive=75, timeout_graceful_shutdown=10)
