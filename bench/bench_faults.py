"""The fault suite as a report: each fault is made to happen to a real cloud on loopback and a simulated
dispenser linked to it through a fault-injecting proxy, and the table says what happened, what was lost
(must be nothing), what was billed twice (must be nothing), and what the screen and the cloud showed.
(SIGKILL at random points is bench_crash.py; its figures are in run_all's table.)

    .venv/bin/python bench/bench_faults.py [--outage-s 20]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kiosk.events import State  # noqa: E402
from sync import protocol as p  # noqa: E402
from tests.cloudkit import CloudServer, UserClient  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.test_sync import Dispenser, buy_water, settled  # noqa: E402
from tests.util import wait_until  # noqa: E402


def books(d, user, sids) -> tuple[int, int, str]:
    """(lost, billed twice, a one-line comparison) of the device's ledger and the cloud's bills."""
    bills = user.me()["bills"]
    ids = [b["session_id"] for b in bills]
    lost = sum(1 for s in sids if s not in ids)
    twice = sum(1 for s in set(ids) if ids.count(s) > 1)
    device = sum(d.rt.ledger.session(s)["cost_fen"] for s in sids)
    cloud = sum(b["amount_fen"] for b in bills if b["session_id"] in sids)
    same = "=" if device == cloud else "!="
    return lost, twice, f"device {device} fen {same} cloud {cloud} fen"


def alarm(cloud, reason: str) -> bool:
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["alarms"]
    return any(a["kind"] == "lockout" and (a["payload"].get("detail") or {}).get("reason") == reason for a in alarms)


def run(outage_s: float) -> list[dict]:
    rows = []
    tmp = Path(tempfile.mkdtemp())
    with CloudServer(tmp / "cloud") as cloud, FaultProxy(cloud.url) as proxy:
        dev = cloud.provision("F1", price=200)
        user = cloud.user("13700009999", balance_fen=100_000)
        with Dispenser(tmp, proxy.url, "F1", dev.secret) as d:
            assert wait_until(lambda: d.rt.snapshot.online, 15)

            # 1. the network goes away for minutes-like seconds mid-session
            presence = user.scan("F1", d.qr_code(cloud.url)).json()["presence_token"]
            sid = user.start(presence).json()["session_id"]
            wait_until(lambda: d.hw.valve.is_open)
            proxy.down = True
            time.sleep(1.0)
            d.hw.world.press_stop()
            wait_until(lambda: d.rt.snapshot.state is State.OFFLINE, 15)
            screen = d.rt.snapshot.state.value
            time.sleep(max(0.0, outage_s - 1.0))
            cloud_during = user.call("GET", f"/api/v1/sessions/{sid}").json()["state"]
            proxy.down = False
            wait_until(lambda: settled(user, sid) and d.rt.ledger.outbox_depth() == 0, 60)
            lost, twice, note = books(d, user, [sid])
            rows.append(dict(fault=f"network cut {outage_s:.0f} s mid-session",
                             happened="pour finished on the grant; report kept on disk, sent on reconnect"
                             + ("; the cloud had voided the start it never saw confirmed, the late report settled it"
                                if cloud_during == "voided" else ""), lost=lost, twice=twice,
                             screen=f"{screen} (no QR) until the link returned", cloud=f"{cloud_during}, then ended; "
                             + note))

            # 2. answers lost after the server committed (events and the start's acknowledgement)
            proxy.inject("/device/v1/events", "drop_response", times=2)
            proxy.inject("/device/v1/commands/", "drop_response", times=1)
            sid2 = buy_water(cloud, d, user)
            wait_until(lambda: settled(user, sid2) and d.rt.ledger.outbox_depth() == 0, 30)
            lost, twice, note = books(d, user, [sid2])
            rows.append(dict(fault="answers lost after commit (report x2, start ack)", happened="retried with the "
                             "same event id; the cloud replied from its record", lost=lost, twice=twice,
                             screen="normal session and receipt", cloud="one bill; " + note))

            # 3. a replayed session report, a replayed QR scan, a replayed start command
            rep = d.rt.ledger.session(sid2)["report_event_id"]
            row = d.rt.ledger.outbox("sent", limit=1000)
            body = next(r for r in row if r["event_id"] == rep)
            again = d.client.send_events([{"event_id": rep, "kind": body["kind"], "payload": body["payload"]}])
            code = d.qr_code(cloud.url)
            pres = user.scan("F1", code).json()["presence_token"]
            first = user.start(pres)
            replay = user.start(pres)
            sids = [sid2]
            if first.status_code == 200:
                sid3 = first.json()["session_id"]
                sids.append(sid3)
                wait_until(lambda: d.hw.valve.is_open)
                cmd = p.CommandMsg(command_id="c-replayed", kind="start", session_id=sid3,
                                   grant=p.GrantMsg(session_id=sid3, machine_id="F1", user_ref=user.user_id,
                                                    price_fen_per_l=200, credit_limit_fen=1000, max_volume_ml=5000,
                                                    max_duration_ms=60_000, max_idle_ms=15_000,
                                                    deadline_ms=d.client.server_now_ms() + 5_000, min_dispense_ml=10))
                d.link._dispatch(cmd)                       # the cloud's start arriving a second time
                d.hw.world.press_stop()
                wait_until(lambda: settled(user, sid3) and d.rt.ledger.outbox_depth() == 0, 30)
            lost, twice, note = books(d, user, sids)
            rows.append(dict(fault="replayed report, QR scan and start command",
                             happened=f"report: {again[0].status}; second start with one scan: "
                                      f"{replay.status_code} {replay.json().get('error')}; the start command again: "
                                      "acknowledged as already started", lost=lost, twice=twice,
                             screen="one session", cloud="one bill per session; " + note))

            # 4. a forged signature and another machine's key
            other = cloud.provision("F2")
            forged = dev.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False},
                                 secret=secrets.token_bytes(32))
            stolen = dev.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False},
                                 secret=other.secret)
            rows.append(dict(fault="forged signature; another machine's key",
                             happened=f"{forged.status_code} {forged.json()['error']}; "
                                      f"{stolen.status_code} {stolen.json()['error']}", lost=0, twice=0,
                             screen="unaffected", cloud="refused, nothing recorded"))

            # 5. the temperature sensor unplugged mid-session
            presence = user.scan("F1", d.qr_code(cloud.url)).json()["presence_token"]
            sid4 = user.start(presence).json()["session_id"]
            wait_until(lambda: d.hw.valve.is_open)
            d.hw.world.thermometer.unplug()
            noticed = wait_until(lambda: d.rt.snapshot.temp_c is None, 20)      # the next sensor poll
            during = d.rt.snapshot.temp_c
            valve_open = d.hw.valve.is_open
            d.hw.world.press_stop()
            wait_until(lambda: settled(user, sid4) and d.rt.ledger.outbox_depth() == 0, 30)
            bill = user.call("GET", f"/api/v1/sessions/{sid4}").json()["bill"]
            lost, twice, note = books(d, user, [sid4])
            rows.append(dict(fault="temperature sensor unplugged mid-session",
                             happened=f"noticed: {noticed} (temperature {during}); pour went on: {valve_open}; "
                                      f"bill: start {bill['water_quality'].get('temp_start_c')}, end "
                                      f"{bill['water_quality'].get('temp_end_c')}", lost=lost, twice=twice,
                             screen="temperature 'unknown' (未知)", cloud="bill with the temperatures known; " + note))
            d.hw.world.thermometer.set(12.0)

            # 6. the cloud restarts while a session report is on its way
            presence = user.scan("F1", d.qr_code(cloud.url)).json()["presence_token"]
            sid5 = user.start(presence).json()["session_id"]
            wait_until(lambda: user.call("GET", f"/api/v1/sessions/{sid5}").json()["state"] == "active")
            proxy.inject("/device/v1/events", "down", times=3)          # the report's first tries fail...
            time.sleep(1.0)
            d.hw.world.press_stop()
            wait_until(lambda: d.rt.ledger.session(sid5)["state"] == "ended", 15)
            cloud.__exit__(None, None, None)                              # ...and the cloud goes down and back up
            restarted = CloudServer(tmp / "cloud").__enter__()
            proxy.upstream = restarted.url
            user = UserClient(restarted.url, user.token, user.user_id)
            ok = wait_until(lambda: settled(user, sid5) and d.rt.ledger.outbox_depth() == 0, 60)
            lost, twice, note = books(d, user, [sid5])
            rows.append(dict(fault="cloud restarted mid-report", happened=f"report delivered after the restart: {ok}",
                             lost=lost, twice=twice, screen="receipt, then idle when the link returned",
                             cloud="one bill; " + note))
            cloud = restarted

            # 7. water flows with the valve shut (stuck valve), then a leak while idle
            wait_until(lambda: d.rt.snapshot.state is State.IDLE, 30)
            d.hw.world.water.ghost_ml_per_min = 3_000
            ok = wait_until(lambda: "ghost_flow" in d.rt.snapshot.lockouts, 30)
            d.hw.world.water.ghost_ml_per_min = 0
            alarmed = wait_until(lambda: alarm(cloud, "ghost_flow"), 20)
            rows.append(dict(fault="stuck valve (flow after close)",
                             happened="ghost-flow lockout" if ok else "NOT DETECTED", lost=0, twice=0,
                             screen=d.rt.snapshot.state.value, cloud=f"alarm received: {alarmed}; never billed"))
            d.hw.world.set_leak(True)
            leak = wait_until(lambda: "leak_sensor" in d.rt.snapshot.lockouts, 10)
            alarmed = wait_until(lambda: alarm(cloud, "leak_sensor"), 20)
            rows.append(dict(fault="leak during idle", happened="leak-sensor lockout (cleared on site only)"
                             if leak else "NOT DETECTED", lost=0, twice=0, screen=d.rt.snapshot.state.value,
                             cloud=f"alarm received: {alarmed}"))
            restarted.__exit__(None, None, None)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage-s", type=float, default=20)
    args = ap.parse_args()
    rows = run(args.outage_s)
    print("| fault | what happened | lost | billed twice | screen | cloud |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['fault']} | {r['happened']} | {r['lost']} | {r['twice']} | {r['screen']} | {r['cloud']} |")
    bad = sum(r["lost"] + r["twice"] for r in rows)
    print(f"\n{len(rows)} faults, {bad} sessions lost or billed twice")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
