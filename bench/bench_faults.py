"""The fault suite as a report: each fault is made to happen to a real cloud on loopback and a simulated
dispenser linked to it through a fault-injecting proxy, and the table says what happened, what was lost
(must be nothing), what was billed twice (must be nothing), and what the screen and the cloud showed.
(SIGKILL at random points is bench_crash.py; its figures are in run_all's table.)

    .venv/bin/python bench/bench_faults.py [--outage-s 20]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import contract as p  # noqa: E402
from kiosk.events import State  # noqa: E402
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


class LinkedFaults:
    """One cloud, the fault-injecting proxy and one dispenser linked through it; each method makes one fault happen
    to them, in turn, and returns its row of the table. The cloud restart replaces the cloud (and the user's client
    with it)."""

    def __init__(self, tmp: Path, cloud: CloudServer, proxy: FaultProxy, dev, user: UserClient, d: Dispenser) -> None:
        self.tmp, self.cloud, self.proxy, self.dev, self.user, self.d = tmp, cloud, proxy, dev, user, d

    def _scan_and_start(self) -> str:
        presence = self.user.scan("F1", self.d.qr_code(self.cloud.url)).json()["presence_token"]
        return self.user.start(presence).json()["session_id"]

    def _settled(self, sid: str, timeout_s: float) -> bool:
        return wait_until(lambda: settled(self.user, sid) and self.d.rt.ledger.outbox_depth() == 0, timeout_s)

    def network_cut(self, outage_s: float) -> dict:
        """The network goes away for minutes-like seconds mid-session."""
        d, user, proxy = self.d, self.user, self.proxy
        sid = self._scan_and_start()
        wait_until(lambda: d.hw.valve.is_open)
        proxy.down = True
        time.sleep(1.0)
        d.hw.world.press_stop()
        wait_until(lambda: d.rt.snapshot.state is State.OFFLINE, 15)
        screen = d.rt.snapshot.state.value
        time.sleep(max(0.0, outage_s - 1.0))
        cloud_during = user.call("GET", f"/api/v1/sessions/{sid}").json()["state"]
        proxy.down = False
        self._settled(sid, 60)
        lost, twice, note = books(d, user, [sid])
        return dict(fault=f"network cut {outage_s:.0f} s mid-session",
                    happened="pour finished on the grant; report kept on disk, sent on reconnect"
                    + ("; the cloud had voided the start it never saw confirmed, the late report settled it"
                       if cloud_during == "voided" else ""), lost=lost, twice=twice,
                    screen=f"{screen} (no QR) until the link returned", cloud=f"{cloud_during}, then ended; " + note)

    def lost_answers(self) -> tuple[dict, str]:
        """Answers lost after the server committed (events and the start's acknowledgement); the row and the
        session."""
        self.proxy.inject("/device/v1/events", "drop_response", times=2)
        self.proxy.inject("/device/v1/commands/", "drop_response", times=1)
        sid = buy_water(self.cloud, self.d, self.user)
        self._settled(sid, 30)
        lost, twice, note = books(self.d, self.user, [sid])
        return dict(fault="answers lost after commit (report x2, start ack)", happened="retried with the "
                    "same event id; the cloud replied from its record", lost=lost, twice=twice,
                    screen="normal session and receipt", cloud="one bill; " + note), sid

    def replays(self, sid: str) -> dict:
        """A replayed session report (of ``sid``), a replayed QR scan, a replayed start command."""
        d, user = self.d, self.user
        rep = d.rt.ledger.session(sid)["report_event_id"]
        body = next(r for r in d.rt.ledger.outbox("sent", limit=1000) if r["event_id"] == rep)
        again = d.client.send_events([{"event_id": rep, "kind": body["kind"], "payload": body["payload"]}])
        pres = user.scan("F1", d.qr_code(self.cloud.url)).json()["presence_token"]
        first = user.start(pres)
        replay = user.start(pres)
        sids = [sid]
        if first.status_code == 200:
            sids.append(first.json()["session_id"])
            self._start_command_again(sids[-1])
        after = user.start(pres)                        # the same scan once that session is over
        lost, twice, note = books(d, user, sids)
        return dict(fault="replayed report, QR scan and start command",
                    happened=f"report: {again[0].status}; second start with one scan: "
                             f"{replay.status_code} {replay.json().get('error')} while it runs, "
                             f"{after.status_code} {after.json().get('error')} after; "
                             "the start command again: ignored, the session is already here",
                    lost=lost, twice=twice, screen="one session", cloud="one bill per session; " + note)

    def _start_command_again(self, sid: str) -> None:
        """The cloud's start for the running session ``sid`` arrives a second time; then the session ends."""
        d = self.d
        wait_until(lambda: d.hw.valve.is_open)
        cmd = p.CommandMsg(command_id="c-replayed", kind="start", session_id=sid,
                           grant=p.GrantMsg(session_id=sid, machine_id="F1", user_ref=self.user.user_id,
                                            price_fen_per_l=200, credit_limit_fen=1000, max_volume_ml=5000,
                                            max_duration_ms=60_000, max_idle_ms=15_000,
                                            deadline_ms=d.client.server_now_ms() + 5_000, min_dispense_ml=10))
        d.link._dispatch(cmd)
        d.hw.world.press_stop()
        self._settled(sid, 30)

    def forged_keys(self) -> dict:
        """A forged signature and another machine's key."""
        other = self.cloud.provision("F2")
        forged = self.dev.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False},
                                  secret=secrets.token_bytes(32))
        stolen = self.dev.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False},
                                  secret=other.secret)
        return dict(fault="forged signature; another machine's key",
                    happened=f"{forged.status_code} {forged.json()['error']}; "
                             f"{stolen.status_code} {stolen.json()['error']}", lost=0, twice=0,
                    screen="unaffected", cloud="refused, nothing recorded")

    def sensor_unplugged(self) -> dict:
        """The temperature sensor unplugged mid-session (plugged back in afterwards)."""
        d, user = self.d, self.user
        sid = self._scan_and_start()
        wait_until(lambda: d.hw.valve.is_open)
        d.hw.world.thermometer.unplug()
        noticed = wait_until(lambda: d.rt.snapshot.temp_c is None, 20)      # the next sensor poll
        during = d.rt.snapshot.temp_c
        valve_open = d.hw.valve.is_open
        d.hw.world.press_stop()
        self._settled(sid, 30)
        quality = user.call("GET", f"/api/v1/sessions/{sid}").json()["bill"]["water_quality"]
        lost, twice, note = books(d, user, [sid])
        d.hw.world.thermometer.set(12.0)
        return dict(fault="temperature sensor unplugged mid-session",
                    happened=f"noticed: {noticed} (temperature {during}); pour went on: {valve_open}; "
                             f"bill: start {quality.get('temp_start_c')}, end {quality.get('temp_end_c')}",
                    lost=lost, twice=twice, screen="temperature 'unknown' (未知)",
                    cloud="bill with the temperatures known; " + note)

    def cloud_restart(self) -> dict:
        """The cloud restarts while a session report is on its way."""
        d = self.d
        sid = self._scan_and_start()
        wait_until(lambda: self.user.call("GET", f"/api/v1/sessions/{sid}").json()["state"] == "active")
        self.proxy.inject("/device/v1/events", "down", times=3)          # the report's first tries fail...
        time.sleep(1.0)
        d.hw.world.press_stop()
        wait_until(lambda: d.rt.ledger.session(sid)["state"] == "ended", 15)
        self.cloud.__exit__(None, None, None)                             # ...and the cloud goes down and back up
        self.cloud = CloudServer(self.tmp / "cloud").__enter__()
        self.proxy.upstream = self.cloud.url
        self.user = UserClient(self.cloud.url, self.user.token, self.user.user_id)
        ok = self._settled(sid, 60)
        lost, twice, note = books(d, self.user, [sid])
        return dict(fault="cloud restarted mid-report", happened=f"report delivered after the restart: {ok}",
                    lost=lost, twice=twice, screen="receipt, then idle when the link returned",
                    cloud="one bill; " + note)

    def stuck_valve_then_leak(self) -> list[dict]:
        """Water flows with the valve shut (a stuck valve), then a leak while idle."""
        d, world = self.d, self.d.hw.world
        wait_until(lambda: d.rt.snapshot.state is State.IDLE, 30)
        world.water.ghost_ml_per_min = 3_000
        ok = wait_until(lambda: "ghost_flow" in d.rt.snapshot.lockouts, 30)
        world.water.ghost_ml_per_min = 0
        alarmed = wait_until(lambda: alarm(self.cloud, "ghost_flow"), 20)
        rows = [dict(fault="stuck valve (flow after close)", happened="ghost-flow lockout" if ok else "NOT DETECTED",
                     lost=0, twice=0, screen=d.rt.snapshot.state.value,
                     cloud=f"alarm received: {alarmed}; never billed")]
        world.set_leak(True)
        leak = wait_until(lambda: "leak_sensor" in d.rt.snapshot.lockouts, 10)
        alarmed = wait_until(lambda: alarm(self.cloud, "leak_sensor"), 20)
        rows.append(dict(fault="leak during idle", happened="leak-sensor lockout (cleared on site only)"
                         if leak else "NOT DETECTED", lost=0, twice=0, screen=d.rt.snapshot.state.value,
                         cloud=f"alarm received: {alarmed}"))
        return rows


