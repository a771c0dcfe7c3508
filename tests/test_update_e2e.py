"""Fleet updates end to end: the real cloud (tests/cloudkit.py, SQLite on loopback) and a real machine
(main.py --simulate --headless, provisioned and enrolled against that cloud, with root's applier run where systemd
would run it: tests/updatekit.py). An admin uploads a bundle built by scripts/make-bundle.py --host-wheels and
rolls it out to the machine through the operator API; the machine finds the offer in its heartbeat's answer,
downloads it through the cloud's Range endpoint (the network breaks once mid-download, so it resumes), root
installs and switches, and the rollout API tells the story. The halves were built against a stand-in cloud and
the cloud's own tests respectively: this is where their field names, steps and rules have to agree."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from tests import updatekit as kit
from tests.cloudkit import CloudServer
from tests.test_updates import bundles  # noqa: F401  (the module's fixture: the key, the checkout, the 0.3.0 bundle)
from tests.util import wait_until

pytestmark = pytest.mark.slow

EVERY_STEP = ["downloading", "downloaded", "verified", "installed", "switched", "healthy"]


class CuttingProxy:
    """A TCP relay between the machine and the cloud that breaks the first bundle download after ``cut_bytes``
    of the answer (what a flaky mobile link does), and notes every request's first line and Range header."""

    def __init__(self, target_port: int, cut_bytes: int) -> None:
        self.target_port, self.cut_bytes = target_port, cut_bytes
        self.requests: list[str] = []
        self.cut_done = False
        self.on_cut = lambda: None            # called once the cut is decided, before the machine sees it
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._halt = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._halt = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._halt:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            conn = {"bundle": False, "sent": 0}
            threading.Thread(target=self._up, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, conn), daemon=True).start()

    def _up(self, client, upstream, conn) -> None:
        try:
            while data := client.recv(65536):
                text = data.decode("latin-1")
                if text.startswith(("GET ", "POST ")):
                    line = text.split("\r\n", 1)[0]
                    rng = [h for h in text.split("\r\n") if h.lower().startswith("range:")]
                    self.requests.append(line + (" " + rng[0] if rng else ""))
                    if " /device/v1/releases/" in line and not self.cut_done:
                        conn["bundle"], conn["sent"] = True, 0
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _down(self, upstream, client, conn) -> None:
        try:
            while data := upstream.recv(65536):
                if conn["bundle"] and not self.cut_done:
                    conn["sent"] += len(data)
                    if conn["sent"] > self.cut_bytes:
                        self.cut_done = True
                        self.on_cut()
                        break
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def bundle_requests(self) -> list[str]:
        return [r for r in self.requests if " /device/v1/releases/" in r]


def _close(*socks) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


class Fleet:
    cloud: CloudServer
    proxy: CuttingProxy
    layout: Path
    machine_id: str
    reports: list[tuple[str, bool]]


@pytest.fixture
def fleet(bundles, tmp_path):  # noqa: F811
    """The cloud trusting the release key and one machine provisioned,
    enrolled (its secret from the enrolment) and set up at 0.2.0, talking to the cloud through the proxy. Every
    update report the cloud takes is noted with whether it was recorded."""
    f = Fleet()
    with CloudServer(tmp_path / "cloud") as cloud:
        f.cloud = cloud
        keys = Path(cloud.settings.release_keys_dir)
        keys.mkdir(parents=True, exist_ok=True)
        (keys / "release.pub.pem").write_bytes(bundles.pub.read_bytes())
        f.machine_id = f"E2E-{os.urandom(3).hex()}"
        device = cloud.provision(f.machine_id)
        f.proxy = CuttingProxy(int(cloud.url.rsplit(":", 1)[1]), cut_bytes=5_000_000)
        f.layout = kit.make_layout(tmp_path / "m", bundles.checkout, f.proxy.url, f.machine_id, device.secret,
                                   [bundles.pub], bundles.venvs)
        releases = cloud.app.state.services.releases
        f.reports = []
        real_report = releases.report

        def noting(machine_id, msg, now_ms):
            out = real_report(machine_id, msg, now_ms)
            f.reports.append((msg.step, out["recorded"], msg.model_dump()))
            return out

        releases.report = noting
        try:
            yield f
        finally:
            kit.stop_kiosk(f.layout)
            f.proxy.close()


