"""A real HTTP receiver for webhook tests: a threaded http.server on a loopback address that
verifies every request's Standard Webhooks signature with the ``standardwebhooks`` package
(what a customer runs) and can be told, per path, to answer 200, 500, 429 with Retry-After,
a redirect, or to hang (a dead endpoint that accepts and never answers)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    webhook_id: str
    events: list[dict[str, Any]]
    replay: bool
    at: float  # time.monotonic() when it arrived
    body: bytes


@dataclass
class Receiver:
    host: str = "127.0.0.1"
    secrets: dict[str, str] = field(default_factory=dict)  # path -> signing secret
    modes: dict[str, str] = field(default_factory=dict)  # path -> ok|slow|500|429|hang|redirect:/p
    got: list[Received] = field(default_factory=list)  # verified and answered 200
    hits: list[tuple[str, float]] = field(default_factory=list)  # every request: (path, at)
    bad: list[str] = field(default_factory=list)  # signature failures
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                now = time.monotonic()
                with receiver.lock:
                    receiver.hits.append((self.path, now))
                mode = receiver.modes.get(self.path, "ok")
                if mode == "hang":
                    receiver.release.wait(60)
                    return self._answer(200)
                if mode == "slow":
                    receiver.release.wait(0.3)  # a slow receiver: answers after 0.3 s
                if mode in ("500", "429"):
                    extra = {"Retry-After": "1"} if mode == "429" else {}
                    return self._answer(int(mode), extra)
                if mode.startswith("redirect:"):
                    target = f"http://{receiver.host}:{receiver.port}{mode[9:]}"
                    return self._answer(307, {"Location": target})
                try:
                    secret = receiver.secrets[self.path]
                    payload = Webhook(secret).verify(body, dict(self.headers.items()))
                except (KeyError, WebhookVerificationError) as exc:
                    with receiver.lock:
                        receiver.bad.append(f"{self.path}: {exc!r}")
                    return self._answer(400)
                with receiver.lock:
                    receiver.got.append(
                        Received(
                            self.path,
                            self.headers["webhook-id"],
                            payload["data"]["events"],
                            payload["replay"],
                            now,
                            body,
                        )
                    )
                self._answer(200)

            def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass  # the sender gave up (its timeout): what a dead endpoint looks like

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def events(self, path: str, *, replay: bool | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                e
                for r in self.got
                if r.path == path and (replay is None or r.replay == replay)
                for e in r.events
            ]

    def deliveries(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def loads(body: bytes) -> Any:
    return orjson.loads(body)
