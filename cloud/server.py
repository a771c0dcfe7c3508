"""How the cloud is served: uvicorn with limits against slow and greedy clients.

uvicorn times out idle keep-alive connections, but not a client that sends its request slowly (slowloris:
1,500 connections each sending a header byte now and then held 1,024 descriptors and locked everyone else
out). :class:`GuardedHttpTools` closes a connection whose request line and headers are not complete within
``header_timeout_s`` of its start, or whose body makes no progress for ``body_timeout_s``. The process raises
its open-file limit to the hard limit, and ``limit_concurrency`` answers 503 past a set number of
connections and requests. In production a reverse proxy (HAProxy or nginx: see README) sits in front too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("tapshare.cloud")

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 15.0
LIMIT_CONCURRENCY = 20_000


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol plus header and body timeouts."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._guard = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _too_slow(self) -> None:
        self._guard = None
        if not self.transport.is_closing():
            log.info("closing a connection from %s: its request was too slow", self.client)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s)           # every request on a kept-alive connection too

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(self.body_timeout_s)             # progress: the body timer starts again
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()                             # the request is in; the answer may take long (a long-poll)
        super().on_message_complete()


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d: %s", soft, e)
    return soft


class GracefulServer(uvicorn.Server):
    """uvicorn's server that, when told to stop (SIGTERM, or ``should_exit`` from a thread), first answers every
    held long-poll (the app's command hub), so stopping takes milliseconds, not a minute, and fails no request.

    Behind a load balancer (``TAPSHARE_DRAIN_S`` > 0) it drains first: for that long ``/healthz`` answers 503
    while every request is served as usual (long-polls held too), so the balancer's health check takes the
    instance out; then the held long-polls are answered, in turn over a few seconds (their machines poll again,
    through the balancer, elsewhere: a stream, not a wave), it stops listening, requests in flight finish and it
    exits. A second signal stops at once."""

    _draining = False

    def handle_exit(self, sig, frame) -> None:
        settings = getattr(getattr(self.config.app, "state", None), "settings", None)
        drain_s = getattr(settings, "drain_s", 0)
        if self._draining or not drain_s:
            self._stop_now(sig, frame)
            return
        self._draining = True
        hub = _hub(self.config.app)
        if hub is not None:
            hub.drain()
        log.info("stopping: draining for %.1f s first (health check 503)", drain_s)
        timer = threading.Timer(drain_s, self._stop_now, (sig, frame, True))
        timer.daemon = True
        timer.start()

    def _stop_now(self, sig, frame, drained: bool = False) -> None:
        _close_hub(self.config.app, spread=drained)     # drained: the held polls answer in turn, not at once
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        _close_hub(self.config.app)
        self.should_exit = True


def _hub(app):
    return getattr(getattr(app, "state", None), "hub", None)


def _close_hub(app, spread: bool = False) -> None:
    hub = _hub(app)
    if hub is not None:
        hub.close(spread)


def server_config(app, *, host: str, port: int, log_level: str = "info", header_timeout_s: float = HEADER_TIMEOUT_S,
                  body_timeout_s: float = BODY_TIMEOUT_S, limit_concurrency: int = LIMIT_CONCURRENCY,
                  **kwargs) -> uvicorn.Config:
    """The uvicorn configuration every way of serving the cloud uses (CLI, embedded, tests)."""
    protocol = type("GuardedHttp", (GuardedHttpTools,), {"header_timeout_s": header_timeout_s,
                                                          "body_timeout_s": body_timeout_s})
    raise_open_file_limit()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          limit_concurrency=limit_concurrency, timeout_keep_alive=kwargs.pop("timeout_keep_alive", 75),
                          **kwargs)