def run(outage_s: float) -> list[dict]:
    """The linked faults, one after the other on the same cloud and dispenser: their rows."""
    tmp = Path(tempfile.mkdtemp())
    with CloudServer(tmp / "cloud") as cloud, FaultProxy(cloud.url) as proxy:
        dev = cloud.provision("F1", price=200)
        user = cloud.user("13700009999", balance_fen=100_000)
        with Dispenser(tmp, proxy.url, "F1", dev.secret) as d:
            assert wait_until(lambda: d.rt.snapshot.online, 15)
            faults = LinkedFaults(tmp, cloud, proxy, dev, user, d)
            rows = [faults.network_cut(outage_s)]
            row, sid = faults.lost_answers()
            rows += [row, faults.replays(sid), faults.forged_keys(), faults.sensor_unplugged(),
                     faults.cloud_restart(), *faults.stuck_valve_then_leak()]
            faults.cloud.__exit__(None, None, None)          # the restarted cloud
    return rows


def _held(user) -> int:
    return user.me()["held_fen"]


@contextlib.contextmanager
def _seam_world(tmp: Path, name: str, data_dir: Path | None = None):
    """A fresh cloud, proxy and dispenser (machine F9) with a funded user: ``(cloud, proxy, d, user)``."""
    base = tmp / name
    base.mkdir(parents=True, exist_ok=True)
    with CloudServer(base / "cloud") as cloud, FaultProxy(cloud.url) as proxy:
        dev = cloud.provision("F9", price=200)
        user = cloud.user("13700009998", balance_fen=100_000)
        with Dispenser(base, proxy.url, "F9", dev.secret, data_dir=data_dir) as d:
            assert wait_until(lambda: d.rt.snapshot.online, 15)
            yield cloud, proxy, d, user


