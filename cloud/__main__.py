"""python -m cloud: run the Tapshare cloud, or administer it.

    python -m cloud serve [--host 127.0.0.1] [--port 8700] [--database-url URL] [--data-dir DIR]
    python -m cloud create-operator NAME --role admin|operator|viewer      (prints the bearer token once)
    python -m cloud set-password NAME < password-file                      (to sign in to /console)
    python -m cloud new-key                                                (a server key for TAPSHARE_CLOUD_KEY)
    python -m cloud dev-user --phone 13800000000 --balance-fen 1000        (development only: a user and token)
    python -m cloud demo-data                                              (development only: a demo fleet, once)

The database is an embedded SQLite file in the data folder unless ``--database-url`` (or
``TAPSHARE_DATABASE_URL``) names another, e.g. ``postgresql+psycopg://user:pass@localhost/tapshare``.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from pathlib import Path

from cloud.app import CloudSettings, build_routes, create_app
from cloud.db import Database
from cloud.operators.service import ROLES
from cloud.operators.service import create_operator as _create_operator
from cloud.settings import SettingsError


def create_operator(database_url: str, name: str, role: str, valid_days: int | None = None) -> str:
    """A new operator and its bearer token (shown once), valid ``valid_days`` (TAPSHARE_OPERATOR_TOKEN_DAYS, 90)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    days = valid_days if valid_days is not None else CloudSettings().operator_token_days
    database = Database(database_url)
    database.create_all()
    try:
        return _create_operator(database, name, role, days, time.time_ns() // 1_000_000)
    finally:
        database.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cloud", description="Tapshare reference cloud service")
    sub = ap.add_subparsers(dest="cmd")
    for name in ("serve", "create-operator", "set-password", "dev-user", "reconcile", "demo-data"):
        sp = sub.add_parser(name)
        sp.add_argument("--database-url", default="")
        sp.add_argument("--data-dir", default="data/cloud")
    serve = sub.choices["serve"]
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8700)
    serve.add_argument("--log-level", default="info")
    op = sub.choices["create-operator"]
    op.add_argument("name")
    op.add_argument("--role", default="operator", choices=list(ROLES))
    sub.add_parser("new-key")
    pw = sub.choices["set-password"]
    pw.description = ("Set an operator's console password, read from standard input (asked for on a terminal); "
                      "it ends the operator's console sessions. Admins then manage operators in the console.")
    pw.add_argument("name")
    rec = sub.choices["reconcile"]
    rec.description = ("Compare the payment providers' trade bills for a day (UTC+8) with our orders and refunds; "
                       "exit 0 if they match, 1 on a mismatch (also an operator alarm), 3 if a bill is not out yet.")
    rec.add_argument("--date", default="", help="YYYY-MM-DD (default: yesterday in China)")
    rec.add_argument("--provider", default="", help="one provider (default: every configured one)")
    rec.add_argument("--json", action="store_true", help="print the full reports as JSON")
    dev = sub.choices["dev-user"]
    dev.add_argument("--phone", required=True)
    dev.add_argument("--balance-fen", type=int, default=1_000)
    dev.add_argument("--unregistered", action="store_true")
    sub.choices["demo-data"].description = (
        "Development only: seed a demo fleet (31 machines at 5 sites, 50 people, a week of sessions, alarms, gifts) "
        "so every chart of the operators' console shows something, and print how to sign in to it. Once per "
        "database: a second run changes nothing.")
    args = ap.parse_args(argv)
    if args.cmd == "new-key":
        print(secrets.token_bytes(32).hex())
        return 0
    cmd = args.cmd or "serve"
    try:
        settings = CloudSettings(database_url=getattr(args, "database_url", ""),
                                 data_dir=Path(getattr(args, "data_dir", "data/cloud")))
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cmd == "dev-user":
        from cloud.dev.schemas import DevUserIn
        from cloud.dev.service import create_dev_user
        if settings.production:
            print("error: development users cannot be created in production mode", file=sys.stderr)
            return 1
        try:
            body = DevUserIn(phone=args.phone, balance_fen=args.balance_fen, registered=not args.unregistered)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        database = Database(settings.url())
        database.create_all()
        user_id, token = create_dev_user(database, body.phone, body.balance_fen, body.registered,
                                         time.time_ns() // 1_000_000)
        print(f"user {user_id} token {token}")
        return 0
    if cmd == "reconcile":
        return _reconcile(settings, args)
    if cmd == "demo-data":
        return _demo_data(settings)
    if cmd == "set-password":
        return _set_password(settings, args.name)
    if cmd == "create-operator":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        print(create_operator(settings.url(), args.name, args.role))
        return 0

    from cloud.db import SchemaMismatch
    from cloud.security import KeyError_
    from cloud.server import GracefulServer, server_config
    # the service's own log lines (tapshare.*: releases, alarms resolved, payments, draining ...) at the server's
    # level, beside uvicorn's, to standard error (the journal): without a handler only warnings were shown
    log_level = getattr(args, "log_level", "info")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)-9s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)     # a line for each of its plugins
    try:
        app = create_app(settings)
    except (SettingsError, SchemaMismatch, KeyError_) as e:      # production refusals, a database to move aside
        print(f"error: {e}", file=sys.stderr)
        return 2
    build_routes(app)                                # not at the first requests, on the event loop
    from cloud.gc_policy import GcPolicy
    GcPolicy(settings.gc_full_every_s).apply()       # after the app is built: what it holds is frozen
    # stopping: TAPSHARE_DRAIN_S of 503 health, then up to 10 s for the requests in flight (a stopping instance's
    # held polls answer at once; 3 s cancelled requests that waited for a database connection under a fleet's
    # load); the unit's TimeoutStopSec (20) covers both
    GracefulServer(server_config(app, host=getattr(args, "host", "127.0.0.1"),
                                 port=getattr(args, "port", 8700), log_level=log_level,
                                 header_timeout_s=settings.header_timeout_s, timeout_graceful_shutdown=10,
                                 backlog=4096)).run()
    return 0


