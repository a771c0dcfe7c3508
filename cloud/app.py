"""The HTTP API (FastAPI). Device endpoints are signed (see :mod:`contract.signing`); operator and phone
endpoints take bearer tokens. Every refusal is a 4xx with ``{"error": code, "message": text}``."""


import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import and_, or_, select
from starlette.exceptions import HTTPException as StarletteHTTPException

import contract as p
from cloud import db as t
from cloud.accounts import Accounts, AccountSettings, DevAutoVerify, DevSmsSink, ManualReview, SmsProvider, Verifier
from cloud.db import Database
from cloud.hub import CommandHub
from cloud.identity import MAX_PHOTO_BYTES
from cloud.pages import add_pages
from cloud.payments import PaymentProvider, SandboxPay, Wallet
from cloud.phone_api import PhoneDeps, add_phone_routes, bill_view, bill_views, me_extra
from cloud.ratelimit import RateLimiter
from cloud.rewards import Rewards
from cloud.schemas import (
    AlarmsOut,
    ClearLockoutIn,
    CommandOut,
    CommandQueuedOut,
    DevUserIn,
    DevUserOut,
    EnrollIn,
    EnrollOut,
    Err,
    HealthOut,
    MachineInfoOut,
    MachineSettingsIn,
    MachinesOut,
    MeOut,
    OkOut,
    ProvisionIn,
    ProvisionOut,
    RecordsOut,
    ScanOut,
    ServiceIn,
    SessionOut,
    StartIn,
    StartOut,
)
from cloud.security import SecretBox, token_hash
from cloud.service import (
    SILENT_AFTER_MS,
    ApiError,
    Commands,
    MachineAuth,
    Machines,
    Sessions,
    audit,
    balance,
    create_dev_user,
)

log = logging.getLogger("tapshare.cloud")
MAX_BODY_BYTES = 256 * 1024
LONG_POLL_MAX_S = 60.0
NONCE_FLUSH_S = 0.1
ROLES = {"viewer": 0, "operator": 1, "reviewer": 2, "admin": 3}   # reviewer: may see ID photos
BODY_LIMITS = {"/api/v1/me/id-photo": MAX_PHOTO_BYTES + 64 * 1024}   # paths allowed more than MAX_BODY_BYTES


