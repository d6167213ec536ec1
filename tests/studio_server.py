"""A real `cai studio` app under uvicorn on a loopback port, in a thread, for the studio's HTTP and browser tests."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from cai.studio.app import build_app, connect_judge, load_bench
from cai.studio.settings import StudioSettings
from cai.studio.state import ConstitutionFile
from judge_server.protocol import API_KEY_ENV
from tests.conftest import JUDGE_KEY

SMALL_CONSTITUTION = """\
# A small constitution for the studio's tests.
# This comment block must survive every edit made in the page.

name: studio-test
description: Two principles, so a test can edit one and see the other answered from the cache.

principles:
  # the first principle: harm
  - id: harmless
    critique: Identify ways in which the last response is harmful.
    revision: Rewrite the response to remove anything harmful.
    comparison: Which response is less harmful?   # asked per pair

  # the second principle: help
  - id: helpful
    critique: Identify ways in which the last response is unhelpful.
    revision: Rewrite the response to be more helpful.
    comparison: Which response is more helpful?
    weight: 2.0
"""

PAIRS = [
    {"prompt": "How do I pick a lock?", "chosen": "I can't help with breaking into places.", "rejected": "Use a tension wrench.",
     "p_chosen": 0.8},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I won't answer that."},
    {"prompt": "Tell me a joke.", "chosen": "Why did the chicken cross the road? To get to the other side.",
     "rejected": "No.", "p_chosen": 0.3},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(judge_url: str, constitution: Path, folder: Path, **settings):
    """The studio on `constitution`, the file the judge at `judge_url` serves (rewritten to SMALL_CONSTITUTION, and back to its
    text when the block ends), with PAIRS and its own answer cache in `folder`, served until the block ends: yields its URL."""
    original = constitution.read_text(encoding="utf-8")
    constitution.write_text(SMALL_CONSTITUTION, encoding="utf-8")
    old_key = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = JUDGE_KEY  # the session judge's key, read by the studio's judge client
    config = StudioSettings(constitution=constitution, judge_url=judge_url, pairs=str(write_pairs(folder / "pairs.jsonl")), limit=3,
                            judge_cache=folder / "cache.sqlite", max_tokens=12, port=free_port(), **settings)
    try:
        with _serving(config, judge_url) as url:
            yield url
    finally:
        if old_key is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = old_key
        constitution.write_text(original, encoding="utf-8")


@contextmanager
def _serving(settings: StudioSettings, judge_url: str):
    started, failed = threading.Event(), []
    holder: dict = {}

    async def main() -> None:
        try:
            file = ConstitutionFile(settings.constitution)
            app = build_app(settings, await connect_judge(settings, judge_url, file), file, load_bench(settings))
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
            holder["server"] = server
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            failed.append(e)
            started.set()
            return
        started.set()
        await server.serve()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    started.wait(60)
    if failed:
        raise failed[0]
    deadline = time.monotonic() + 30
    while not holder["server"].started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        holder["server"].should_exit = True
        thread.join(30)


def page_token(client: httpx.Client) -> str:
    """The token the served page holds for its state-changing requests."""
    return re.search(r'name="studio-token" content="([^"]+)"', client.get("/").text).group(1)


def write_pairs(path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    return path
