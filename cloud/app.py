"""The cloud's web application, assembled from its features (each a folder with ``router.py``, ``service.py``
and ``schemas.py``):

* ``cloud/devices``: dispensers' signed requests, enrolment, command long-poll, heartbeats;
* ``cloud/sessions``: QR scan (the presence check), start, stop, settlement of session reports, bills;
* ``cloud/accounts``: SMS login, consent, real-name registration, review, account deletion;
* ``cloud/wallet``: balances, top-ups through the payment provider, refunds;
* ``cloud/rewards``: points and gifts;
* ``cloud/operators``: the fleet, alarms, rental records, operator tokens;
* ``cloud/alarms``: operators' alarms with a life (open, acknowledged, resolved), their rules and notifications;
* ``cloud/fleet``: the console's fleet list and machine page (rows, charts from heartbeat samples, bulk price);
* ``cloud/reports``: revenue, litres and sessions per day, machine and site;
* ``cloud/releases``: fleet updates: signed release bundles, rollouts, the offer in a heartbeat's answer;
* ``cloud/dev``: development-only routes, never in production.

Device endpoints are signed (see :mod:`contract.signing`); operator and phone endpoints take bearer tokens.
Every refusal is a 4xx with ``{"error": code, "message": text}`` (:mod:`cloud.errors`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from fastapi import FastAPI, routing
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select

import contract as p
from cloud import pages
from cloud.accounts import router as accounts
from cloud.accounts.service import Accounts, AccountSettings
from cloud.alarms import router as alarms
from cloud.alarms.notify import Notifier
from cloud.alarms.rules import alarming
from cloud.alarms.service import Alarms, AlarmSettings
from cloud.cluster import COMMANDS_CHANNEL, KEYS_CHANNEL, Leases, Listener, SharedRateLimiter
from cloud.console import router as console
from cloud.console.service import ConsoleAuth
from cloud.db import Database
from cloud.deps import Services, Svc
from cloud.dev import router as dev
from cloud.devices import router as devices
from cloud.devices.hub import CommandHub, Presence
from cloud.devices.service import Commands, DurableNonces, Machines
from cloud.errors import Unavailable, install_handlers
from cloud.fleet import router as fleet
from cloud.fleet.service import Fleet
from cloud.middleware import BodyLimit, HttpsOnly, SecurityHeaders
from cloud.operators import router as operators
from cloud.operators.service import ROLES, Operators
from cloud.records import router as records
from cloud.records.service import Records
from cloud.releases import router as releases
from cloud.releases.service import Releases
from cloud.reports import router as reports
from cloud.reports.service import Reports
from cloud.rewards import router as rewards
from cloud.rewards.service import Rewards
from cloud.schemas import HealthOut
from cloud.security import SecretBox
from cloud.sessions import router as sessions
from cloud.sessions.service import Sessions
from cloud.settings import CloudSettings, ProductionRefused
from cloud.users import router as users
from cloud.users.service import Users
from cloud.wallet import router as wallet
from cloud.wallet.service import Wallet

__all__ = ["ROLES", "CloudSettings", "ProductionRefused", "create_app"]
log = logging.getLogger("tapshare.cloud")
NONCE_FLUSH_S = 0.1
DATABASE_PROBE_S = 1.0       # the flusher asks the database this often (for /healthz)
HEALTH_DATABASE_S = 10.0     # /healthz answers 503 after this long without an answer from the database
LEASE_MIN_S = 5.0            # a dead instance's background jobs move to another after this long, at least


def build_routes(app: FastAPI) -> int:
    """Build every route now; returns how many. FastAPI builds an included router's routes (their parameters' and
    answers' models) at the first request that reaches the router, on the event loop: 0.3-0.5 s under a fleet's
    load with every held long-poll waiting, at the first phone start after each (rolling) restart. ``python -m
    cloud serve`` calls this before it listens (and before the collector freezes what the app holds); a test's
    server, one of hundreds in a process, builds them as its requests arrive (0.4 s an app)."""
    return sum(1 for _ in routing.iter_route_contexts(app.routes))


def create_app(settings: CloudSettings | None = None) -> FastAPI:
    settings = settings or CloudSettings()
    svc = build_services(settings)
    app = FastAPI(title="Tapshare cloud", version=p.SOFTWARE_VERSION, lifespan=lifespan,
                  description="Shared drinking-water dispensers: device protocol, phone API, operators.")
    app.state.services = svc
    # for the server's graceful stop (it wakes every held long-poll), tests and tools
    app.state.database, app.state.settings, app.state.hub = svc.database, settings, svc.hub
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders, page_headers=pages.PAGE_HEADERS, production=settings.production)
    if settings.production:
        app.add_middleware(HttpsOnly)
    install_handlers(app)
    app.add_api_route("/healthz", health, methods=["GET"], response_model=HealthOut, tags=["health"])
    for feature in (devices, sessions, accounts, wallet, rewards, operators, fleet, console, alarms, records, users,
                    pages, reports, releases):
        app.include_router(feature.router)
    app.include_router(releases.device_router)
    app.include_router(console.pages)
    if not settings.production:
        app.include_router(dev.router)
        if "sandbox" in svc.wallet.providers:
            app.include_router(dev.sandbox_router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    return app


def build_services(settings: CloudSettings) -> Services:
    """The database, the keys and every feature's service, wired once."""
    os.umask(0o077)                    # the database, keys and photos are for this service's user alone
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    for name in ("cloud.db", "cloud.db-wal", "cloud.db-shm", "server.key"):
        if (settings.data_dir / name).exists():
            os.chmod(settings.data_dir / name, 0o600)
    database = Database(settings.url())
    database.create_all()
    box = SecretBox.from_env_or_file(settings.data_dir / "server.key", production=settings.production)
    sms, verifier, pay = settings.providers(box)
    thresholds = settings.alarm_thresholds()
    hub = CommandHub()
    machines = Machines(database, box, settings.clock_ms(), alarm_hint=lambda hb: alarming(hb, thresholds))
    presence = Presence(hub, database, settings.clock_ms, shared=not database.is_sqlite)
    commands = Commands(database, settings.clock_ms())

    def notify(machine_id: str) -> None:
        commands.mark(machine_id)
        hub.notify(machine_id)

    development = [f"{what}: {prov.name}" for what, prov in (("SMS", sms), ("identity verification", verifier),
                                                             *(("payments", x) for x in pay.values()))
                   if prov.is_development]
    if development:
        log.warning("DEVELOPMENT PROVIDERS ARE ON (%s): no real SMS is sent and no real money moves; login codes "
                    "are shown to the browser that asked for them. Never run this for customers.",
                    "; ".join(development))
    wallet = Wallet(database, pay, box.subkey("payer-link"), public_url=lambda: settings.public_url)
    accounts_settings = AccountSettings(photo_dir=settings.data_dir / "private" / "id-photos",
                                        photo_retention_days=settings.photo_retention_days, timezone=settings.timezone)
    accounts = Accounts(database, box, sms, verifier, accounts_settings)
    accounts.payout = wallet.withdraw_for_deletion
    accounts.send_refunds = wallet.send_refunds
    notifier = Notifier(database, settings.notify_settings(), public_url=lambda: settings.public_url,
                        clock_ms=settings.clock_ms)
    alarm_settings = AlarmSettings(settings.alarm_offline_after_s * 1000, thresholds)
    operators = Operators(database, machines, presence.connected, notify)
    return Services(
        settings=settings, database=database, hub=hub, machines=machines, commands=commands,
        sessions=Sessions(database, machines, presence.connected, notify),
        accounts=accounts, wallet=wallet,
        rewards=Rewards(database), operators=operators, fleet=Fleet(database, operators, notify),
        console=ConsoleAuth(database, box), alarms=Alarms(database, alarm_settings, presence.connected, notifier),
        records=Records(database), users=Users(database, accounts.pii),
        durable=DurableNonces(machines), development=development, reports=Reports(database),
        scans_by_network=SharedRateLimiter(database, "scans_by_network", settings.scans_per_minute_per_network, 60_000),
        scans_by_machine=SharedRateLimiter(database, "scans_by_machine", settings.scans_per_minute_per_machine, 60_000),
        presence=presence, leases=Leases(database, settings.instance_id),
        releases=Releases(database, settings.data_dir, settings.release_keys_dir))


