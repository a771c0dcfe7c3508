"""What several cloud instances on one database share, and how they tell each other what changed.

An operator with thousands of machines runs several instances behind a load balancer on one PostgreSQL; any
instance answers any request, so everything that must hold across them lives in the database:

* :class:`Leases`: a background job (voiding unclaimed starts, reconciling lost sessions, closing unpaid orders,
  pruning) runs at one instance at a time, the holder of its lease; a holder that dies stops renewing it, and
  another instance takes the job over when the lease lapses.
* :class:`SharedRateLimiter`: hits per key in fixed windows, counted in ``rate_hits`` by every instance together.
* :class:`Listener`: one ``LISTEN`` connection per instance (never one per machine). A command queued at any
  instance is announced with ``NOTIFY`` in the transaction that queues it (delivered at its commit), and wakes
  the machine's long-poll wherever it is held; a revoked or re-enrolled device key is announced the same way so
  no instance goes on trusting a cached secret. The listener needs a session of its own: not through PgBouncer
  in transaction pooling mode, which does not keep ``LISTEN`` (session pooling or a direct connection do).

The single-process SQLite default uses the same tables (leases then always belong to the one process) and has
no listener: its one process wakes its own long-polls.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from cloud import db as t
from cloud.db import Database

log = logging.getLogger("tapshare.cloud")

COMMANDS_CHANNEL = "tapshare_commands"       # payload: a machine id with a new command
KEYS_CHANNEL = "tapshare_machine_keys"       # payload: a machine id whose device secret changed


def instance_id() -> str:
    """This instance's name in leases and logs: ``TAPSHARE_INSTANCE_ID`` (the systemd unit sets it), else the
    host name and process id."""
    return os.environ.get("TAPSHARE_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"


def announce(conn: Connection, channel: str, payload: str) -> None:
    """``NOTIFY`` every instance, at the commit of ``conn``'s transaction (nothing if it rolls back). No-op on
    SQLite: one process, which wakes its own waiters."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(channel, payload)))


def _insert(conn: Connection):
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


class Leases:
    """Each background job is run by the instance holding its lease. :meth:`hold` takes a free or lapsed lease, or
    renews this instance's own; call it before each run, with a time to live a few runs long."""

    def __init__(self, db: Database, holder: str) -> None:
        self.db, self.holder = db, holder

    def hold(self, job: str, now_ms: int, ttl_ms: int) -> bool:
        lc = t.job_leases.c
        with self.db.tx() as conn:
            conn.execute(_insert(conn)(t.job_leases).values(job=job, holder=self.holder, until_ms=0)
                         .on_conflict_do_nothing(index_elements=["job"]))
            taken = conn.execute(update(t.job_leases).where(and_(
                lc.job == job, or_(lc.holder == self.holder, lc.until_ms <= now_ms)))
                .values(holder=self.holder, until_ms=now_ms + ttl_ms)).rowcount
        return taken == 1

    def release_all(self) -> None:
        """An instance that stops lets go at once, so another one takes its jobs over without waiting."""
        with self.db.tx() as conn:
            conn.execute(update(t.job_leases).where(t.job_leases.c.holder == self.holder).values(until_ms=0))

    def holders(self) -> dict[str, tuple[str, int]]:
        with self.db.read() as conn:
            return {j: (h, u) for j, h, u in conn.execute(select(t.job_leases))}


class SharedRateLimiter:
    """At most ``limit`` hits per key in each window of ``window_ms``, counted by every instance together (one
    upsert a hit; expired windows are pruned every minute), so a limit holds whichever instance a request reaches."""

    def __init__(self, db: Database, bucket: str, limit: int, window_ms: int) -> None:
        self.db, self.bucket, self.limit, self.window_ms = db, bucket, limit, window_ms

    def hit(self, key: str, now_ms: int, conn: Connection | None = None) -> int | None:
        """Count a hit (in ``conn``'s transaction, else in one of its own); ``None`` if allowed, else the seconds
        until the key's window ends (for Retry-After)."""
        if conn is None:
            with self.db.tx() as conn:
                return self.hit(key, now_ms, conn)
        window = now_ms - now_ms % self.window_ms
        ins = _insert(conn)(t.rate_hits).values(bucket=self.bucket, key=key[:200], window_ms=window, hits=1,
                                                expires_ms=window + self.window_ms)
        hits = conn.execute(ins.on_conflict_do_update(
            index_elements=["bucket", "key", "window_ms"], set_={"hits": t.rate_hits.c.hits + 1})
            .returning(t.rate_hits.c.hits)).scalar_one()
        if hits > self.limit:
            return max(1, (window + self.window_ms - now_ms + 999) // 1000)
        return None

    @staticmethod
    def hit_in_turn(db: Database, checks: list[tuple[SharedRateLimiter, str]], now_ms: int
                    ) -> tuple[int, int] | None:
        """Count a hit on each limit in turn, in one transaction (one commit, not one a limit), stopping at the
        first that refuses: ``(its index, seconds to wait)``, or ``None`` if every limit allowed it. What was
        counted stays counted, as with :meth:`hit` one after the other."""
        with db.tx() as conn:
            for i, (limiter, key) in enumerate(checks):
                wait_s = limiter.hit(key, now_ms, conn)
                if wait_s is not None:
                    return i, wait_s
        return None

    @staticmethod
    def prune(db: Database, now_ms: int) -> int:
        with db.tx() as conn:
            return conn.execute(t.rate_hits.delete().where(t.rate_hits.c.expires_ms < now_ms)).rowcount


class Listener:
    """One thread with one PostgreSQL session that ``LISTEN``s on the given channels and calls each channel's
    handler with the payload. When the session breaks it reconnects (backing off to 5 s) and calls ``on_connect``
    first, for whatever was announced while nobody listened."""

    def __init__(self, database_url: str, handlers: dict[str, Callable[[str], None]],
                 on_connect: Callable[[], None]) -> None:
        self.dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.handlers, self.on_connect = handlers, on_connect
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)
        self.received = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)

    def _run(self) -> None:
        import psycopg
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5,
                                     application_name="tapshare-listener") as conn:
                    for channel in self.handlers:
                        conn.execute(f"LISTEN {channel}")      # our own constant names, never input
                    self.on_connect()
                    self.connected.set()
                    backoff_s = 0.1
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=1.0):
                            self.received += 1
                            try:
                                self.handlers[n.channel](n.payload)
                            except Exception:
                                log.exception("handling a notification on %s failed", n.channel)
            except Exception as e:
                self.connected.clear()
                if self._stop.is_set():
                    break
                log.warning("the database listener lost its connection (%s); reconnecting in %.1f s", e, backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
        self.connected.clear()
