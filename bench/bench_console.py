"""The operators' console at fleet scale: 1,000 machines and 1,000,000 sessions in PostgreSQL, measured over HTTP.

    .venv/bin/python bench/bench_console.py [--machines 1000] [--sessions 1000000] [--days 365] [--requests 300]
                                            [--database-url URL]   (default: $TAPSHARE_TEST_POSTGRES_URL)

A fresh database is made on the PostgreSQL server (then dropped) and seeded in SQL (``INSERT ... SELECT`` from
``generate_series``, a minute or two): machines across sites, users with top-ups, sessions spread evenly over the
last ``--days`` days (98 % settled, with their bills, rental records and hold/release/charge balance entries; 1 in
200 refunded). Then the real cloud is started on it (``tests/cloudkit.CloudServer``), a viewer signs in through
``/api/v1/console/login``, and each console endpoint is asked ``--requests`` times one after the other (latency:
p50, p95, p99) and again from 4 threads at once (throughput): the fleet list (``/operator/machines``, and
``/operator/fleet`` where it exists), the sessions search (``/operator/sessions``, or ``/operator/records``),
one record (``/operator/sessions/{id}``, or ``/operator/records`` of one machine at one moment), and the report
of the last whole month per day, per machine and per site. The report's queries are EXPLAINed. Each endpoint
passes when its p95 is under 300 ms.

The report reads the indexes the schema has for it (migration 0004): ``balance_refunds_by_session`` (a session's
refunds, partial on ``kind = 'refund'``) and ``sessions_settled_by_time`` (settled sessions by time, covering
machine, fee and volume, so a month is summed from the index alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
import requests
from sqlalchemy.dialects import postgresql

from bench.common import pct
from cloud.db import Database
from cloud.reports.service import DAY_KEY, day_start_ms, refunds_query, sessions_query
from cloud.security import SecretBox
from cloud.wallet.payments import CHINA

LIMIT_MS = 300
PASSWORD = "Bench-console-2026!"
SITES = ["杭州市西湖区文三路数字娱乐产业园", "杭州市滨江区网商路阿里巴巴滨江园区", "上海市浦东新区张江高科技园区碧波路",
         "上海市徐汇区漕河泾开发区桂平路", "杭州市余杭区未来科技城海创园", "上海市静安区南京西路商圈"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--machines", type=int, default=1_000)
    ap.add_argument("--sessions", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--days", type=int, default=365, help="the sessions are spread over this many days up to now")
    ap.add_argument("--requests", type=int, default=300, help="requests per endpoint and pass")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards (its URL is printed)")
    ap.add_argument("--database-url", default=os.environ.get("TAPSHARE_TEST_POSTGRES_URL", ""),
                    help="a PostgreSQL server's URL: a fresh database is made on it for the run, then dropped")
    args = ap.parse_args()
    if not args.database_url.startswith("postgresql"):
        print("error: give a PostgreSQL server (--database-url or TAPSHARE_TEST_POSTGRES_URL)", file=sys.stderr)
        return 2
    import tests.cloudkit
    import tests.conftest
    tests.conftest.PG_URL = tests.cloudkit.PG_URL = args.database_url
    url, drop = tests.conftest._fresh_postgres_database()
    try:
        return run(args, url, Path(tempfile.mkdtemp(prefix="tapshare-bench-console-")))
    finally:
        if args.keep:
            print(f"kept: {url}")
        else:
            drop()


def run(args, url: str, tmp: Path) -> int:
    from tests.cloudkit import CloudServer
    database = Database(url)
    database.create_all()
    database.dispose()
    raw = url.replace("postgresql+psycopg://", "postgresql://")
    now_ms = time.time_ns() // 1_000_000
    t0 = time.perf_counter()
    with psycopg.connect(raw, autocommit=True) as conn:
        seed(conn, args, SecretBox.from_env_or_file(tmp / "cloud" / "server.key", production=False), now_ms)
        counts = {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
                  for name in ("machines", "users", "sessions", "bills", "rental_records", "balance_entries")}
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
    print(f"seeded in {time.perf_counter() - t0:.0f} s ({size}): "
          + ", ".join(f"{n:,} {name}" for name, n in counts.items()))
    today = datetime.fromtimestamp(now_ms / 1000, CHINA).date()
    last = today.replace(day=1) - timedelta(days=1)
    month = (last.replace(day=1), last)
    logging.getLogger("tapshare").setLevel(logging.ERROR)
    # the seeded machines send no heartbeats: without this every one of them would open an offline alarm during the
    # run (an alarm storm is not what the console's pages are measured under)
    with CloudServer(tmp / "cloud", database_url=url, alarm_offline_after_s=30 * 86_400) as cloud:
        r = cloud.op("POST", "/api/v1/console/operators", json={"operator_id": "bench-viewer", "role": "viewer",
                                                               "password": PASSWORD, "display_name": ""})
        assert r.status_code == 200, r.text
        results = measure(cloud.url, args, month, now_ms, raw)
    ok = all(p95 < LIMIT_MS for _name, p95 in results)
    print(f"\n{'PASS' if ok else 'FAIL'}: every endpoint's p95 under {LIMIT_MS} ms" if ok else
          f"\nFAIL: over {LIMIT_MS} ms at p95: " + ", ".join(n for n, p in results if p >= LIMIT_MS))
    return 0 if ok else 1


def seed(conn, args, box: SecretBox, now_ms: int) -> None:
    """Machines in Python (their sealed keys), the rest in SQL, then VACUUM ANALYZE as after a night's autovacuum."""
    n_m, n_s, n_u = args.machines, args.sessions, args.users
    hb = {"state": "idle", "session_id": None, "valve_open": False, "temp_c": 11.5, "tds_ppm": 60, "outbox_depth": 0,
          "totalizer_pulses": 1_000_000, "lockouts": [], "software_version": "0.2.0", "boot_id": 3,
          "dead_letters": 0, "uptime_s": 86_400}
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO machines (machine_id, secret_enc, location, price_fen_per_l, max_volume_ml, max_duration_ms,"
            " max_idle_ms, max_credit_fen, min_dispense_ml, created_ms, last_seen_ms, heartbeat, timezone, hotline,"
            " site) VALUES (%s, %s, %s, %s, 20000, 300000, 30000, 1000, 10, %s, %s, %s, 'Asia/Shanghai',"
            " '400-800-8888', %s)",
            [(mid, box.seal(secrets.token_bytes(32), f"machine:{mid}"),
              f"{SITES[m % len(SITES)]}{m % 97 + 1}号楼{m % 9 + 1}层饮水点", 150 + m % 16 * 10,
              now_ms - 400 * 86_400_000, now_ms - (m % 5) * 20_000, json.dumps(hb), SITES[m % len(SITES)])
             for m in range(1, n_m + 1) for mid in [f"M{m:04d}"]])
    step = args.days * 86_400_000 // n_s
    t_start = now_ms - args.days * 86_400_000
    template = json.dumps(record_template())
    bulk = ("sessions", "bills", "rental_records", "balance_entries")
    indexes = conn.execute("""
        SELECT indexname, indexdef FROM pg_indexes i WHERE tablename = ANY(%s)
        AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)""", [list(bulk)]).fetchall()
    for name, _ in indexes:           # built once after the load: several times faster than row by row
        conn.execute(f'DROP INDEX "{name}"')
    conn.execute("""
        INSERT INTO users (user_id, phone, name, registered, points, created_ms)
        SELECT 'u' || i, '139' || lpad(i::text, 8, '0'), '', true, 0, %(t)s FROM generate_series(1, %(n)s) i""",
                 {"t": t_start - 86_400_000, "n": n_u})
    conn.execute("""
        INSERT INTO balance_entries (user_id, kind, amount_fen, session_id, note, created_ms)
        SELECT 'u' || i, 'topup', 1000000, NULL, 'bench', %(t)s FROM generate_series(1, %(n)s) i""",
                 {"t": t_start - 86_400_000, "n": n_u})
    conn.execute("""
        INSERT INTO sessions (session_id, machine_id, user_id, state, price_fen_per_l, credit_limit_fen, command_id,
                              presence_hash, created_ms, deadline_ms, min_dispense_ml, max_volume_ml, acked_ms,
                              ended_ms, end_reason, void_reason, fee_fen, volume_ml)
        SELECT 's-' || i, 'M' || lpad(m::text, 4, '0'), 'u' || u, st, price, 1000, 'c-' || i, md5(i::text),
               c, c + 10000, 10, 20000, c + 800, c + 30000,
               CASE WHEN st = 'ended' THEN 'stop_button' END, CASE WHEN st <> 'ended' THEN 'bench' END,
               CASE WHEN st = 'ended' THEN vol * price / 1000 END, CASE WHEN st = 'ended' THEN vol END
        FROM (SELECT i, (i * 7919) %% %(m)s + 1 AS m, (i * 104729) %% %(u)s + 1 AS u,
                     %(t)s + (i - 1) * %(step)s + (i * 7) %% 1000 AS c,
                     CASE WHEN i %% 100 = 0 THEN 'voided' WHEN i %% 100 = 50 THEN 'lost' ELSE 'ended' END AS st,
                     150 + ((i * 7919) %% %(m)s + 1) %% 16 * 10 AS price, 150 + (i * 37) %% 1850 AS vol
              FROM generate_series(1::bigint, %(n)s) i) g""",
                 {"m": n_m, "u": n_u, "t": t_start, "step": step, "n": n_s})
    iso = "to_char(to_timestamp({} / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
    conn.execute(f"""
        INSERT INTO bills (session_id, user_id, machine_id, started_at, ended_at, duration_ms, volume_ml,
                           avg_flow_ml_per_min, amount_fen, price_fen_per_l, water_quality, points, end_reason,
                           created_ms)
        SELECT session_id, user_id, machine_id, {iso.format('created_ms + 900')}, {iso.format('ended_ms')}, 28000,
               volume_ml, volume_ml * 60000 / 28000, fee_fen, price_fen_per_l,
               '{{"tds_ppm": 62, "tds_measured": true, "tds_limit_ppm": 500, "temp_start_c": 11.4,
                 "temp_end_c": 11.9}}'::json, fee_fen / 100, 'stop_button', ended_ms
        FROM sessions WHERE state = 'ended'""")
    conn.execute(f"""
        INSERT INTO rental_records (session_id, machine_id, user_id, started_at, ended_at, started_ms, record)
        SELECT session_id, machine_id, user_id, {iso.format('created_ms + 900')}, {iso.format('ended_ms')},
               created_ms, (%(tpl)s::jsonb || jsonb_build_object('session_id', session_id, 'machine_id', machine_id,
               'user_ref', user_id, 'billed_pulses', volume_ml * 450 / 1000, 'volume_ml', volume_ml,
               'cost_fen', fee_fen, 'price_fen_per_l', price_fen_per_l))::json
        FROM sessions WHERE state = 'ended'""", {"tpl": template})
    conn.execute("""
        INSERT INTO balance_entries (user_id, kind, amount_fen, session_id, note, created_ms)
        SELECT user_id, k.kind, CASE k.kind WHEN 'hold' THEN -credit_limit_fen WHEN 'release' THEN credit_limit_fen
                                            ELSE -fee_fen END,
               session_id, '', CASE k.kind WHEN 'hold' THEN created_ms ELSE ended_ms END
        FROM sessions CROSS JOIN (VALUES ('hold'), ('release'), ('charge')) AS k(kind)
        WHERE k.kind <> 'charge' OR (state = 'ended' AND fee_fen > 0)""")
    conn.execute("""
        INSERT INTO balance_entries (user_id, kind, amount_fen, session_id, note, created_ms)
        SELECT user_id, 'refund', fee_fen, session_id, 'bench: the machine poured too little', ended_ms + 3600000
        FROM sessions WHERE state = 'ended' AND fee_fen > 0 AND abs(hashtext(session_id)) % 200 = 0""")
    for _, ddl in indexes:
        conn.execute(ddl)
    conn.execute("VACUUM ANALYZE")


