"""ASGI middleware in front of every route: body size and NUL-character limits, and HTTPS only in production."""

from __future__ import annotations

import json

from cloud.accounts.identity import MAX_PHOTO_BYTES
from contract.bundle import MAX_BUNDLE_BYTES

MAX_BODY_BYTES = 256 * 1024
BODY_LIMITS = {"/api/v1/me/id-photo": MAX_PHOTO_BYTES + 64 * 1024}   # paths allowed more than MAX_BODY_BYTES
# paths whose route streams the body itself (to disk) and enforces its own cap: only Content-Length is checked here
STREAMED_LIMITS = {"/api/v1/operator/releases": MAX_BUNDLE_BYTES}


class BodyLimit:
    """Refuses bodies over MAX_BODY_BYTES with 413, by Content-Length or while streaming (chunked bodies too), and
    NUL characters in the path, the query or a body (400: PostgreSQL cannot store them). A route in
    STREAMED_LIMITS (a release bundle, hundreds of megabytes) gets its body untouched, checked here only by
    Content-Length: it streams the body to disk and enforces the same cap itself. Pure ASGI: no per-request
    task overhead."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        streamed = scope.get("method") == "POST" and path in STREAMED_LIMITS
        limit = STREAMED_LIMITS[path] if streamed else BODY_LIMITS.get(path, MAX_BODY_BYTES)
        raw = scope.get("raw_path") or path.encode()
        if b"\x00" in raw or b"%00" in raw.lower() or b"%00" in scope.get("query_string", b"").lower() \
                or "\x00" in path:
            await self._send(send, 400, "nul_character", "NUL characters are not allowed in a request")
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > limit):
                await self._refuse(send, limit)
                return
        if streamed or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # read the body here (at most the limit), check it, then hand it on whole
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return                                     # the client went away
            body += message.get("body", b"")
            if len(body) > limit:
                await self._refuse(send, limit)
                return
            more = message.get("more_body", False)
        if path not in BODY_LIMITS and (b"\\u0000" in body or b"\x00" in body):     # binary uploads may hold any byte
            await self._send(send, 400, "nul_character", "NUL characters are not allowed in a request")
            return
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        await BodyLimit._send(send, 413, "body_too_large", f"request bodies are at most {limit} bytes")

    @staticmethod
    async def _send(send, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": code, "message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class HttpsOnly:
    """Production mode: plain HTTP is refused (behind a proxy, run uvicorn with --proxy-headers so the scheme
    is the client's). Only /healthz answers over HTTP, for load-balancer probes."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("scheme") != "https" and scope.get("path") != "/healthz":
            body = json.dumps({"error": "https_required",
                               "message": "this server accepts only HTTPS in production mode"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Headers every answer should carry whoever made it: ``nosniff`` everywhere; ``no-store`` on the API (a
    CSRF token, a second-factor secret, a person's full name must not sit in a shared computer's cache);
    and on any HTML page, a static file's too, the pages' Content-Security-Policy and no framing. In
    production, HSTS. Pure ASGI: it only adds headers the route did not set."""

    def __init__(self, app, page_headers: dict[str, str], production: bool) -> None:
        self.app, self.production = app, production
        self.page_headers = [(k.lower().encode(), v.encode()) for k, v in page_headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope.get("path", "").startswith(("/api/", "/device/"))

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                add = [(b"x-content-type-options", b"nosniff")]
                if api:
                    add.append((b"cache-control", b"no-store"))
                if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                    add += self.page_headers
                if self.production:
                    add.append((b"strict-transport-security", b"max-age=31536000"))
                headers += [(k, v) for k, v in add if k not in have]
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, with_headers)
