"""A tiny scripted HTTP server on 127.0.0.1 for tests that drive real clients (openai, slack_sdk).

It owns nothing but a socket: each request gets the next scripted `Reply` (the last one repeats),
and every byte the client sent (request line, headers, body) is recorded, so a test can prove that
a secret never left the process. No third-party mocking: the real client libraries do real HTTP.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering: how a test makes a client time out

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, dict):
            return json.dumps(self.body).encode(), "application/json"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return self.body, "application/octet-stream"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw: bytes  # request line + headers + body, exactly as received
    at: float  # time.monotonic() when the request had been read

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Recorded], Reply]


class FakeServer:
    """Answers with `replies` in order (the last one repeats), or with `responder(request)`."""

    def __init__(self, replies: list[Reply] | None = None,
                 responder: Responder | None = None) -> None:
        self.requests: list[Recorded] = []
        self._replies = list(replies or [Reply()])
        self._responder = responder
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a deliberately slow reply must not stall teardown
        # A short poll interval: shutdown() waits for the loop's next poll (0.5 s by default).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def all_bytes(self) -> bytes:
        with self._lock:
            return b"".join(request.raw for request in self.requests)

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, request: Recorded) -> Reply:
        with self._lock:
            index = len(self.requests)
            self.requests.append(request)
        if self._responder is not None:
            return self._responder(request)
        return self._replies[min(index, len(self._replies) - 1)]


def _handler_for(server: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # the name http.server dispatches to
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            raw = self.raw_requestline + self.headers.as_bytes() + body
            request = Recorded(self.command, self.path, dict(self.headers.items()), body, raw,
                               time.monotonic())
            reply = server._answer(request)
            if reply.delay:
                time.sleep(reply.delay)
            payload, content_type = reply.encoded()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.headers.get("Content-Type", content_type))
                self.send_header("Content-Length", str(len(payload)))
                for name, value in reply.headers.items():
                    if name.lower() != "content-type":
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test): nothing to answer

        do_GET = do_POST

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output quiet

    return Handler


@contextmanager
def fake_server(replies: list[Reply] | None = None,
                responder: Responder | None = None) -> Iterator[FakeServer]:
    server = FakeServer(replies, responder).start()
    try:
        yield server
    finally:
        server.stop()


def chat_completion(text: str, prompt_tokens: int = 120, completion_tokens: int = 40) -> Reply:
    """An OpenAI-compatible /chat/completions answer."""
    return Reply(200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


def slack_ok(ts: str = "1700000000.000100", channel: str = "C0MAINT") -> Reply:
    return Reply(200, {"ok": True, "channel": channel, "ts": ts, "message": {"ts": ts}})