async def health(svc: Svc) -> dict:
    """For the load balancer: 200 while this instance serves; 503 once it is stopping (it drains: it serves as
    usual while the balancer sends new requests elsewhere, then answers its held long-polls, lets the requests
    in flight finish and exits) or has had no answer from its
    database for ``HEALTH_DATABASE_S``. Answered on the event loop from what the flusher last saw, not behind the
    requests waiting for a database connection: an instance busy with a burst of polls is slow, not dead, and a
    late answer took every instance out of the balancer at once (issue 21's benchmark at 10,000 machines)."""
    if svc.hub.draining or svc.hub.closing:
        raise Unavailable("draining", f"instance {svc.settings.instance_id} is stopping", retry_after_s=1)
    silent_s = time.monotonic() - svc.database_ok_at
    if silent_s > HEALTH_DATABASE_S:
        raise Unavailable("database_unreachable", f"no answer from the database for {silent_s:.0f} s",
                          retry_after_s=1)
    return {"status": "ok", "database": "sqlite" if svc.database.is_sqlite else "postgresql",
            "instance": svc.settings.instance_id, "listening": svc.listener is None or svc.listener.connected.is_set(),
            "connected_machines": svc.hub.connected_count, "production": svc.settings.production,
            "development_providers": svc.development, "version": p.SOFTWARE_VERSION,
            "protocol_versions": sorted(p.SUPPORTED_PROTOCOL_VERSIONS)}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    svc: Services = app.state.services
    loop = asyncio.get_running_loop()
    svc.hub.bind(loop)
    if not svc.database.is_sqlite:
        await run_in_threadpool(svc.database.warm)
        svc.listener = listener(svc)
        svc.listener.start()
    tasks = [asyncio.create_task(job(svc)) for job in (flusher, background, payments_background, notify_background)]
    tasks.append(asyncio.create_task(svc.durable.run()))
    yield
    for task in tasks:
        task.cancel()
    if svc.listener is not None:
        svc.listener.stop()
    svc.machines.flush_nonces()
    try:
        svc.presence.flush()
        svc.leases.release_all()            # another instance takes the background jobs over at once
    except Exception:
        log.exception("could not hand the background jobs over")
    svc.database.dispose()