def _set_password(settings: CloudSettings, name: str) -> int:
    import getpass

    from cloud.console.service import ConsoleAuth
    from cloud.errors import DomainError
    from cloud.security import SecretBox
    password = getpass.getpass("new console password: ") if sys.stdin.isatty() else sys.stdin.readline()
    database = Database(settings.url())
    database.create_all()
    try:
        box = SecretBox.from_env_or_file(settings.data_dir / "server.key", production=settings.production)
        ConsoleAuth(database, box).set_password(name, password.rstrip("\n"), time.time_ns() // 1_000_000)
    except DomainError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    finally:
        database.dispose()
    print(f"console password set for {name}: sign in at /console")
    return 0


def _demo_data(settings: CloudSettings) -> int:
    from cloud.app import build_services
    from cloud.dev.demo import DemoRefused, demo_admin, seed_demo
    if settings.production:
        print("error: the demo fleet is for development: it is refused in production mode (TAPSHARE_PRODUCTION=1), "
              "where it would mix made-up sessions and money with real ones", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    svc = build_services(settings)
    try:
        counts = seed_demo(svc, settings.data_dir, time.time_ns() // 1_000_000)
        name, password = demo_admin(svc, settings.data_dir, time.time_ns() // 1_000_000)
    except DemoRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        svc.database.dispose()
    print(f"demo fleet seeded in {time.monotonic() - t0:.1f} s: {counts['sessions']} sessions on "
          f"{counts['commands']} start commands, {counts['machine_samples']} samples, "
          f"{counts['balance_entries']} balance entries")
    print(f"operators' console: {settings.public_url}/console  name: {name}  password: {password}  "
          "(development only; the password is kept in the data folder)")
    return 0


def _reconcile(settings: CloudSettings, args) -> int:
    import datetime as dt
    import json

    from cloud.app import build_services
    from cloud.errors import DomainError
    from cloud.wallet.payments import CHINA
    now_ms = time.time_ns() // 1_000_000
    try:
        day = dt.date.fromisoformat(args.date) if args.date else \
            (dt.datetime.now(CHINA) - dt.timedelta(days=1)).date()
    except ValueError:
        print(f"error: --date must be YYYY-MM-DD, got {args.date!r}", file=sys.stderr)
        return 2
    try:
        svc = build_services(settings)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [args.provider] if args.provider else list(svc.wallet.providers)
    worst, reports = 0, []
    for name in names:
        try:
            r = svc.wallet.reconcile(name, day, now_ms)
        except DomainError as e:
            print(f"{name} {day}: {e.message}", file=sys.stderr)
            worst = max(worst, 3 if e.code == "bill_not_ready" else 2)
            continue
        reports.append(r)
        counts = {k: len(r[k]) for k in ("missing_here", "missing_there", "duplicated", "wrong_amount")}
        print(f"{name} {day}: {r['state'].upper()}  bill {r['bill_payments']} payments "
              f"¥{r['bill_payments_fen'] / 100:.2f}, {r['bill_refunds']} refunds ¥{r['bill_refunds_fen'] / 100:.2f}; "
              f"ours {r['our_payments']} payments, "
              f"{r['our_refunds']} refunds" + ("" if r["state"] == "matched" else f"; {counts}"))
        if r["state"] != "matched":
            worst = max(worst, 1)
    if args.json:
        print(json.dumps(reports, ensure_ascii=False, indent=2))
    svc.database.dispose()
    return worst


if __name__ == "__main__":
    sys.exit(main())
