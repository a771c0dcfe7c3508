"""Typed FastAPI dependencies every router shares: the services, the server's clock, the signed device, the
logged-in phone user and each operator role. An endpoint states what it needs in its signature
(``def stop(session_id: IdPath, user_id: User, svc: Svc, now: Now)``) and gets it checked before it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

import contract as p
from cloud.accounts.service import Accounts
from cloud.alarms.service import Alarms
from cloud.cluster import Leases, Listener, SharedRateLimiter
from cloud.console.service import COOKIE, CSRF_HEADER, ConsoleAuth, check_role
from cloud.db import Database
from cloud.devices.hub import CommandHub, Presence
from cloud.devices.service import Commands, DurableNonces, MachineAuth, Machines
from cloud.errors import Forbidden, TooLarge, Unauthenticated
from cloud.fleet.service import Fleet
from cloud.middleware import MAX_BODY_BYTES
from cloud.operators.service import Operators
from cloud.records.service import Records
from cloud.releases.service import Releases
from cloud.reports.service import Reports
from cloud.rewards.service import Rewards
from cloud.sessions.service import Sessions
from cloud.settings import CloudSettings
from cloud.users.service import Users
from cloud.wallet.service import Wallet


@dataclass
class Services:
    """Everything the routers use, made once by :func:`cloud.app.create_app`."""

    settings: CloudSettings
    database: Database
    hub: CommandHub
    machines: Machines
    commands: Commands
    sessions: Sessions
    accounts: Accounts
    wallet: Wallet
    rewards: Rewards
    operators: Operators
    fleet: Fleet
    console: ConsoleAuth
    alarms: Alarms
    records: Records
    users: Users
    durable: DurableNonces
    scans_by_network: SharedRateLimiter
    scans_by_machine: SharedRateLimiter
    development: list[str]              # the development providers in use, named
    reports: Reports
    presence: Presence                  # which machines long-poll, at this instance or another
    leases: Leases                      # which background jobs this instance runs
    releases: Releases                  # fleet updates: release bundles, rollouts, the machines' steps
    listener: Listener | None = None    # PostgreSQL: this instance's LISTEN connection (started with the app)
    # when this instance last had an answer from its database (time.monotonic(); the flusher asks each second):
    # /healthz answers from it at once, never waiting behind the requests for a database connection
    database_ok_at: float = field(default_factory=time.monotonic)

    def now(self) -> int:
        return self.settings.clock_ms()


async def services(request: Request) -> Services:       # async: no thread hop
    return request.app.state.services


async def now_ms(request: Request) -> int:
    return request.app.state.services.now()


Svc = Annotated[Services, Depends(services)]
Now = Annotated[int, Depends(now_ms)]
IdPath = Annotated[str, PathParam(max_length=64)]
MachinePath = Annotated[str, PathParam(max_length=64, pattern=p.MACHINE_ID_RE.pattern)]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# a device's long-poll that will be held (most of a minute) is answered only after its nonce is written, and it is
# written by the instance's periodic flush (every NONCE_FLUSH_S, 0.1 s, all the nonces that came meanwhile in one
# transaction) instead of a flush of its own: a flush a poll was most of the cost of a fleet's polls, and at 20,000
# machines a 20 ms gather still made a flush of two or three. HELD_POLL_GATHER_S is how long it waits at most if that
# flush is late. A poll whose answer is awaited (``wait_ms=0``, or a command already waiting for its machine) joins
# a flush within POLL_GATHER_S, with the others that came meanwhile.
HELD_POLL_GATHER_S = 0.25
POLL_GATHER_S = 0.02
LONG_POLL = ("GET", "/device/v1/commands")
# a heartbeat's answer (settings, an offered update) is not waited for either: at 100,000 machines 3,300 arrive a
# second, and a flush each was a third of the database's work for them
HEARTBEAT_GATHER_S = 0.02
GATHER_S = {LONG_POLL: POLL_GATHER_S, ("POST", "/device/v1/heartbeat"): HEARTBEAT_GATHER_S}
TimeMs = Annotated[int, Query(ge=0, le=2**62)]
MAX_ROW_ID = 2**31 - 1                    # integer primary keys (32-bit in PostgreSQL)
RowIdQuery = Annotated[int, Query(ge=1, le=MAX_ROW_ID)]
RowIdPath = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]


async def device(request: Request) -> MachineAuth:
    """A signed dispenser request (:mod:`contract.signing`), its nonce durable before anything is answered."""
    svc: Services = request.app.state.services
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge("body_too_large", f"request bodies are at most {MAX_BODY_BYTES} bytes")
    path = request.scope.get("raw_path", request.url.path.encode()).decode()
    query = request.scope.get("query_string", b"").decode()
    if query:
        path += "?" + query
    headers = {k.lower(): v for k, v in request.headers.items()}
    if svc.machines.cached_secret(headers.get(p.HEADER_MACHINE.lower(), "")) is not None:
        # no database work left (secret cached, nonces in memory): no thread hop
        auth = svc.machines.authenticate(request.method, path, headers, body, svc.now())
    else:
        auth = await run_in_threadpool(svc.machines.authenticate, request.method, path, headers, body, svc.now())
    # replay-safe across a crash before anything is answered; a long-poll or a heartbeat joins a flush within its
    # GATHER_S with the others that came meanwhile (a poll that will be held: the instance's periodic one); any
    # other request asks for one at once
    what = (request.method, request.url.path)
    gather_s = GATHER_S.get(what, 0.0)
    if what == LONG_POLL and request.query_params.get("wait_ms") != "0" \
            and auth.machine_id not in svc.commands.maybe_pending:
        gather_s = HELD_POLL_GATHER_S             # held: written by the instance's next periodic flush
    await svc.durable.durable(auth.nonce_seq, gather_s=gather_s)
    if svc.machines.replayed(auth):                # used before: at another instance, or before a restart
        raise Unauthenticated("replayed_nonce", "this nonce was already used (a replayed request)")
    return auth


def bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("unauthenticated", "log in first (Authorization: Bearer <token>)")
    return authorization[7:].strip()


async def bearer(authorization: Annotated[str | None, Header()] = None) -> str:
    return bearer_token(authorization)


Bearer = Annotated[str, Depends(bearer)]


def user(token: Bearer, svc: Svc) -> str:
    return svc.accounts.user_for_token(token, svc.now())


def operator_role(min_role: str, only: tuple[str, ...] = ()) -> Callable[..., dict[str, Any]]:
    """An operator of at least ``min_role`` (or, with ``only``, of exactly one of those roles: separation of
    duties, e.g. a reviewer who sees ID photos may not also move money): by bearer token (scripts), or by the
    console's session cookie, which for anything but reading also needs the session's CSRF token in a header."""
    def dep(request: Request, svc: Svc, authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        if authorization or COOKIE not in request.cookies:
            return svc.operators.authenticate(bearer_token(authorization), min_role, only, svc.now())
        cookie = request.cookies[COOKIE]
        row = svc.console.session(cookie, svc.now())
        if request.method not in SAFE_METHODS and not svc.console.csrf_ok(cookie, request.headers.get(CSRF_HEADER, "")):
            raise Forbidden("csrf", f"this request needs the {CSRF_HEADER} header of the console page")
        check_role(row, min_role, only)
        return row
    return dep


Device = Annotated[MachineAuth, Depends(device)]
User = Annotated[str, Depends(user)]
Viewer = Annotated[dict, Depends(operator_role("viewer"))]
Operator = Annotated[dict, Depends(operator_role("operator"))]
Reviewer = Annotated[dict, Depends(operator_role("reviewer"))]
MoneyOperator = Annotated[dict, Depends(operator_role("operator", only=("operator", "admin")))]   # not reviewers
Admin = Annotated[dict, Depends(operator_role("admin"))]