def listener(svc: Services) -> Listener:
    """This instance's one ``LISTEN`` connection: commands queued at any instance wake the long-polls held here;
    device keys revoked or re-enrolled anywhere are dropped from this instance's cache."""
    def command(machine_id: str) -> None:
        svc.commands.mark(machine_id)
        svc.hub.notify(machine_id)

    def connected() -> None:                # (re)connected: whatever was announced meanwhile is looked up instead
        svc.machines.reload_secrets()
        for machine_id in svc.commands.due_machines(svc.now()):
            svc.hub.notify(machine_id)

    return Listener(svc.database.url, {COMMANDS_CHANNEL: command, KEYS_CHANNEL: svc.machines.forget_secret},
                    on_connect=connected)


def _leased(svc: Services, job: str, every_s: float) -> bool:
    """Whether this instance runs ``job`` now: it holds the job's lease (renewed each run, lapsing after a few
    missed runs, so the job moves to another instance when this one dies)."""
    return svc.leases.hold(job, svc.now(), int(max(3 * every_s, LEASE_MIN_S) * 1000))


def _ask_database(svc: Services) -> None:
    with svc.database.read() as conn:
        conn.execute(select(1))


async def flusher(svc: Services) -> None:
    """This instance's own writes, every 0.1 s and never behind a job (a round of alarm rules over thousands of
    machines takes seconds): the replay guard's nonces and the machines polling here; and on PostgreSQL, every
    ``command_recheck_s``, a look for commands whose notification was missed."""
    last_recheck = last_probe = time.monotonic()
    while True:
        await asyncio.sleep(NONCE_FLUSH_S)
        # after the nonces: the long-polls waiting for a flush are answered by this one
        for what, flush, then in (("nonces", svc.machines.flush_nonces, svc.durable.flushed),
                                  ("polling machines", svc.presence.flush, None)):
            try:
                await run_in_threadpool(flush)
            except Exception:
                log.exception("could not write this instance's %s (written with the next flush)", what)
                continue
            if then is not None:
                then()
        if time.monotonic() - last_probe >= DATABASE_PROBE_S:
            last_probe = time.monotonic()
            try:
                await run_in_threadpool(_ask_database, svc)
                svc.database_ok_at = time.monotonic()
            except Exception:
                log.warning("no answer from the database (/healthz answers 503 after %.0f s of this)",
                            HEALTH_DATABASE_S, exc_info=True)
        if svc.listener is not None and time.monotonic() - last_recheck >= svc.settings.command_recheck_s:
            last_recheck = time.monotonic()
            try:
                for machine_id in await run_in_threadpool(svc.commands.due_machines, svc.now()):
                    svc.hub.notify(machine_id)
            except Exception:
                log.exception("could not look for commands due")


