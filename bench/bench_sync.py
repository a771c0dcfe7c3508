"""The dispenser's link, measured end to end against a real cloud process on loopback.

    .venv/bin/python bench/bench_sync.py [--backlog 10000] [--sessions 200]

1. Outbox drain: a backlog of ``--backlog`` reports (as after an outage) is sent to the cloud; prints
   events/s until the outbox is empty.
2. Phone start -> valve pin high: ``--sessions`` sessions through cloud + sync + core + simulated hal;
   prints p50/p99 from the phone's POST to the valve's pin changing level.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

import contract as p
from bench.common import free_port, pct, start_cloud, stop_process, wait_until
from cloud.__main__ import create_operator
from hal.base import SystemClock
from hal.machine import simulated_config, simulated_dispenser
from kiosk.config import Config
from kiosk.events import State
from sync.client import CloudClient
from sync.link import SyncLink


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_cloud(data / "cloud", port)
        try:
            admin = create_operator(f"sqlite:///{data / 'cloud' / 'cloud.db'}", "bench", "admin")
            auth = {"Authorization": f"Bearer {admin}"}
            tok = requests.post(url + "/api/v1/operator/machines", headers=auth, timeout=10,
                                json={"machine_id": "BS1", "price_fen_per_l": 200}).json()["enrolment_token"]
            secret = bytes.fromhex(requests.post(url + "/device/v1/enroll", timeout=10, json={
                "machine_id": "BS1", "enrolment_token": tok}).json()["secret_hex"])
            user = requests.post(url + "/api/v1/dev/users", headers=auth, timeout=10,
                                 json={"phone": "13500000000", "balance_fen": 10_000_000}).json()
            uauth = {"Authorization": f"Bearer {user['token']}"}

            cfg = simulated_config(Config().replace(
                paths={"data_dir": str(data / "dispenser")}, machine={"id": "BS1"},
                flow={"overrun_window_ms": 50}, screen={"receipt_display_ms": 1_000}))
            clock = SystemClock()
            hw, rt, _ = simulated_dispenser(cfg, clock, data / "sim")
            for i in range(args.backlog):      # what piles up during an outage
                rt.ledger.record(p.EventKind.CONSUMABLE_REPLACED, kind=f"filter-{i}", actor="bench")
            client = CloudClient(url, "BS1", secret, wall_ms=clock.wall_ms, mono_ms=clock.monotonic_ms)
            link = SyncLink(rt, client, rt.ledger, software_version="bench", poll_wait_ms=55_000,
                            heartbeat_interval_ms=60_000)
            opened_at: list[float] = []
            hw.valve.on_change(lambda is_open: opened_at.append(time.perf_counter()) if is_open else None)
            threading.Thread(target=rt.run, daemon=True).start()
            hw.start()
            t0 = time.perf_counter()
            link.start()
            wait_until(lambda: rt.ledger.outbox_depth() == 0, 600, 0.05)
            drain_s = time.perf_counter() - t0
            print(f"outbox drain: {args.backlog:,} reports in {drain_s:.1f} s = {args.backlog / drain_s:,.0f} "
                  f"events/s (sent {link.sent}, dead-lettered {link.dead})")

            lat = []
            for _ in range(args.sessions):
                wait_until(lambda: rt.snapshot.state is State.IDLE and rt.snapshot.online, 30)
                code = p.qr_code(secret, "BS1", client.server_now_ms() // 1000)
                presence = requests.get(url + "/api/v1/scan", params={"machine": "BS1", "c": code}, headers=uauth,
                                        timeout=10).json()["presence_token"]
                opened_at.clear()
                t_start = time.perf_counter()
                r = requests.post(url + "/api/v1/sessions", headers=uauth, timeout=10,
                                  json={"presence_token": presence, "expected_price_fen_per_l": 200})
                if r.status_code != 200:
                    print("start refused:", r.text)
                    continue
                if wait_until(lambda: bool(opened_at), 10):
                    lat.append((opened_at[0] - t_start) * 1000)
                time.sleep(0.3)                 # about 30 ml: above the minimum, so it is charged
                hw.world.press_stop()
                wait_until(lambda: rt.snapshot.state is State.RECEIPT, 10)
            print(f"phone start -> valve pin high: p50 {pct(lat, .5):.1f} ms, p99 {pct(lat, .99):.1f} ms, "
                  f"max {max(lat):.1f} ms (n={len(lat)} of {args.sessions})")
            wait_until(lambda: rt.ledger.outbox_depth() == 0, 60, 0.05)
            me = requests.get(url + "/api/v1/me", headers=uauth, timeout=10).json()
            device = sum(s["cost_fen"] for s in rt.ledger.sessions("ended"))
            print(f"books: device billed {device} fen over {len(rt.ledger.sessions('ended'))} sessions; cloud "
                  f"charged {10_000_000 - me['available_fen']} fen")
            link.stop()
            rt.request_stop()
            rt.wait_stopped(5)
            hw.close()
        finally:
            stop_process(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
