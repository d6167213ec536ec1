"""A small misbehaving OpenAI-compatible server, for the judge backend's error paths (a real `vllm serve` covers the rest).

`FakeOpenAI(mode)` serves /health, /v1/models, /v1/completions and /v1/chat/completions from a thread
in the test process. `mode` can be changed while it runs:

- good: well-formed answers; `logprob_token_ids` answered with log-probs -1.0, -1.1, ... in the order asked
- topk: ignores `logprob_token_ids` (answers top-1 only), and for `logprobs: 20` gives "A" -1.0 and "B" -2.0 as text
- chat: chat completions whose top log-probs are "A" -1.0, " B" -2.0 and "(A" -0.5
- echo_key: 400 whose message repeats the Authorization header; html: 200 with an HTML page; no_logprobs: JSON without log-probs; wrong_shape: choices is a string;
  nan: a log-prob that is not a number; hang: sleeps `hang_s` before answering (health checks too); down: 503 everywhere
- garbage_number: a log-prob that is a long string repeating the Authorization header (a proxy that echoes headers)
- varied: as good, but a request without log-probs (a policy sampling answers) gets `n` answers that differ from each
  other, each a function of the prompt, the seed and its index (a policy served for `cai generate`)
- digits: a Qwen-style judge that rates "10" as the token "1" then the token "0": P("1") 0.9, P("9") 0.1 first, then
  P("0" | "1") 0.99; everything else -30. Completions read ids through `ids` (text -> id of the test's tokenizer).
Every mode: a POST whose body contains `poison` gets 500 (one request that makes the model server fail), and the next
`busy_posts` POSTs get 429 with `Retry-After: 1` (back-pressure).
Every request's Authorization header is recorded in `seen_keys`.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 resets connections when a client sends more at once


class FakeOpenAI:
    def __init__(self, mode: str = "good", hang_s: float = 30.0, ids: dict[str, int] | None = None):
        self.mode, self.hang_s, self.ids = mode, hang_s, ids or {}
        self.seen_keys: list[str] = []
        self.posts = 0
        self.poison: str | None = None
        self.busy_posts = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", kind)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the judge gave up waiting (hang mode): what it should do

            def _send_busy(self) -> None:
                body = b'{"error": {"message": "rate limited"}}'
                self.send_response(429)
                self.send_header("retry-after", "1")
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.seen_keys.append(self.headers.get("authorization", ""))
                if fake.mode == "hang":
                    time.sleep(fake.hang_s)
                if fake.mode in ("down", "hang"):
                    return self._send(503, b'{"error": "down"}')
                if self.path == "/health":
                    return self._send(200, b"")
                if self.path == "/v1/models":
                    return self._send(200, json.dumps({"object": "list", "data": [{"id": "fake"}]}).encode())
                self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                fake.seen_keys.append(self.headers.get("authorization", ""))
                fake.posts += 1
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                body = json.loads(raw or b"{}")
                if fake.poison is not None and fake.poison in raw.decode():
                    return self._send(500, b'{"error": {"message": "the engine crashed on this request"}}')
                if fake.busy_posts > 0:
                    fake.busy_posts -= 1
                    return self._send_busy()
                if fake.mode == "garbage_number":
                    value = f"proxy: Authorization: {self.headers.get('authorization')} " + "x" * 5000
                    answer = {"choices": [{"text": "A", "logprobs": {"top_logprobs": [{"token_id:5": value}]}}]}
                    return self._send(200, json.dumps(answer).encode())
                if fake.mode == "echo_key":  # a careless server that repeats the request's headers in its error
                    message = {"error": {"message": f"bad request from {self.headers.get('authorization')}"}}
                    return self._send(400, json.dumps(message).encode())
                status, answer, kind = fake.answer(self.path, body)
                self._send(status, answer if isinstance(answer, bytes) else json.dumps(answer).encode(), kind)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, body: dict) -> tuple[int, dict | bytes, str]:
        mode = self.mode
        if mode == "hang":
            time.sleep(self.hang_s)
        if mode == "down":
            return 503, {"error": {"message": "down"}}, "application/json"
        if mode == "html":
            return 200, b"<html><body>502 Bad Gateway (nginx)</body></html>", "text/html"
        if mode == "wrong_shape":
            return 200, {"choices": "nope"}, "application/json"
        usage = {"prompt_tokens": 10, "completion_tokens": 1}
        if mode == "varied" and not body.get("logprobs"):
            return 200, self.varied(path, body) | {"usage": usage}, "application/json"
        if mode == "digits" and body.get("max_tokens") == 1:
            return 200, self.digits(path, body) | {"usage": usage}, "application/json"
        if path == "/v1/chat/completions":
            top = [{"token": "A", "logprob": -1.0}, {"token": " B", "logprob": -2.0}, {"token": "(A", "logprob": -0.5}]
            logprobs = None if mode == "no_logprobs" else {"content": [{"token": "A", "logprob": -1.0, "top_logprobs": top}]}
            return 200, {"choices": [{"message": {"role": "assistant", "content": "A fine answer."}, "logprobs": logprobs}],
                         "usage": usage}, "application/json"
        if body.get("max_tokens", 16) > 1 or not body.get("logprobs"):
            return 200, {"choices": [{"text": " A fine answer.", "logprobs": None}], "usage": usage}, "application/json"
        if mode == "no_logprobs":
            return 200, {"choices": [{"text": "A"}], "usage": usage}, "application/json"
        if mode == "nan":
            return 200, b'{"choices": [{"text": "A", "logprobs": {"top_logprobs": [{"token_id:5": NaN}]}}]}', "application/json"
        if mode == "topk":
            top = {"token_id:1": -0.1} if body.get("logprob_token_ids") else {"A": -1.0, "B": -2.0, "zz": -0.2}
        else:
            top = {f"token_id:{t}": -1.0 - 0.1 * i for i, t in enumerate(body.get("logprob_token_ids") or [])}
        return 200, {"choices": [{"text": "A", "logprobs": {"top_logprobs": [top]}}], "usage": usage}, "application/json"

    @staticmethod
    def varied(path: str, body: dict) -> dict:
        """`n` distinct answers of 20 to 200 characters, the same for the same prompt, seed and index."""
        asked = json.dumps([body.get("prompt"), body.get("messages"), body.get("seed")], sort_keys=True)
        texts = []
        for k in range(int(body.get("n") or 1)):
            digest = hashlib.sha256(f"{asked}\x00{k}".encode()).hexdigest()
            words = (hashlib.sha256(f"{digest}{w}".encode()).hexdigest()[:8] for w in range(2 + int(digest[:2], 16) % 20))
            texts.append(f"Answer {k}: " + " ".join(words))
        if path == "/v1/chat/completions":
            return {"choices": [{"index": k, "message": {"role": "assistant", "content": t}, "finish_reason": "stop", "logprobs": None}
                                for k, t in enumerate(texts)]}
        return {"choices": [{"index": k, "text": t, "finish_reason": "stop", "logprobs": None} for k, t in enumerate(texts)]}

    FIRST = {"1": math.log(0.9), "9": math.log(0.1)}
    AFTER_ONE = {"0": math.log(0.99), "<|im_end|>": math.log(0.01)}
    UNSEEN = -30.0

    def digits(self, path: str, body: dict) -> dict:
        """The rating "10" spelled as two tokens: the first position, or the one after a "1"."""
        if path == "/v1/chat/completions":
            after_one = body["messages"][-1]["role"] == "assistant" and body["messages"][-1]["content"].endswith("1")
            script = self.AFTER_ONE if after_one else self.FIRST
            top = [{"token": t, "logprob": lp} for t, lp in script.items()]
            return {"choices": [{"message": {"role": "assistant", "content": top[0]["token"]},
                                 "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}]}
        script = self.AFTER_ONE if body["prompt"][-1] == self.ids["1"] else self.FIRST
        if body.get("logprob_token_ids"):
            text = {i: t for t, i in self.ids.items()}
            top = {f"token_id:{i}": script.get(text.get(i, ""), self.UNSEEN) for i in body["logprob_token_ids"]}
        else:
            top = dict(script)
        return {"choices": [{"text": "1", "logprobs": {"top_logprobs": [top]}}]}

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