class BodyLimit:
    """Refuses bodies over MAX_BODY_BYTES with 413, by Content-Length or while streaming (chunked bodies too), and
    NUL characters in the path, the query or a body (400: PostgreSQL cannot store them). Pure ASGI: no
    per-request task overhead."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = BODY_LIMITS.get(path, MAX_BODY_BYTES)
        raw = scope.get("raw_path") or path.encode()
        if b"\x00" in raw or b"%00" in raw.lower() or b"%00" in scope.get("query_string", b"").lower() \
                or "\x00" in path:
            await self._send(send, 400, "nul_character", "NUL characters are not allowed in a request")
            return
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > limit):
                await self._refuse(send, limit)
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
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


@dataclass
class CloudSettings:
    database_url: str = ""
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("TAPSHARE_DATA_DIR", "data/cloud")))
    public_url: str = field(default_factory=lambda: os.environ.get("TAPSHARE_PUBLIC_URL", "http://127.0.0.1:8700"))
    production: bool = field(default_factory=lambda: os.environ.get("TAPSHARE_PRODUCTION", "") == "1")
    background_interval_s: float = 1.0
    clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    # accounts (issue 6); None picks the development providers, which production mode refuses
    sms_provider: SmsProvider | None = None
    verifier: Verifier | None = None
    payment_provider: PaymentProvider | None = None
    id_verify: str = field(default_factory=lambda: os.environ.get("TAPSHARE_ID_VERIFY", ""))
    photo_retention_days: int = field(
        default_factory=lambda: int(os.environ.get("TAPSHARE_ID_PHOTO_RETENTION_DAYS", "30")))
    timezone: str = "Asia/Shanghai"
    # who handles the personal information (named in the consent text and the user agreement, as PIPL requires)
    operator_name: str = field(default_factory=lambda: os.environ.get("TAPSHARE_OPERATOR_NAME", ""))
    operator_contact: str = field(default_factory=lambda: os.environ.get("TAPSHARE_OPERATOR_CONTACT", ""))
    header_timeout_s: float = field(default_factory=lambda: float(os.environ.get("TAPSHARE_HEADER_TIMEOUT_S", "10")))
    operator_token_days: int = field(default_factory=lambda: int(os.environ.get("TAPSHARE_OPERATOR_TOKEN_DAYS", "90")))
    scans_per_minute_per_network: int = field(
        default_factory=lambda: int(os.environ.get("TAPSHARE_SCANS_PER_MINUTE_PER_NETWORK", "30")))
    scans_per_minute_per_machine: int = field(
        default_factory=lambda: int(os.environ.get("TAPSHARE_SCANS_PER_MINUTE_PER_MACHINE", "120")))

    def url(self) -> str:
        return self.database_url or os.environ.get("TAPSHARE_DATABASE_URL") or \
            f"sqlite:///{(self.data_dir / 'cloud.db').resolve()}"


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": Err} for s in (400, 401, 403, 404, 409, 410, 413, 422)}


class ProductionRefused(RuntimeError):
    pass


def _providers(settings: CloudSettings, box: SecretBox) -> tuple[SmsProvider, Verifier, PaymentProvider]:
    """The configured providers; production mode refuses every development one, with the reason."""
    sms = settings.sms_provider or DevSmsSink()
    mode = settings.id_verify or ("manual" if settings.production else "dev_auto")
    if mode not in ("manual", "dev_auto"):
        raise ProductionRefused(f"TAPSHARE_ID_VERIFY must be manual or dev_auto, not {mode!r}")
    verifier = settings.verifier or (DevAutoVerify() if mode == "dev_auto" else ManualReview())
    pay = settings.payment_provider or SandboxPay(box.subkey("sandbox-pay"))
    if settings.production:
        problems = [f"{what} is the development {p.name}" for what, p in
                    (("the SMS provider", sms), ("identity verification", verifier), ("the payment provider", pay))
                    if p.is_development]
        if not settings.operator_name.strip() or not settings.operator_contact.strip():
            problems.append("TAPSHARE_OPERATOR_NAME and TAPSHARE_OPERATOR_CONTACT must name who handles personal "
                            "information and how to reach them")
        if not settings.public_url.startswith("https://"):
            problems.append(f"TAPSHARE_PUBLIC_URL must be https:// (is {settings.public_url})")
        if problems:
            raise ProductionRefused("production mode refuses to start: " + "; ".join(problems))
    return sms, verifier, pay


class DurableNonces:
    """Group commit of the replay guard: a device request is answered only after its nonce is in the database.
    Requests that arrive while a flush runs wait for the next one, which takes them all in one transaction."""

    def __init__(self, machines: Machines) -> None:
        self.machines = machines
        self._wake = asyncio.Event()
        self._next: asyncio.Future | None = None

    async def durable(self, seq: int, timeout_s: float = 10.0) -> None:
        while self.machines.nonces_durable_seq < seq:
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            fut = self._next
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except Exception as e:
                raise ApiError(503, "busy", "the server could not record this request; try again",
                               retry_after_s=1) from e

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            fut, self._next = self._next, None
            try:
                await run_in_threadpool(self.machines.flush_nonces)
            except Exception as e:
                log.exception("cannot write the replay guard's nonces")
                if fut is not None and not fut.done():
                    fut.set_exception(e)
                    fut.exception()                     # retrieved: no "never retrieved" warning
                await asyncio.sleep(0.1)
                continue
            if fut is not None and not fut.done():
                fut.set_result(True)


def create_app(settings: CloudSettings | None = None) -> FastAPI:
    settings = settings or CloudSettings()
    os.umask(0o077)                    # the database, keys and photos are for this service's user alone
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    for name in ("cloud.db", "cloud.db-wal", "cloud.db-shm", "server.key"):
        if (settings.data_dir / name).exists():
            os.chmod(settings.data_dir / name, 0o600)
    database = Database(settings.url())
    database.create_all()
    box = SecretBox.from_env_or_file(settings.data_dir / "server.key", production=settings.production)
    hub = CommandHub()
    machines = Machines(database, box, settings.clock_ms())
    commands = Commands(database, settings.clock_ms())

    def notify(machine_id: str) -> None:
        commands.mark(machine_id)
        hub.notify(machine_id)

    sessions = Sessions(database, machines, hub.connected, notify)
    now = settings.clock_ms
    sms, verifier, pay = _providers(settings, box)
    accounts = Accounts(database, box, sms, verifier, AccountSettings(
        photo_dir=settings.data_dir / "private" / "id-photos", photo_retention_days=settings.photo_retention_days,
        timezone=settings.timezone))
    wallet = Wallet(database, pay)
    rewards = Rewards(database)
    durable = DurableNonces(machines)
    development = [f"{what}: {prov.name}" for what, prov in (("SMS", sms), ("identity verification", verifier),
                                                             ("payments", pay)) if prov.is_development]
    if development:
        log.warning("DEVELOPMENT PROVIDERS ARE ON (%s): no real SMS is sent and no real money moves; login codes "
                    "are shown to the browser that asked for them. Never run this for customers.",
                    "; ".join(development))
    scans_by_network = RateLimiter(settings.scans_per_minute_per_network, 60_000)
    scans_by_machine = RateLimiter(settings.scans_per_minute_per_machine, 60_000)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.bind(asyncio.get_running_loop())
        task = asyncio.create_task(background())
        flusher = asyncio.create_task(durable.run())
        yield
        task.cancel()
        flusher.cancel()
        machines.flush_nonces()
        database.dispose()

    async def background() -> None:
        last_void = last_prune = time.monotonic()
        while True:
            await asyncio.sleep(NONCE_FLUSH_S)
            try:
                await run_in_threadpool(machines.flush_nonces)
                mono = time.monotonic()
                if mono - last_void >= settings.background_interval_s:
                    last_void = mono
                    for sid in await run_in_threadpool(sessions.void_unacknowledged, now()):
                        log.warning("session %s voided: the machine did not claim it by its deadline", sid)
                    for sid in await run_in_threadpool(sessions.reconcile_stale, now()):
                        log.warning("session %s lost: no report long after it must have ended", sid)
                    for oid in await run_in_threadpool(wallet.close_expired, now()):
                        log.info("top-up order %s closed unpaid", oid)
                if mono - last_prune >= 60:
                    last_prune = mono
                    await run_in_threadpool(machines.prune_nonces, now())
                    deleted = await run_in_threadpool(accounts.purge_photos, now())
                    if deleted:
                        log.info("%d ID photos deleted (retention %d days)", deleted, settings.photo_retention_days)
            except Exception:
                log.exception("background task failed")

    app = FastAPI(title="Tapshare cloud", version="0.1.0", lifespan=lifespan,
                  description="Shared drinking-water dispensers: device protocol, phone API, operators.")
    app.state.database, app.state.hub, app.state.machines, app.state.sessions = database, hub, machines, sessions
    app.state.settings = settings
    app.state.accounts, app.state.wallet, app.state.rewards = accounts, wallet, rewards
    app.add_middleware(BodyLimit)
    if settings.production:
        app.add_middleware(HttpsOnly)

    @app.exception_handler(ApiError)
    async def api_error(_req: Request, e: ApiError) -> JSONResponse:
        headers = {}
        if e.status in (429, 503):
            headers["Retry-After"] = str(int(e.extra.get("retry_after_s", 1)))
        return JSONResponse({"error": e.code, "message": e.message, **e.extra}, status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown paths, wrong methods and the like, in the one error shape every 4xx uses."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        return JSONResponse({"error": code, "message": str(e.detail)}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_req: Request, e: Exception) -> JSONResponse:
        log.error("internal error: %r", e, exc_info=e)
        return JSONResponse({"error": "internal", "message": "an internal error: it was logged; try again"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_req: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"error": "invalid_request", "message": f"{where}: {first.get('msg', 'invalid')}",
                             "details": [{"loc": list(x.get("loc", ())), "msg": x.get("msg")} for x in e.errors()]},
                            status_code=422)

    # ---------------------------------------------------------------- auth dependencies
    async def device(request: Request) -> MachineAuth:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"request bodies are at most {MAX_BODY_BYTES} bytes")
        path = request.scope.get("raw_path", request.url.path.encode()).decode()
        query = request.scope.get("query_string", b"").decode()
        if query:
            path += "?" + query
        headers = {k.lower(): v for k, v in request.headers.items()}
        if machines.cached_secret(headers.get(p.HEADER_MACHINE.lower(), "")) is not None:
            # no database work left (secret cached, nonces in memory): no thread hop
            auth = machines.authenticate(request.method, path, headers, body, now())
        else:
            auth = await run_in_threadpool(machines.authenticate, request.method, path, headers, body, now())
        await durable.durable(auth.nonce_seq)      # replay-safe across a crash before anything is answered
        return auth

    def bearer(authorization: str | None) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "unauthenticated", "log in first (Authorization: Bearer <token>)")
        return authorization[7:].strip()

    def operator(min_role: str, only: tuple[str, ...] = ()) -> Callable[..., dict[str, Any]]:
        """An operator of at least ``min_role`` (or, with ``only``, of exactly one of those roles: separation of
        duties, e.g. a reviewer who sees ID photos may not also move money)."""
        def dep(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
            tok = bearer(authorization)
            with database.read() as conn:
                row = conn.execute(select(t.operators).where(t.operators.c.token_hash == token_hash(tok))) \
                    .mappings().first()
            if row is None or row["revoked_ms"] is not None:
                raise ApiError(401, "unauthenticated", "unknown or revoked operator token")
            if row["expires_ms"] is not None and row["expires_ms"] < now():
                raise ApiError(401, "token_expired", "this operator token has expired: ask an admin for a new one")
            if ROLES[row["role"]] < ROLES[min_role] or (only and row["role"] not in only):
                need = " or ".join(only) if only else f"at least {min_role}"
                raise ApiError(403, "forbidden", f"this needs the {need} role; you are {row['role']}")
            return dict(row)
        return dep

    def user(authorization: Annotated[str | None, Header()] = None) -> str:
        tok = bearer(authorization)
        with database.read() as conn:
            row = conn.execute(select(t.user_tokens.c.user_id, t.user_tokens.c.expires_ms)
                               .where(t.user_tokens.c.token_hash == token_hash(tok))).first()
        if row is None or row[1] < now():
            raise ApiError(401, "unauthenticated", "your login has expired: log in again")
        return row[0]

    def machine_out(m: dict[str, Any]) -> dict[str, Any]:
        d = {k: v for k, v in m.items() if k != "secret_enc"}
        d["enrolled"] = m["secret_enc"] is not None
        d["online"] = hub.connected(m["machine_id"]) or (m["last_seen_ms"] or 0) > now() - SILENT_AFTER_MS
        return d

    Device = Annotated[MachineAuth, Depends(device)]
    IdPath = Annotated[str, PathParam(max_length=64)]
    TimeMs = Annotated[int, Query(ge=0, le=2**62)]
    User = Annotated[str, Depends(user)]

    # ---------------------------------------------------------------- health
    @app.get("/healthz", response_model=HealthOut, tags=["health"])
    def health() -> dict[str, Any]:
        with database.read() as conn:
            conn.execute(select(1))
        return {"status": "ok", "database": "sqlite" if database.is_sqlite else "postgresql",
                "connected_machines": hub.connected_count, "production": settings.production,
                "development_providers": development, "version": p.SOFTWARE_VERSION,
                "protocol_versions": sorted(p.SUPPORTED_PROTOCOL_VERSIONS)}

    # ---------------------------------------------------------------- devices
    @app.get("/device/v1/time", response_model=p.TimeResponse, tags=["device"])
    def server_time() -> p.TimeResponse:
        """Unsigned: a device with a wrong clock needs this before it can sign anything."""
        return p.TimeResponse(server_time_ms=now())

    @app.post("/device/v1/enroll", response_model=EnrollOut, responses=ERRORS, tags=["device"])
    def enroll(body: EnrollIn) -> dict[str, Any]:
        secret = machines.enroll(body.machine_id, body.enrolment_token, now())
        return {"machine_id": body.machine_id, "secret_hex": secret.hex(),
                "note": "store this secret on the machine now; it is not shown again"}

    @app.get("/device/v1/commands", response_model=p.CommandsResponse, responses=ERRORS, tags=["device"])
    async def poll_commands(auth: Device, wait_ms: Annotated[int, Query(ge=0, le=int(LONG_POLL_MAX_S * 1000))] = 25_000
                            ) -> p.CommandsResponse:
        """Long-poll: returns at once if commands are waiting, else when one is queued or ``wait_ms`` passes."""
        async with hub.polling(auth.machine_id) as ev:
            cmds, again_ms = [], None
            if auth.machine_id in commands.maybe_pending:
                cmds, again_ms = await run_in_threadpool(commands.pending, auth.machine_id, now())
            if not cmds and wait_ms and not hub.closing:
                # wait for a new command, or until one handed out earlier and never acknowledged is due again
                wait_s = wait_ms / 1000 if again_ms is None else min(wait_ms / 1000, max(0.0, again_ms - now()) / 1000)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), wait_s)
                if ev.is_set() or again_ms is not None:
                    cmds, _ = await run_in_threadpool(commands.pending, auth.machine_id, now())
        return p.CommandsResponse(commands=cmds, server_time_ms=now())

    @app.post("/device/v1/commands/{command_id}/ack", response_model=p.AckResult, responses=ERRORS, tags=["device"])
    def ack_command(command_id: IdPath, body: p.AckMsg, auth: Device) -> p.AckResult:
        """The machine's answer to a command; for a start, its claim (409 ``start_void``: do not pour)."""
        return sessions.ack(auth.machine_id, command_id, body, now())

    @app.post("/device/v1/events", response_model=p.EventBatchResult, responses=ERRORS, tags=["device"])
    def post_events(body: p.EventBatch, auth: Device) -> p.EventBatchResult:
        return p.EventBatchResult(results=sessions.receive_events(auth.machine_id, body, now()), server_time_ms=now())

    @app.post("/device/v1/progress", response_model=OkOut, responses=ERRORS, tags=["device"])
    def post_progress(body: p.ProgressMsg, auth: Device) -> dict[str, Any]:
        sessions.progress(auth.machine_id, body)
        return {"ok": True}

    @app.post("/device/v1/heartbeat", response_model=p.HeartbeatResponse, responses=ERRORS, tags=["device"])
    def post_heartbeat(body: p.HeartbeatMsg, auth: Device) -> p.HeartbeatResponse:
        """Telemetry in; the machine's settings (price shown, time zone, hotline) out."""
        m = machines.heartbeat(auth.machine_id, body, now())
        for sid in sessions.reconcile(auth.machine_id, body, auth.timestamp_ms, now()):
            log.warning("session %s lost: machine %s says it has no such session", sid, auth.machine_id)
        return p.HeartbeatResponse(server_time_ms=now(), settings=p.MachineSettingsMsg(
            price_fen_per_l=m["price_fen_per_l"], timezone=m["timezone"], hotline=m["hotline"]))

    # ---------------------------------------------------------------- phones
    @app.get("/api/v1/scan", response_model=ScanOut, responses=ERRORS, tags=["phone"])
    def scan(machine: Annotated[str, Query(min_length=1, max_length=64, pattern=p.MACHINE_ID_RE.pattern)],
             c: Annotated[str, Query(min_length=1, max_length=16)], request: Request) -> dict[str, Any]:
        """What opening the QR link does: checks the time-based code, consumes nothing. Limited per network and
        per machine (a code has 8 digits; guessing is made slow)."""
        ip = request.client.host if request.client else "?"
        for limiter, key, what in ((scans_by_network, ip, "network"), (scans_by_machine, machine, "machine")):
            wait_s = limiter.hit(key, now())
            if wait_s is not None:
                raise ApiError(429, "too_many_scans", f"too many scans from this {what}; try again in {wait_s} s",
                               retry_after_s=wait_s)
        token, info = sessions.scan(machine, c, now())
        return {"presence_token": token, "machine": info}

    @app.post("/api/v1/sessions", response_model=StartOut, tags=["phone"],
              responses={**ERRORS, 402: {"model": Err}, 503: {"model": Err}})
    def start_session(body: StartIn, user_id: User) -> dict[str, Any]:
        return sessions.start(user_id, body.presence_token, body.expected_price_fen_per_l, now())

    @app.get("/api/v1/sessions/{session_id}", response_model=SessionOut, responses=ERRORS, tags=["phone"])
    def get_session(session_id: IdPath, user_id: User) -> dict[str, Any]:
        out = sessions.view(user_id, session_id)
        if out["bill"]:
            with database.read() as conn:
                out["bill"] = bill_view(conn, out["bill"])
        return out

    @app.post("/api/v1/sessions/{session_id}/stop", response_model=OkOut, responses=ERRORS, tags=["phone"])
    def stop_session(session_id: IdPath, user_id: User) -> dict[str, Any]:
        sessions.stop(user_id, session_id, now())
        return {"ok": True}

    @app.get("/api/v1/me", response_model=MeOut, responses=ERRORS, tags=["phone"])
    def me(user_id: User) -> dict[str, Any]:
        with database.read() as conn:
            u = conn.execute(select(t.users).where(t.users.c.user_id == user_id)).mappings().first()
            available, held = balance(conn, user_id)
            bills = conn.execute(select(t.bills).where(t.bills.c.user_id == user_id)
                                 .order_by(t.bills.c.created_ms.desc()).limit(50)).mappings().all()
            extra = me_extra(conn, user_id)
            bills = bill_views(conn, [dict(b) for b in bills])
        return {"user_id": user_id, "registered": u["registered"], "points": u["points"],
                "balance_fen": available + held, "held_fen": held, "available_fen": available,
                "arrears_fen": max(0, -available), "bills": bills, **extra,
                "running_session": sessions.running_session(user_id)}

    @app.get("/api/v1/machines/{machine_id}", response_model=MachineInfoOut, responses=ERRORS, tags=["phone"])
    def machine_status(machine_id: Annotated[str, PathParam(max_length=64, pattern=p.MACHINE_ID_RE.pattern)]) \
            -> dict[str, Any]:
        """What the machine shows anyway (place, price, water, whether it can serve now): the phone polls it
        while a person stands at the machine, so "out of service" or "busy" reaches them within a second."""
        return sessions.machine_info(machine_id, now())       # 404 unknown_machine from the row lookup

    # ---------------------------------------------------------------- operators
    Viewer = Annotated[dict, Depends(operator("viewer"))]
    Operator = Annotated[dict, Depends(operator("operator"))]
    Admin = Annotated[dict, Depends(operator("admin"))]

    @app.post("/api/v1/operator/machines", response_model=ProvisionOut, responses=ERRORS, tags=["operator"])
    def provision(body: ProvisionIn, op: Admin) -> dict[str, Any]:
        token = machines.provision(op["operator_id"], body.machine_id, body.location, body.price_fen_per_l,
                                   max_volume_ml=body.max_volume_ml, max_duration_ms=body.max_duration_ms,
                                   max_idle_ms=body.max_idle_ms, max_credit_fen=body.max_credit_fen, now_ms=now(),
                                   min_dispense_ml=body.min_dispense_ml)
        return {"machine_id": body.machine_id, "enrolment_token": token,
                "note": "single use: give it to the technician who enrols the machine"}

    @app.get("/api/v1/operator/machines", response_model=MachinesOut, tags=["operator"], responses=ERRORS)
    def list_machines(op: Viewer) -> dict[str, Any]:
        with database.read() as conn:
            rows = conn.execute(select(t.machines).order_by(t.machines.c.machine_id)).mappings().all()
        return {"machines": [machine_out(dict(m)) for m in rows]}

    @app.patch("/api/v1/operator/machines/{machine_id}", response_model=MachinesOut, responses=ERRORS,
               tags=["operator"])
    def change_machine(machine_id: IdPath, body: MachineSettingsIn, op: Operator) -> dict[str, Any]:
        """Change a machine's price or limits (new grants use them); a new price is sent to the machine."""
        machines.get(machine_id)
        changes = body.model_dump(exclude_none=True)
        with database.tx() as conn:
            conn.execute(t.machines.update().where(t.machines.c.machine_id == machine_id).values(**changes))
            if body.price_fen_per_l is not None:
                Commands.queue(conn, machine_id, "price", now(), price_fen_per_l=body.price_fen_per_l)
            audit(conn, op["operator_id"], "change_machine", machine_id, changes, now())
        if body.price_fen_per_l is not None:
            notify(machine_id)
        return {"machines": [machine_out(machines.get(machine_id))]}

    @app.post("/api/v1/operator/machines/{machine_id}/clear-lockout", response_model=CommandQueuedOut,
              responses=ERRORS, tags=["operator"])
    def clear_lockout(machine_id: IdPath, body: ClearLockoutIn, op: Operator) -> dict[str, Any]:
        """Ask the machine to clear a lockout remotely (ghost flow, operator); a wet leak sensor's lockout is
        refused by the machine itself: that needs a technician on site."""
        machines.get(machine_id)
        with database.tx() as conn:
            cid = Commands.queue(conn, machine_id, "clear_lockout", now(), reason=body.reason)
            audit(conn, op["operator_id"], "clear_lockout", machine_id, {"reason": body.reason}, now())
        notify(machine_id)
        return {"machine_id": machine_id, "command": "clear_lockout", "command_id": cid}

    @app.post("/api/v1/operator/machines/{machine_id}/revoke-key", response_model=OkOut, responses=ERRORS,
              tags=["operator"])
    def revoke_machine_key(machine_id: IdPath, op: Admin) -> dict[str, Any]:
        """Forget the machine's secret: it is refused at once (audited). Re-enrol it with a new enrolment token."""
        machines.revoke_key(op["operator_id"], machine_id, now())
        return {"ok": True}

    @app.post("/api/v1/operator/machines/{machine_id}/enrolment-token", response_model=ProvisionOut,
              responses=ERRORS, tags=["operator"])
    def enrolment_token(machine_id: IdPath, op: Admin) -> dict[str, Any]:
        token = machines.new_enrolment_token(op["operator_id"], machine_id, now())
        return {"machine_id": machine_id, "enrolment_token": token,
                "note": "single use: give it to the technician who enrols the machine"}

    @app.post("/api/v1/operator/logout", response_model=OkOut, responses=ERRORS, tags=["operator"])
    def operator_logout(op: Viewer) -> dict[str, Any]:
        """Revoke the token this request carries."""
        with database.tx() as conn:
            conn.execute(t.operators.update().where(t.operators.c.operator_id == op["operator_id"])
                         .values(revoked_ms=now()))
            audit(conn, op["operator_id"], "logout", op["operator_id"], {}, now())
        return {"ok": True}

    @app.post("/api/v1/operator/operators/{operator_id}/revoke", response_model=OkOut, responses=ERRORS,
              tags=["operator"])
    def revoke_operator(operator_id: IdPath, op: Admin) -> dict[str, Any]:
        """An admin revokes another operator's token (audited); the next request with it is refused."""
        with database.tx() as conn:
            changed = conn.execute(t.operators.update().where(and_(t.operators.c.operator_id == operator_id,
                                                                   t.operators.c.revoked_ms.is_(None)))
                                   .values(revoked_ms=now())).rowcount
            if not changed:
                raise ApiError(404, "unknown_operator", "no such operator with a live token")
            audit(conn, op["operator_id"], "revoke_operator", operator_id, {}, now())
        return {"ok": True}

    @app.post("/api/v1/operator/machines/{machine_id}/service", response_model=CommandQueuedOut, responses=ERRORS,
              tags=["operator"])
    def set_service(machine_id: IdPath, body: ServiceIn, op: Operator) -> dict[str, Any]:
        machines.get(machine_id)
        kind: Literal["in_service", "out_of_service"] = "in_service" if body.in_service else "out_of_service"
        with database.tx() as conn:
            cid = Commands.queue(conn, machine_id, kind, now(), detail=body.detail)
            audit(conn, op["operator_id"], kind, machine_id, {"detail": body.detail}, now())
        notify(machine_id)
        return {"machine_id": machine_id, "command": kind, "command_id": cid}

    @app.get("/api/v1/operator/commands/{command_id}", response_model=CommandOut, responses=ERRORS,
             tags=["operator"])
    def command_status(command_id: IdPath, op: Viewer) -> dict[str, Any]:
        """What became of a command sent to a machine: delivered, acknowledged, refused with the reason."""
        with database.read() as conn:
            row = conn.execute(select(t.commands).where(t.commands.c.command_id == command_id)).mappings().first()
        if row is None:
            raise ApiError(404, "unknown_command", "no such command")
        return {k: row[k] for k in ("command_id", "machine_id", "kind", "created_ms", "expires_ms", "delivered_ms",
                                    "acked_ms", "ack_ok", "ack_reason")}

    @app.get("/api/v1/operator/alarms", response_model=AlarmsOut, responses=ERRORS, tags=["operator"])
    def alarms(op: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        cut = now() - SILENT_AFTER_MS
        with database.read() as conn:
            ev = conn.execute(select(t.machine_events).where(t.machine_events.c.alarm.is_(True))
                              .order_by(t.machine_events.c.received_ms.desc()).limit(limit)).mappings().all()
            silent = conn.execute(select(t.machines.c.machine_id, t.machines.c.last_seen_ms).where(and_(
                t.machines.c.secret_enc.is_not(None),
                or_(t.machines.c.last_seen_ms.is_(None), t.machines.c.last_seen_ms < cut)))).mappings().all()
        return {"alarms": [dict(e) for e in ev],
                "silent_machines": [dict(s) for s in silent if not hub.connected(s["machine_id"])]}

    @app.get("/api/v1/operator/records", response_model=RecordsOut, responses=ERRORS, tags=["operator"])
    def records(op: Viewer, machine_id: Annotated[str | None, Query(max_length=64)] = None,
                user_id: Annotated[str | None, Query(max_length=64)] = None,
                from_ms: TimeMs = 0, to_ms: TimeMs = 2**62,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """s7: rental records by machine, user and time range."""
        r = t.rental_records.c
        q = select(t.rental_records).where(and_(r.started_ms >= from_ms, r.started_ms < to_ms))
        if machine_id:
            q = q.where(r.machine_id == machine_id)
        if user_id:
            q = q.where(r.user_id == user_id)
        with database.read() as conn:
            rows = conn.execute(q.order_by(r.started_ms.desc()).limit(limit)).mappings().all()
        return {"records": [dict(x) for x in rows]}

    @app.post("/api/v1/dev/users", response_model=DevUserOut, responses=ERRORS, tags=["development"])
    def dev_user(body: DevUserIn, op: Admin) -> dict[str, Any]:
        """Development only (refused in production mode): a user with a balance, until accounts exist."""
        if settings.production:
            raise ApiError(403, "production", "development users cannot be created in production mode")
        try:
            user_id, token = create_dev_user(database, body.phone, body.balance_fen, body.registered, now())
        except Exception as e:
            raise ApiError(409, "user_exists", f"a user with phone {body.phone} exists") from e
        with database.tx() as conn:
            audit(conn, op["operator_id"], "dev_create_user", user_id, {"balance_fen": body.balance_fen}, now())
        return {"user_id": user_id, "token": token}

    add_phone_routes(app, PhoneDeps(database=database, accounts=accounts, wallet=wallet, rewards=rewards, now=now,
                                    production=settings.production, errors=ERRORS, user=user, bearer=bearer,
                                    operator=operator, public_url=lambda: settings.public_url.rstrip("/"),
                                    operator_name=settings.operator_name, operator_contact=settings.operator_contact))
    add_pages(app, settings, pay, now, machines)
    return app


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