def record_template() -> dict:
    """A rental record as a machine reports it (the fields of ``contract.SessionEndedPayload``)."""
    return {"event_id": "1-1", "kind": "session_ended", "boot_id": 3, "created_at": "2026-11-25T10:00:31.000Z",
            "reason": "stop_button", "started_at": "2026-11-25T10:00:01.000Z", "closed_at": "2026-11-25T10:00:29.000Z",
            "ended_at": "2026-11-25T10:00:30.000Z", "duration_ms": 28_000, "credit_limit_fen": 1_000,
            "min_dispense_ml": 10, "milli_pulses_per_litre": 450_000, "overrun_pulses": 2, "temp_start_c": 11.4,
            "temp_end_c": 11.9, "water_quality": {"tds_ppm": 62, "tds_measured": True, "tds_limit_ppm": 500},
            "flow_series": [[ms, ms * 45 // 1000, 90, 11.5, True] for ms in range(0, 28_000, 1_000)],
            "valve_events": [[0, "open"], [28_000, "close", "stop_button"]]}


def measure(base: str, args, month: tuple[date, date], now_ms: int, raw: str) -> list[tuple[str, float]]:
    http = requests.Session()
    r = http.post(base + "/api/v1/console/login", json={"name": "bench-viewer", "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    rng = random.Random(7)
    machine = lambda: f"M{rng.randint(1, args.machines):04d}"      # noqa: E731
    lo, hi = day_start_ms(month[0]), day_start_ms(month[1] + timedelta(days=1))
    with psycopg.connect(raw) as conn:
        sample = conn.execute("SELECT session_id, machine_id, started_ms, user_id FROM rental_records "
                              "TABLESAMPLE SYSTEM (1) LIMIT 500").fetchall()
    exists = lambda path: http.get(base + path, timeout=60).status_code != 404    # noqa: E731
    has_fleet, has_sessions = exists("/api/v1/operator/fleet?limit=1"), exists("/api/v1/operator/sessions?limit=1")
    report = f"/api/v1/operator/reports?from={month[0]}&to={month[1]}"
    cases: list[tuple[str, object]] = [("fleet list: GET /operator/machines (all)",
                                        lambda: "/api/v1/operator/machines")]
    if has_fleet:
        cases.append(("fleet: GET /operator/fleet (page of 100, sorted)", lambda: "/api/v1/operator/fleet?limit=100"))
    if has_sessions:
        cases += [
            ("sessions search: machine + month", lambda: f"/api/v1/operator/sessions?machine_id={machine()}"
                                                          f"&from_ms={lo}&to_ms={hi}&limit=50"),
            ("sessions search: user", lambda: f"/api/v1/operator/sessions?user={rng.choice(sample)[3]}&limit=50"),
            ("sessions search: last day, ended", lambda: f"/api/v1/operator/sessions?from_ms={now_ms - 86_400_000}"
                                                          f"&state=ended&limit=50"),
            ("one record: GET /operator/sessions/{id}",
             lambda: f"/api/v1/operator/sessions/{rng.choice(sample)[0]}")]
    else:
        cases += [
            ("records search: machine + month", lambda: f"/api/v1/operator/records?machine_id={machine()}"
                                                         f"&from_ms={lo}&to_ms={hi}&limit=50"),
            ("records search: user", lambda: f"/api/v1/operator/records?user_id={rng.choice(sample)[3]}&limit=50"),
            ("one record: /operator/records at its start", lambda: (lambda s: f"/api/v1/operator/records?machine_id="
                                                                    f"{s[1]}&from_ms={s[2]}&to_ms={s[2] + 1}")(
                rng.choice(sample)))]
    report_cases = [(f"report {month[0]:%Y-%m} by {by}", lambda by=by: f"{report}&by={by}")
                    for by in ("day", "machine", "site")]
    head = f"{'endpoint':64} {'p50':>7} {'p95':>7} {'p99':>7} {'req/s':>7}"
    print(f"\nover HTTP, {args.requests} requests each: one at a time (latency ms), then 4 threads (throughput)")
    print(head)
    results = [time_endpoint(http, base, name, path, args.requests) for name, path in cases]
    explain(raw, lo, hi, "as migrated", full=True)
    print(head)
    timed = [time_endpoint(http, base, name, path, args.requests) for name, path in report_cases]
    results += timed
    body = http.get(base + f"{report}&by=day", timeout=60).json()
    print(f"\nthe month: {body['totals']['sessions']:,} settled sessions, "
          f"¥{body['totals']['revenue_fen'] / 100:,.2f} charged, {body['totals']['refunded_sessions']} refunded")
    return results


def time_endpoint(http: requests.Session, base: str, name: str, path, n: int) -> tuple[str, float]:
    http.get(base + path(), timeout=60).raise_for_status()          # warm: the first request of a kind
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.get(base + path(), timeout=60)
        latencies.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    cookies = http.cookies.get_dict()
    paths = [path() for _ in range(len(latencies))]

    def one(p: str) -> None:
        requests.get(base + p, cookies=cookies, timeout=60).raise_for_status()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as ex:
        list(ex.map(one, paths))
    rate = len(paths) / (time.perf_counter() - t0)
    p50, p95, p99 = (pct(latencies, q) for q in (0.5, 0.95, 0.99))
    print(f"{name:64} {p50:7.1f} {p95:7.1f} {p99:7.1f} {rate:7.1f}", flush=True)
    return name, p95


def explain(raw: str, lo: int, hi: int, title: str, full: bool) -> None:
    """EXPLAIN ANALYZE of the month's report queries (only their times unless ``full``)."""
    from cloud import db as t
    print(f"\nEXPLAIN ANALYZE of the month's report queries ({title}):")
    with psycopg.connect(raw) as conn:
        for q in (sessions_query(DAY_KEY, lo, hi), refunds_query(DAY_KEY, lo, hi),
                  sessions_query(t.sessions.c.machine_id, lo, hi), refunds_query(t.sessions.c.machine_id, lo, hi)):
            sql = " ".join(str(q.compile(dialect=postgresql.dialect(),
                                         compile_kwargs={"literal_binds": True})).split())
            plan = [row[0] for row in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql).fetchall()]
            if full:
                print("  " + sql + "\n" + "\n".join("    " + line for line in plan))
            else:
                print(f"  {plan[-1].strip()}: {sql[:100]}...")


if __name__ == "__main__":
    sys.exit(main())