def upload(f: Fleet, bundle: Path) -> None:
    """An admin uploads the bundle file, as the console does."""
    r = f.cloud.op("POST", "/api/v1/operator/releases", data=bundle.read_bytes(),
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "0.3.0" and r.json()["sha256"] == kit.sha256_file(bundle)


def heard(f: Fleet) -> str:
    """The software version the machine's last heartbeat told the cloud."""
    r = f.cloud.op("GET", "/api/v1/operator/fleet", params={"q": f.machine_id})
    assert r.status_code == 200, r.text
    return next((m["software_version"] or "" for m in r.json()["machines"] if m["machine_id"] == f.machine_id), "")


def rollout_view(f: Fleet, rid: int) -> dict:
    r = f.cloud.op("GET", f"/api/v1/operator/rollouts/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


def start_online(f: Fleet) -> None:
    kit.start_kiosk(f.layout)
    assert wait_until(lambda: heard(f) == "0.2.0", 60), kit.kiosk_log(f.layout)


def roll_out(f: Fleet, **body) -> int:
    r = f.cloud.op("POST", "/api/v1/operator/rollouts", json={"version": "0.3.0", "machine_ids": [f.machine_id],
                                                              **body})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "active" and r.json()["counts"]["pending"] == 1
    return r.json()["rollout_id"]


def test_a_release_rolled_out_by_the_cloud_lands_and_the_rollout_is_done(bundles, fleet):  # noqa: F811
    f = fleet
    upload(f, bundles.good)
    start_online(f)
    rid = roll_out(f)
    with kit.PathUnit(f.layout) as unit:
        assert wait_until(lambda: rollout_view(f, rid)["state"] == "done", 900), (
            f.reports, unit.output(), kit.kiosk_log(f.layout))
        assert wait_until(lambda: not (f.layout / "opt" / "state" / "trial.json").exists(), 60), unit.output()
        assert wait_until(lambda: [s for s, _, _ in f.reports] == EVERY_STEP, 60), f.reports
    view = rollout_view(f, rid)
    [m] = view["machines"]
    assert m["machine_id"] == f.machine_id and m["step"] == "healthy"
    assert m["running_version"] == "0.3.0" and m["heartbeat_version"] == "0.3.0"
    assert view["counts"]["healthy"] == 1 and view["machine_count"] == 1
    assert heard(f) == "0.3.0"
    assert {r["rollout_id"] for _, _, r in f.reports} == {rid} and {r["version"] for _, _, r in f.reports} == {"0.3.0"}
    # the download broke off once and was resumed with Range from where it stopped, at the cloud's endpoint
    assert f.proxy.cut_done
    got = f.proxy.bundle_requests()
    assert len(got) == 2 and "range" not in got[0].lower(), got
    assert got[1].lower().startswith("get /device/v1/releases/0.3.0/bundle") and "range: bytes=" in got[1].lower()
    assert int(got[1].lower().split("bytes=")[1].rstrip("-")) > 0
    target = os.readlink(f.layout / "opt" / "current")
    assert target.startswith("releases/0.3.0-") and (f.layout / "opt" / target / "VERSION").read_text() == "0.3.0\n"
    assert json.loads((f.layout / "opt" / "state" / "installed.json").read_text()) == {"highest": "0.3.0"}


@pytest.fixture(scope="module")
def crashing(bundles, tmp_path_factory):  # noqa: F811
    """0.3.0 signed by the trusted key, whose main.py exits at once: it installs fine and never reaches the cloud."""
    return kit.rewrite_bundle(bundles.good, tmp_path_factory.mktemp("crash") / "crash.bundle", key=bundles.key,
                              replace={"app/main.py": b"import sys\nsys.exit('this release cannot start')\n"})


def test_a_release_that_crashes_is_rolled_back_and_stops_its_rollout_with_an_alarm(fleet, crashing):
    f = fleet
    upload(f, crashing)
    start_online(f)
    rid = roll_out(f, max_rollback_pct=0)
    with kit.PathUnit(f.layout, health_s=20) as unit:
        assert wait_until(lambda: rollout_view(f, rid)["state"] == "stopped", 900), (
            f.reports, unit.output(), kit.kiosk_log(f.layout))
    view = rollout_view(f, rid)
    [m] = view["machines"]
    assert (m["step"], m["reason"], m["running_version"]) == ("rolled_back", "no_heartbeat", "0.2.0"), m
    assert view["counts"]["rolled_back"] == 1 and "1 of 1" in view["stop_reason"], view
    assert [s for s, _, _ in f.reports] == ["downloading", "downloaded", "verified", "installed", "switched",
                                            "rolled_back"]
    assert all(recorded for _, recorded, _ in f.reports), f.reports
    cases = f.cloud.op("GET", "/api/v1/operator/alarm-cases?state=active&rule=rollout").json()["alarms"]
    assert len(cases) == 1 and cases[0]["detail"]["rollout_id"] == rid and cases[0]["detail"]["rolled_back"] == 1
    audit = f.cloud.op("GET", "/api/v1/operator/audit?action=rollout_auto_stop").json()["entries"]
    assert [e["target"] for e in audit] == [str(rid)]
    # the machine runs 0.2.0 on, tells the cloud so, and is offered nothing more
    assert os.readlink(f.layout / "opt" / "current") == "releases/0.2.0-base"
    n = len(f.proxy.requests)
    assert wait_until(lambda: len([r for r in f.proxy.requests[n:] if "/heartbeat" in r]) >= 2, 30)
    assert heard(f) == "0.2.0" and len(f.proxy.bundle_requests()) == 2      # the cut one and its resumption


def test_a_pause_while_the_download_is_broken_off_lets_it_finish_and_resume_carries_on(bundles, fleet):  # noqa: F811
    """The operator pauses the rollout just as the machine's download breaks off: it resumes its download all the
    same (nothing new is offered, but what a machine began it may finish), and after resume the rollout ends done,
    not stopped by a ``failed`` that a refused download would have caused."""
    f = fleet
    upload(f, bundles.good)
    start_online(f)
    rid = roll_out(f)
    paused = []
    f.proxy.on_cut = lambda: paused.append(f.cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/pause").json())
    with kit.PathUnit(f.layout) as unit:
        assert wait_until(lambda: {"downloaded", "failed"} & {s for s, _, _ in f.reports}, 240), (
            f.reports, kit.kiosk_log(f.layout))
        assert paused[0]["state"] == "paused" and rollout_view(f, rid)["state"] == "paused"
        assert "failed" not in [s for s, _, _ in f.reports], f.reports
        got = f.proxy.bundle_requests()
        assert len(got) == 2 and "range: bytes=" in got[1].lower(), got
        r = f.cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/resume")
        assert r.status_code == 200 and r.json()["state"] == "active", r.text
        assert wait_until(lambda: rollout_view(f, rid)["state"] == "done", 900), (
            f.reports, unit.output(), kit.kiosk_log(f.layout))
        assert wait_until(lambda: not (f.layout / "opt" / "state" / "trial.json").exists(), 60), unit.output()
    [m] = rollout_view(f, rid)["machines"]
    assert (m["step"], m["running_version"]) == ("healthy", "0.3.0") and heard(f) == "0.3.0"
    assert [s for s, _, _ in f.reports] == EVERY_STEP, f.reports
