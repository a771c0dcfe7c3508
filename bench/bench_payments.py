"""Payment notifications under load: WeChat Pay's signed, encrypted notifications into the real cloud.

    .venv/bin/python bench/bench_payments.py [--orders 300] [--workers 16] [--copies 3] [--database-url URL]

A cloud on loopback (SQLite by default, or PostgreSQL by URL) with the WeChat Pay adapter, against the WeChat Pay
stand-in (tests/standins/wechatpay.py). ``--orders`` top-ups are created through the API and paid at the
stand-in without notifying; then every order's notification is posted ``--copies`` times at once (as WeChat's
retries and duplicates arrive), from ``--workers`` threads. Each post is verified (SHA256withRSA, timestamp,
AES-256-GCM) and committed before the 204. Prints notifications handled per second, the latency of a delivery
(its copies at once) p50/p99, and checks that every order was credited exactly once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select

from cloud import db as t
from cloud.wallet import wechatpay
from tests.cloudkit import CloudServer
from tests.standins.wechatpay import WechatPayStandIn


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=300)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--database-url", default="",
                    help="a PostgreSQL server's URL: a fresh database is made on it for the run, then dropped")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tapshare-bench-pay-"))
    drop = None
    if args.database_url:
        import os

        import tests.cloudkit
        import tests.conftest
        os.environ["TAPSHARE_TEST_POSTGRES_URL"] = args.database_url
        tests.conftest.PG_URL = tests.cloudkit.PG_URL = args.database_url
        args.database_url, drop = tests.conftest._fresh_postgres_database()
    try:
        return run(args, tmp)
    finally:
        if drop:
            drop()


def run(args, tmp: Path) -> int:
    with WechatPayStandIn(auto_notify=False) as wx:
        pay = wechatpay.from_env(wx.env(tmp / "keys"))
        with CloudServer(tmp / "cloud", database_url=args.database_url, payment_providers=[pay]) as cloud:
            users = [cloud.user(f"139{i:08d}", balance_fen=0) for i in range(max(1, args.orders // 4))]
            orders = []
            for i in range(args.orders):
                u = users[i % len(users)]
                r = u.call("POST", "/api/v1/me/topups", json={"amount_fen": 100 + i, "provider": "wechatpay",
                                                              "channel": "native"})
                r.raise_for_status()
                orders.append(r.json())
                wx.scan(r.json()["qr_text"], notify=False)
            latencies: list[float] = []
            statuses: list[int] = []

            def deliver(o) -> None:
                t0 = time.perf_counter()
                answers = wx.notify(o["order_id"], concurrent=args.copies)
                latencies.append(time.perf_counter() - t0)
                statuses.extend(s for s, _ in answers)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.workers) as ex:
                list(ex.map(deliver, orders))
            wall = time.perf_counter() - t0
            with cloud.app.state.database.read() as conn:
                credited = conn.execute(select(func.count()).select_from(t.balance_entries)
                                        .where(t.balance_entries.c.kind == "topup")).scalar()
                total = conn.execute(select(func.coalesce(func.sum(t.balance_entries.c.amount_fen), 0))).scalar()
    expected = sum(o["amount_fen"] for o in orders)
    db = "PostgreSQL" if args.database_url.startswith("postgresql") else "SQLite"
    n = len(statuses)
    print(f"payment notifications ({db}, {args.orders} orders x {args.copies} copies at once, "
          f"{args.workers} workers)")
    print(f"  handled: {n} in {wall:.1f} s = {n / wall:.0f} notifications/s; answers: "
          + ", ".join(f"{s}: {statuses.count(s)}" for s in sorted(set(statuses))))
    print(f"  delivery latency (its {args.copies} copies at once): p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {pct(latencies, 0.99) * 1000:.0f} ms")
    ok = credited == args.orders and total == expected
    print(f"  credited: {credited} top-ups, {total} fen (expected {args.orders}, {expected} fen): "
          + ("exactly once" if ok else "WRONG"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