def _view(user, sid):
    return user.call("GET", f"/api/v1/sessions/{sid}").json()


def _start(cloud, d, user):
    wait_until(lambda: d.rt.snapshot.state is State.IDLE, 15)
    presence = user.scan("F9", d.qr_code(cloud.url)).json()["presence_token"]
    return user.start(presence).json()["session_id"]


def _seam_full_disk(tmp: Path) -> list[dict]:
    """A full disk at session start; the lockout cleared while still full, then after space is freed."""
    import pytest

    from kiosk.events import ClearLockout, ClearSource
    from tests.test_money_faults import fill, small_disk

    rows: list[dict] = []
    (tmp / "disk").mkdir(parents=True, exist_ok=True)
    try:
        with (small_disk(tmp / "disk") as disk,
              _seam_world(tmp, "disk-world", disk / "dispenser") as (cloud, _, d, user)):
            filler = fill(disk)
            sid = _start(cloud, d, user)
            wait_until(lambda: _view(user, sid)["state"] == "voided", 15)
            rows.append(dict(fault="full disk at session start", lost=0, twice=0, held=_held(user),
                             happened=f"row not written; valve opened {d.hw.valve.transitions} times; the cloud "
                                      f"was told at once: {_view(user, sid)['state']}",
                             screen=d.rt.snapshot.state.value, cloud="not charged; alarm session_start_failed"))
            d.rt.post(ClearLockout("fault:storage", ClearSource.SITE, actor="bench"))
            wait_until(lambda: d.rt.snapshot.clear_refusal is not None, 5)
            refused = "fault:storage" in d.rt.snapshot.lockouts and d.rt.snapshot.clear_refusal is not None
            filler.unlink()
            d.rt.post(ClearLockout("fault:storage", ClearSource.SITE, actor="bench"))
            cleared = wait_until(lambda: "fault:storage" not in d.rt.snapshot.lockouts, 5)
            sid2 = buy_water(cloud, d, user)
            wait_until(lambda: settled(user, sid2) and d.rt.ledger.outbox_depth() == 0, 20)
            lost, twice, note = books(d, user, [sid2])
            rows.append(dict(fault="disk full, then lockout cleared", lost=lost, twice=twice, held=_held(user),
                             happened=f"clear while full refused with the reason: {refused}; cleared after space "
                                      f"was freed: {cleared}; the next customer served",
                             screen="out_of_service, then idle", cloud=note))
    except pytest.skip.Exception as e:
        rows.append(dict(fault="full disk at session start", lost=0, twice=0, held=0, happened=f"skipped: {e}",
                         screen="", cloud=""))
    return rows


