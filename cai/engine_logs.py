"""Where an in-process vLLM engine's own output goes: a log file in the job's folder, not the terminal.

vLLM's engine runs in child processes that write its warnings (Triton, NUMA binding, inductor) to the
stderr they inherit, some of them from C++ straight to file descriptor 2. While an `EngineLog` is open,
fd 2 is the log file, so the engine's children inherit it; this process's `sys.stderr`, where cai's log
lines go, stays on the terminal; vLLM's logger (on `sys.__stderr__`) and Python warnings go to the file.
An engine that fails raises `EngineError` with the log's tail and path.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Self

from cai.errors import CaiError
from cai.files import log_tail

logger = logging.getLogger(__name__)

POLICY_ENGINE_LOG = "policy-engine.log"
"""The policy engine's log file in a job's output folder (next to the judge's judge.log)."""


class EngineError(CaiError, RuntimeError):
    """An in-process engine failed to start or to generate; the message holds its log's tail and path."""


class EngineLog:
    """The output of one engine (this process's fd 2 and its children's) in `path`, from `open()` to `close()`.

    Without a path the log is a temp file. `open()` logs where the file is.
    """

    def __init__(self, path: str | Path | None, what: str = "policy engine"):
        self.what = what
        if path is None:
            fd, path = tempfile.mkstemp(prefix="cai-engine-", suffix=".log")
            os.close(fd)
        self.path = Path(path)
        self._saved_fd: int | None = None
        self._file: IO[str] | None = None
        self._stderr: IO[str] | None = None
        self._showwarning = warnings.showwarning
        self._saved_stream_var: str | None = None

    def open(self) -> Self:
        """Send the engine's output to the log from now on (before the engine starts, so its children inherit it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("%s log: %s", self.what, self.path)
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (open until close())
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        # vLLM's logger writes to sys.__stderr__ (fd 2), here and in the engine's children, which inherit the
        # variable; until vLLM sets that logger up, its lines (Triton checks on import) would reach cai's handler.
        self._saved_stream_var = os.environ.get("VLLM_LOGGING_STREAM")
        os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.__stderr__"
        vllm_logger = logging.getLogger("vllm")
        if not vllm_logger.handlers:
            handler = logging.StreamHandler(sys.__stderr__)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            vllm_logger.addHandler(handler)
            vllm_logger.propagate = False
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._log_warning
        if _writes_to_fd2(sys.stderr):
            self._stderr = sys.stderr
            sys.stderr = open(self._saved_fd, "w", buffering=1, encoding=sys.stderr.encoding,  # noqa: SIM115 (open until close())
                              errors="backslashreplace", closefd=False)
            # Handlers that hold the stderr object itself (logging.basicConfig's) keep the terminal too.
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self._stderr:
                    handler.setStream(sys.stderr)
        return self

    def close(self) -> None:
        """Give fd 2, `sys.stderr` and warnings their terminal back."""
        if self._saved_fd is None:
            return
        warnings.showwarning = self._showwarning
        if self._saved_stream_var is None:
            os.environ.pop("VLLM_LOGGING_STREAM", None)
        else:
            os.environ["VLLM_LOGGING_STREAM"] = self._saved_stream_var
        if self._stderr is not None:
            # Every handler on the temporary stderr, whose descriptor closes below, gets the terminal back: those moved
            # there at open and those made while the log was open (transformers makes its own on first use), whose
            # next line would otherwise fail (EBADF).
            for handler in _handlers_on(sys.stderr):
                handler.setStream(self._stderr)
            sys.stderr.flush()
            sys.stderr = self._stderr
            self._stderr = None
        sys.__stderr__.flush()
        self._file.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None
        self._file.close()

    @contextmanager
    def starting(self) -> Iterator[Self]:
        """Open the log around the engine's start-up; a start that fails closes it and raises `EngineError`."""
        try:
            with self.reporting("starting"):
                self.open()
                yield self
        except BaseException:
            self.close()
            raise

    @contextmanager
    def reporting(self, doing: str) -> Iterator[None]:
        """Turn an error raised while the engine is `doing` something into an `EngineError` with the log's tail."""
        try:
            yield
        except CaiError:
            raise
        except Exception as e:
            if self._file is not None:
                self._file.flush()
            raise EngineError(f"{self.what} failed while {doing}: {type(e).__name__}: {e}\n"
                              f"log tail:\n{log_tail(self.path)}\nfull log: {self.path}") from e

    def _log_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self._file.write(warnings.formatwarning(message, category, filename, lineno, line))


def _handlers_on(stream) -> list[logging.StreamHandler]:
    """Every logger's stream handlers that write to `stream` (the root's and each named logger's)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    # `"stream" in vars(h)`: a handler whose stream is a property of sys.stderr (logging's last-resort one) follows it.
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and "stream" in vars(h) and h.stream is stream]


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False
