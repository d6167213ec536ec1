"""Run the judge app under uvicorn, refusing an unsafe bind before anything starts."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import uvicorn

from cai.errors import CaiError
from judge_server.app import build_app
from judge_server.protocol import PARENT_PID_ENV
from judge_server.settings import ServerSettings

logger = logging.getLogger(__name__)


def serve(settings: ServerSettings) -> None:
    """Resolve the constitution (a file or a shipped name), refuse an unsafe bind, then serve until stopped."""
    from cai.constitution import find_constitution

    settings.check_bind()
    if settings.backends.backend == "openai":  # a key refused for plain http: said before anything starts
        from judge_server.backends import backend_keys, check_key_transport
        from judge_server.settings import BACKEND_KEY_ENV

        b = settings.backends
        check_key_transport(b.backend_url, backend_keys(b.backend_url, b.backend_key_file, BACKEND_KEY_ENV), b.backend_allow_http_key)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")  # uvicorn's own lines look alike
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per backend request
    _stop_with_parent()
    path = find_constitution(settings.constitution)
    settings = settings.model_copy(update={"constitution": str(path)})
    app = build_app(settings)  # loads the constitution: a broken file is an error here, before the engine starts
    # The port is bound now, before the engine starts: uvicorn binds only after the app's start-up, and
    # in those 30 s the vLLM engine opens ports of its own and could be given ours ("address already
    # in use", seen once in CI). Clients are refused until the judge is ready, as before.
    sock = _bind(settings.host, settings.port)
    # Connections beyond limit_concurrency get 503 from uvicorn itself; the judge's own queue (429)
    # bounds work. Keep-alive outlasts a busy client's pause, so pooled connections aren't closed
    # under it (the race shows as a ReadError on the client under heavy load).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", limit_concurrency=2048,
                            timeout_keep_alive=75, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


class BindError(CaiError, OSError):
    pass


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port, or stop what holds it") from None
    sock.set_inheritable(False)  # not handed to the engine's child processes
    return sock


def _stop_with_parent() -> None:
    """Started by a cai job (PARENT_PID_ENV set): shut down when that job is gone, even if it was killed
    with SIGKILL and had no chance to stop its judge, so no server is left holding the model's memory."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not parent.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        logger.warning("the process that started this judge (pid %s) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown; before it runs, the default: exit

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