def _seam_late_start(tmp: Path) -> dict:
    """A start command held up in transit past its deadline."""
    with _seam_world(tmp, "late") as (cloud, proxy, d, user):
        proxy.hold_commands_s = p.GRANT_DEADLINE_MS / 1000 + 1.0
        sid = _start(cloud, d, user)
        wait_until(lambda: _view(user, sid)["state"] == "voided", 15)
        time.sleep(1.5)
        return dict(fault=f"start command delayed {proxy.hold_commands_s or 9:.0f} s past its deadline",
                    lost=0, twice=0, held=_held(user),
                    happened=f"refused on arrival; valve opened {d.hw.valve.transitions} times",
                    screen=d.rt.snapshot.state.value,
                    cloud=f"{_view(user, sid)['state']} at deadline + {p.GRANT_SKEW_MS // 1000} s; "
                          f"{len(user.me()['bills'])} bills")


def _seam_thread_error(tmp: Path, thread: str) -> dict:
    """A transient ledger error in one sync thread."""
    from tests.test_money_faults import LedgerFaults

    with _seam_world(tmp, f"thread-{thread}") as (cloud, _, d, user):
        faults = LedgerFaults(d.rt.ledger, f"sync-{thread}")
        faults.fail(2)
        sid = buy_water(cloud, d, user)
        ok = wait_until(lambda: settled(user, sid) and d.rt.ledger.outbox_depth() == 0, 20)
        wait_until(lambda: faults.hits == 2, 5)
        faults.remove()
        lost, twice, note = books(d, user, [sid])
        alive = all(t.is_alive() for t in d.link._threads)
        return dict(fault=f"transient ledger error in the {thread} thread", lost=lost, twice=twice,
                    held=_held(user), happened=f"{faults.hits} errors, retried; settled: {ok}; threads "
                                               f"alive: {alive}", screen=d.rt.snapshot.state.value, cloud=note)