async def background(svc: Services) -> None:
    """The fleet's jobs, each at one instance at a time (:func:`_leased`): unclaimed starts voided and lost
    sessions reconciled (every ``background_interval_s``); the operators' alarm rules checked (every
    ``alarm_check_interval_s``); old nonces, rate-limit counts, samples, commands and ID photos past retention removed
    (every minute). This instance's own writes are :func:`flusher`'s; the payment providers are called from
    :func:`payments_background`, alarm notifications sent from :func:`notify_background`."""
    mono = time.monotonic()
    last_void = last_prune = last_alarms = mono
    while True:
        await asyncio.sleep(NONCE_FLUSH_S)
        try:
            mono = time.monotonic()
            every = svc.settings.background_interval_s
            if mono - last_void >= every:
                last_void = mono
                if await run_in_threadpool(_leased, svc, "expire_sessions", every):
                    await run_in_threadpool(_expire, svc)
            if mono - last_alarms >= svc.settings.alarm_check_interval_s:
                last_alarms = mono
                if await run_in_threadpool(_leased, svc, "alarm_rules", svc.settings.alarm_check_interval_s):
                    await run_in_threadpool(svc.alarms.check, svc.now())
            if mono - last_prune >= 60:
                last_prune = mono
                svc.machines.prune_local_nonces(svc.now())
                if await run_in_threadpool(_leased, svc, "prune", 60):
                    await run_in_threadpool(_prune, svc)
        except Exception:
            log.exception("background task failed")


def _expire(svc: Services) -> None:
    for sid in svc.sessions.void_unacknowledged(svc.now()):
        log.warning("session %s voided: the machine did not claim it by its deadline", sid)
    for sid in svc.sessions.reconcile_stale(svc.now()):
        log.warning("session %s lost: no report long after it must have ended", sid)


async def payments_background(svc: Services) -> None:
    """The calls to the payment providers, on their own (at one instance, by lease): unpaid top-ups asked about
    and closed, refunds followed, yesterday's bills reconciled. A provider that is slow or down (15 s a call)
    delays only this, never the replay guard's nonces or the release of held balances."""
    last_reconcile = 0.0
    every = svc.settings.background_interval_s
    while True:
        await asyncio.sleep(every)
        try:
            if not await run_in_threadpool(_leased, svc, "payments", max(every, 20)):   # a round may take a while
                continue
            for oid in await run_in_threadpool(svc.wallet.close_expired, svc.now()):
                log.info("top-up order %s closed unpaid", oid)
            await run_in_threadpool(svc.wallet.settle_refunds, svc.now())
            if time.monotonic() - last_reconcile >= 60:
                last_reconcile = time.monotonic()
                await run_in_threadpool(svc.wallet.reconcile_due, svc.now())
        except Exception:
            log.exception("payments background task failed")


async def notify_background(svc: Services) -> None:
    """Alarm notifications (email, webhook), on their own (at one instance, by lease): a mail server that is
    slow or down (15 s a try) delays nothing else."""
    every = svc.settings.alarm_check_interval_s
    while True:
        await asyncio.sleep(every)
        try:
            if await run_in_threadpool(_leased, svc, "alarm_notify", max(every, 20)):
                await run_in_threadpool(svc.alarms.notifier.send_due)
        except Exception:
            log.exception("alarm notifications failed")


def _prune(svc: Services) -> None:
    svc.machines.prune_nonces(svc.now())
    SharedRateLimiter.prune(svc.database, svc.now())
    svc.fleet.prune_samples(svc.now())
    pruned = svc.commands.prune(svc.now(), svc.settings.command_retention_days * 86_400_000)
    if pruned:
        log.info("%d commands older than %d days deleted", pruned, svc.settings.command_retention_days)
    steps = svc.releases.prune_history(svc.now(), svc.settings.update_history_days * 86_400_000)
    if steps:
        log.info("%d update steps of rollouts ended %d days ago deleted", steps, svc.settings.update_history_days)
    deleted = svc.accounts.purge_photos(svc.now())
    if deleted:
        log.info("%d ID photos deleted (retention %d days)", deleted, svc.settings.photo_retention_days)
