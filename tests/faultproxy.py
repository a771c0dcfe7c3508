"""An HTTP proxy between a dispenser and the real cloud that injects faults: the network down, 5xx with
Retry-After, garbage bodies, slow answers, responses dropped after the server committed, duplicated
requests, a command held up in transit (``hold_commands_s``), a stale copy of a poll answer served again
(``replay_commands``). Only loopback."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.down = False
        self.faults: list[tuple[str, str]] = []      # (path prefix, fault) consumed in order
        self.delay_s = 0.0
        self.slow_s = 6.0
        self.seen: list[str] = []
        self.hold_commands_s = 0.0                   # hold the next poll answer carrying a command this long
        self.replay_commands = 0                     # serve the next poll answer carrying a command this often again
        self.replays: list[bytes] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take(self.path)
                proxy.seen.append(f"{self.command} {self.path} {fault or ''}".strip())
                if self.path.startswith("/device/v1/commands?"):
                    with proxy.lock:
                        replay = proxy.replays.pop(0) if proxy.replays else None
                    if replay is not None:                   # answered from the stale copy, not the cloud
                        return self._reply(200, replay, {"Content-Type": "application/json"})
                if proxy.down or fault == "down":
                    self.close_connection = True
                    return                                   # no answer: the client sees a dropped connection
                if fault == "503":
                    return self._reply(503, b'{"error":"busy","message":"try later"}', {"Retry-After": "0"})
                if fault == "garbage":
                    return self._reply(200, b"<html>captive portal</html>", {})
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if fault == "slow":
                    time.sleep(proxy.slow_s)                 # longer than the client waits
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                sends = 2 if fault == "duplicate" else 1
                for _ in range(sends):
                    r = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers,
                                         timeout=120)
                if fault == "drop_response":
                    self.close_connection = True
                    return                                   # the server committed; the answer is lost
                if self.path.startswith("/device/v1/commands?") and b'"command_id"' in r.content:
                    with proxy.lock:
                        hold_s, proxy.hold_commands_s = proxy.hold_commands_s, 0.0
                        proxy.replays += [r.content] * proxy.replay_commands      # a stale cache serves it again
                        proxy.replay_commands = 0
                    time.sleep(hold_s)                       # the answer is held up in transit
                self._reply(r.status_code, r.content, {k: v for k, v in r.headers.items()
                                                       if k.lower() in ("content-type", "retry-after")})

            def _reply(self, status: int, content: bytes, headers: dict) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def _take(self, path: str) -> str | None:
        with self.lock:
            for i, (prefix, fault) in enumerate(self.faults):
                if path.startswith(prefix):
                    del self.faults[i]
                    return fault
        return None

    def inject(self, prefix: str, fault: str, times: int = 1) -> None:
        with self.lock:
            self.faults += [(prefix, fault)] * times

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