def _seam_replaced_ledger(tmp: Path) -> dict:
    """The ledger file replaced: boot 1 again."""
    base = tmp / "replaced"
    base.mkdir(parents=True, exist_ok=True)
    with CloudServer(base / "cloud") as cloud:
        dev = cloud.provision("F9", price=200)
        user = cloud.user("13700009997", balance_fen=100_000)
        sids, dead, boots = [], 0, []
        for round_ in range(2):
            with Dispenser(base, cloud.url, "F9", dev.secret) as d:
                wait_until(lambda d=d: d.rt.snapshot.online, 15)
                sids.append(buy_water(cloud, d, user))
                wait_until(lambda d=d: settled(user, sids[-1]) and d.rt.ledger.outbox_depth() == 0, 20)
                dead += d.rt.ledger.outbox_depth("dead")
                boots.append(d.rt.ledger.boot_id)
                db_path = d.cfg.db_path
            if round_ == 0:
                for suffix in ("", "-wal", "-shm"):
                    Path(str(db_path) + suffix).unlink(missing_ok=True)
        bills = [b["session_id"] for b in user.me()["bills"]]
        return dict(fault="ledger file replaced", lost=sum(1 for s in sids if s not in bills),
                    twice=len(bills) - len(set(bills)), held=_held(user),
                    happened=f"boots {boots}: report ids carry the new file's id; {dead} dead letters",
                    screen="idle", cloud=f"{len(bills)} bills for {len(sids)} sessions")


def _seam_gpio(tmp: Path) -> dict:
    """A GPIO error when the valve opens."""
    with _seam_world(tmp, "gpio") as (cloud, _, d, user):
        pin = d.hw.factory.pin(d.cfg.pins.valve)
        real_set = pin._set_state

        def broken(value):
            if value == d.cfg.pins.valve_active_high:
                raise OSError(errno.EIO, "GPIO line write failed")
            real_set(value)
        pin._set_state = broken
        sid = _start(cloud, d, user)
        wait_until(lambda: settled(user, sid) and d.rt.ledger.outbox_depth() == 0, 20)
        pin._set_state = real_set
        lost, twice, note = books(d, user, [sid])
        return dict(fault="GPIO exception when the valve opens", lost=lost, twice=twice, held=_held(user),
                    happened=f"lockouts {list(d.rt.snapshot.lockouts)}; ledger still written: {d.rt.ledger_ok}; "
                             f"the session ended as {_view(user, sid)['end_reason']}, nothing poured",
                    screen=d.rt.snapshot.state.value, cloud=note)


def run_seams(tmp: Path) -> list[dict]:
    """Faults at the seams between the machine and the cloud (issue 14), each in a fresh cloud and dispenser:
    a full disk (a real tmpfs; skipped with the reason where none can be mounted), a start held up past its
    deadline, a transient ledger error in each sync thread, a replaced ledger file, a GPIO error on open."""
    return [*_seam_full_disk(tmp), _seam_late_start(tmp),
            *(_seam_thread_error(tmp, thread) for thread in ("commands", "outbox", "heartbeat")),
            _seam_replaced_ledger(tmp), _seam_gpio(tmp)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage-s", type=float, default=20)
    args = ap.parse_args()
    rows = run(args.outage_s) + run_seams(Path(tempfile.mkdtemp()))
    print("| fault | what happened | lost | billed twice | held after the end (fen) | screen | cloud |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['fault']} | {r['happened']} | {r['lost']} | {r['twice']} | {r.get('held', 0)} | {r['screen']} "
              f"| {r['cloud']} |")
    bad = sum(r["lost"] + r["twice"] + bool(r.get("held")) for r in rows)
    print(f"\n{len(rows)} faults, {bad} sessions lost, billed twice or left holding money")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
