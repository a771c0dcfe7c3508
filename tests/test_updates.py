"""Fleet updates on the machine: real bundles (scripts/make-bundle.py --host-wheels from a copy of this checkout),
real main.py processes talking to a stand-in cloud that speaks the contract, and root's applier
(scripts/apply-update.py) run where systemd would run it, in a temporary /opt/tapshare, /var/lib/tapshare and
/etc/tapshare (tests/updatekit.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import updatekit as kit
from tests.util import wait_until

pytestmark = pytest.mark.slow


class Kit:
    key: Path
    pub: Path
    checkout: Path
    good: Path
    venvs: Path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Kit:
    k = Kit()
    base = tmp_path_factory.mktemp("bundles")
    k.key = base / "release.pem"
    subprocess.run([sys.executable, str(kit.ROOT / "scripts" / "make-bundle.py"), "--new-key", str(k.key)],
                   check=True, capture_output=True)
    k.pub = base / "release.pub.pem"
    (base / "src").mkdir()
    k.checkout = kit.checkout_copy(base / "src")
    out = subprocess.run([sys.executable, str(kit.ROOT / "scripts" / "make-bundle.py"), "--key", str(k.key), "--src",
                          str(k.checkout), "--out", str(base), "--version", "0.3.0", "--min-version", "0.2.0",
                          "--host-wheels"], check=True, capture_output=True, text=True)
    k.good = Path(out.stdout.split()[0])
    k.venvs = base / "venvs"
    k.venvs.mkdir()
    return k


@pytest.fixture
def machine(bundles, tmp_path):
    machine_id, secret = kit.new_machine()
    cloud = kit.StandInCloud(machine_id, secret)
    layout = kit.make_layout(tmp_path / "m", bundles.checkout, cloud.url, machine_id, secret, [bundles.pub],
                             bundles.venvs)
    yield cloud, layout
    kit.stop_kiosk(layout)
    cloud.close()


def current(layout: Path) -> str:
    return os.readlink(layout / "opt" / "current")


def releases(layout: Path) -> list[str]:
    return sorted(p.name for p in (layout / "opt" / "releases").iterdir())


def start_and_wait_online(cloud, layout, version="0.2.0") -> None:
    kit.start_kiosk(layout)
    assert wait_until(lambda: version in cloud.versions_heard(), 60), kit.kiosk_log(layout)


def test_a_good_update_resumes_its_download_lands_and_reports_every_step(bundles, machine):
    cloud, layout = machine
    old = layout / "opt" / "releases" / "0.1.0-old"          # a release from long ago: pruned once 0.3.0 is live
    old.mkdir()
    (old / ".installed").touch()
    start_and_wait_online(cloud, layout)
    cloud.cut_download_after = 5_000_000                 # the first download breaks off: resumed with Range
    cloud.offer_bundle(bundles.good, "0.3.0", rollout_id=7)
    with kit.PathUnit(layout) as unit:
        assert wait_until(lambda: "healthy" in cloud.steps(), 900), (cloud.reports, unit.output(),
                                                                      kit.kiosk_log(layout))
        assert wait_until(lambda: not (layout / "opt" / "state" / "trial.json").exists(), 60), unit.output()
    assert cloud.steps("0.3.0") == ["downloading", "downloaded", "verified", "installed", "switched", "healthy"]
    assert {r["rollout_id"] for r in cloud.reports} == {7}
    assert len(cloud.range_requests) == 1 and int(cloud.range_requests[0][6:-1]) > 0
    target = current(layout)
    assert target.startswith("releases/0.3.0-") and (layout / "opt" / target / "VERSION").read_text() == "0.3.0\n"
    assert "0.3.0" in cloud.versions_heard()
    state = layout / "opt" / "state"
    assert json.loads((state / "installed.json").read_text()) == {"highest": "0.3.0"}
    assert (layout / "opt" / "live").read_text().startswith(target + "\n")
    assert (layout / "opt" / "previous").read_text() == "releases/0.2.0-base\n"
    assert not list((layout / "data" / "updates").glob("*.bundle"))        # cleaned up once healthy
    assert releases(layout) == sorted(["0.2.0-base", target.split("/")[1]])   # live and previous: no more


def test_an_install_without_room_is_failed_no_space_and_leaves_nothing_behind(bundles, machine, tmp_path):
    """The applier's state folder on a real small disk: the bundle's copy would leave less than the reserve."""
    _cloud, layout = machine
    from tests.test_money_faults import small_disk
    state = layout / "opt" / "state"
    state.mkdir(parents=True, exist_ok=True)
    size_mb = bundles.good.stat().st_size // 2**20 + 8           # room for the bundle, not for the reserve too
    with small_disk(tmp_path, size_mb) as disk:
        subprocess.run(["mount", "--bind", str(disk), str(state)], check=True)
        try:
            ask(layout, "install", bundles.good)
            r = kit.PathUnit(layout).run_applier("run")
            assert r.returncode == 1, r.stderr
            events = json.loads((state / "events.json").read_text())["events"]
            assert [(e["step"], e["reason"]) for e in events] == [("failed", "no_space")]
            assert "MiB" in events[0]["detail"] and "free" in events[0]["detail"]
            assert not (state / "incoming.bundle").exists()
            assert releases(layout) == ["0.2.0-base"] and current(layout) == "releases/0.2.0-base"
        finally:
            subprocess.run(["umount", "-l", str(state)], check=False)


def flip_signature(sig: bytes) -> bytes:
    data = json.loads(sig)
    raw = bytearray(base64.b64decode(data["signature"]))
    raw[5] ^= 1
    data["signature"] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(data).encode()


def bad_bundle(bundles: Kit, tmp: Path, case: str) -> tuple[Path, str]:
    out = tmp / f"{case}.bundle"
    if case == "bad_signature":
        return kit.rewrite_bundle(bundles.good, out, sig_edit=flip_signature), "bad_signature"
    if case == "tampered":
        return kit.rewrite_bundle(bundles.good, out, replace={"app/main.py": b"print('owned')\n"}), "tampered"
    if case == "wrong_device_type":
        return kit.rewrite_bundle(bundles.good, out, key=bundles.key, manifest_edit=lambda m: m.update(
            device_types=["tapshare-esp32"])), "wrong_device_type"
    if case == "downgrade":
        return bundles.good, "downgrade"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["bad_signature", "tampered", "wrong_device_type", "downgrade"])
def test_a_bad_bundle_is_refused_with_its_reason_and_nothing_switches(bundles, machine, tmp_path, case):
    cloud, layout = machine
    path, reason = bad_bundle(bundles, tmp_path, case)
    if case == "downgrade":              # this machine once ran 0.4.0 (root's record): 0.3.0 is a downgrade
        (layout / "opt" / "state").mkdir()
        (layout / "opt" / "state" / "installed.json").write_text('{"highest": "0.4.0"}')
    start_and_wait_online(cloud, layout)
    cloud.offer_bundle(path, "0.3.0", rollout_id=3)
    with kit.PathUnit(layout) as unit:
        assert wait_until(lambda: "refused" in cloud.steps(), 120), (cloud.reports, kit.kiosk_log(layout))
    refusal = [r for r in cloud.reports if r["step"] == "refused"]
    assert [r["reason"] for r in refusal] == [reason] and refusal[0]["detail"]
    assert "verified" not in cloud.steps() and unit.runs == []          # root was never asked
    assert current(layout) == "releases/0.2.0-base" and releases(layout) == ["0.2.0-base"]
    assert not list((layout / "data" / "updates").glob("*.bundle"))
    n = len(cloud.heartbeats)
    assert wait_until(lambda: len(cloud.heartbeats) >= n + 2, 30)      # still offered: not tried again
    assert cloud.steps().count("refused") == 1


def test_a_download_longer_than_offered_is_abandoned(bundles, machine):
    cloud, layout = machine
    start_and_wait_online(cloud, layout)
    cloud.offer_bundle(bundles.good, "0.3.0")
    cloud.offer["size_bytes"] = 1_000_000
    assert wait_until(lambda: "failed" in cloud.steps(), 60), kit.kiosk_log(layout)
    assert [r["reason"] for r in cloud.reports if r["step"] == "failed"] == ["too_large"]
    assert not list((layout / "data" / "updates").glob("0.3.0*")) and current(layout) == "releases/0.2.0-base"


def test_the_applier_checks_again_and_refuses_what_the_kiosk_should_not_have_passed(bundles, machine, tmp_path):
    """A kiosk that was subverted asks root to install a tampered bundle: root's own check refuses it."""
    _cloud, layout = machine
    path, _ = bad_bundle(bundles, tmp_path, "tampered")
    staged = layout / "data" / "updates" / "0.3.0.bundle"
    staged.write_bytes(path.read_bytes())
    (layout / "data" / "updates" / "apply.json").write_text(json.dumps({
        "action": "install", "version": "0.3.0", "bundle": str(staged), "sha256": kit.sha256_file(staged),
        "rollout_id": 2}))
    r = kit.PathUnit(layout).run_applier("run")
    assert r.returncode == 1, r.stderr
    events = json.loads((layout / "opt" / "state" / "events.json").read_text())["events"]
    assert [(e["step"], e["reason"]) for e in events] == [("refused", "tampered")]
    assert releases(layout) == ["0.2.0-base"] and current(layout) == "releases/0.2.0-base"


def test_the_applier_leaves_a_switch_asked_for_too_long_ago_undone(bundles, machine):
    """The kiosk asks root to switch only while its update hold keeps the machine idle, and says until when. A
    request found after that (the applier was late, the hold may have lifted, a customer may be pouring) is
    recorded as deferred and not carried out: the installed release stays beside the running one, nothing
    restarts, and the kiosk asks again when it is idle."""
    _cloud, layout = machine
    updates = layout / "data" / "updates"
    staged = updates / "0.3.0.bundle"
    staged.write_bytes(bundles.good.read_bytes())
    (updates / "apply.json").write_text(json.dumps({
        "action": "install", "version": "0.3.0", "bundle": str(staged), "sha256": kit.sha256_file(staged),
        "rollout_id": 7}))
    unit = kit.PathUnit(layout, health_s=5)          # were it to switch, the trial would be short
    r = unit.run_applier("run")
    assert r.returncode == 0, r.stderr
    installed = [name for name in releases(layout) if name.startswith("0.3.0-")]
    assert installed and current(layout) == "releases/0.2.0-base"
    now_ms = time.time_ns() // 1_000_000
    (updates / "apply.json").write_text(json.dumps({"action": "switch", "version": "0.3.0", "rollout_id": 7,
                                                    "not_after_ms": now_ms - 1_000}))
    r = unit.run_applier("run")
    assert r.returncode == 0, r.stderr
    events = json.loads((layout / "opt" / "state" / "events.json").read_text())["events"]
    assert (events[-1]["step"], events[-1]["reason"]) == ("deferred", "stale"), events
    assert current(layout) == "releases/0.2.0-base" and releases(layout) == ["0.2.0-base", *installed]
    assert not (layout / "opt" / "state" / "trial.json").exists()                 # no trial begun
    assert not (updates / "apply.json").exists()                                  # the request is used up


def test_a_release_that_crashes_at_start_is_rolled_back_and_reported(bundles, machine, tmp_path):
    cloud, layout = machine
    crashing = kit.rewrite_bundle(bundles.good, tmp_path / "crash.bundle", key=bundles.key, replace={
        "app/main.py": b"import sys\nsys.exit('this release cannot start')\n"})
    start_and_wait_online(cloud, layout)
    cloud.offer_bundle(crashing, "0.3.0", rollout_id=4)
    with kit.PathUnit(layout, health_s=20) as unit:
        assert wait_until(lambda: "rolled_back" in cloud.steps(), 900), (cloud.reports, unit.output(),
                                                                          kit.kiosk_log(layout))
    assert cloud.steps("0.3.0") == ["downloading", "downloaded", "verified", "installed", "switched",
                                    "rolled_back"]
    back = next(r for r in cloud.reports if r["step"] == "rolled_back")
    assert back["reason"] == "no_heartbeat" and back["running_version"] == "0.2.0"
    assert current(layout) == "releases/0.2.0-base" and releases(layout) == ["0.2.0-base"]
    assert not (layout / "opt" / "state" / "installed.json").exists()           # 0.3.0 never counted as installed
    n = len(cloud.heartbeats)
    assert wait_until(lambda: len(cloud.heartbeats) > n + 2, 30)
    assert cloud.heartbeats[-1]["software_version"] == "0.2.0"
    assert cloud.steps().count("downloading") == 1                               # not tried again


def test_an_update_offered_mid_pour_is_deferred_until_the_machine_is_idle(bundles, machine):
    cloud, layout = machine
    start_and_wait_online(cloud, layout)
    now_ms = int(__import__("time").time() * 1000)
    cloud.commands.append({"command_id": "start-1", "kind": "start", "grant": {
        "session_id": "S-mid-pour", "machine_id": cloud.machine_id, "user_ref": "U1", "price_fen_per_l": 200,
        "credit_limit_fen": 1000, "max_volume_ml": 5000, "max_duration_ms": 20_000, "max_idle_ms": 60_000,
        "deadline_ms": now_ms + 30_000, "min_dispense_ml": 0}})
    assert wait_until(lambda: cloud.heartbeats[-1]["state"] == "dispensing", 30), kit.kiosk_log(layout)
    cloud.offer_bundle(bundles.good, "0.3.0", rollout_id=5)
    with kit.PathUnit(layout) as unit:
        assert wait_until(lambda: "deferred" in cloud.steps(), 60), (cloud.reports, kit.kiosk_log(layout))
        assert cloud.heartbeats[-1]["state"] == "dispensing" and "switched" not in cloud.steps()
        assert wait_until(lambda: "healthy" in cloud.steps(), 300), (cloud.reports, unit.output())
    assert cloud.steps("0.3.0") == ["downloading", "downloaded", "verified", "installed", "deferred", "switched",
                                    "healthy"]
    from kiosk.ledger import Ledger
    ledger = Ledger.open(layout / "data" / "ledger.db", machine_id=cloud.machine_id, wall_clock=lambda: 0,
                         new_boot=False)
    try:
        session = ledger.session("S-mid-pour")
    finally:
        ledger.close()
    assert session["state"] == "ended" and session["end_reason"] == "max_duration"    # not cut by the switch


def ask(layout: Path, action: str, bundle: Path) -> None:
    staged = layout / "data" / "updates" / "0.3.0.bundle"
    if not staged.exists():
        staged.write_bytes(bundle.read_bytes())
    (layout / "data" / "updates" / "apply.json").write_text(json.dumps({
        "action": action, "version": "0.3.0", "bundle": str(staged), "sha256": kit.sha256_file(staged),
        "rollout_id": 9}))


def runnable(layout: Path) -> bool:
    cur = layout / "opt" / "current"
    r = subprocess.run([str(cur / ".venv" / "bin" / "python"), str(cur / "main.py"), "--print-config"],
                       capture_output=True, cwd=cur)
    return r.returncode == 0


@pytest.mark.parametrize("step", ["unpacked", "venv", "journal", "switched", "restarted"])
def test_power_loss_at_each_step_of_the_switch_leaves_one_working_release(bundles, machine, step):
    cloud, layout = machine
    unit = kit.PathUnit(layout, crash_at=step)
    if step in ("journal", "switched", "restarted"):
        ask(layout, "install", bundles.good)
        assert kit.PathUnit(layout).run_applier("run").returncode == 0
        ask(layout, "switch", bundles.good)
    else:
        ask(layout, "install", bundles.good)
    r = unit.run_applier("run")
    assert r.returncode == -9, r.stderr                  # SIGKILL: the power went
    if step == "restarted":                              # the new release had started: it dies with the power
        kit.stop_kiosk(layout)
    healthy = (layout / "data" / "updates" / "healthy-0.3.0").exists()
    r = kit.PathUnit(layout).run_applier("recover", "--boot")
    assert r.returncode == 0, r.stderr
    target = current(layout)
    assert target == ("releases/0.2.0-base" if not healthy else target) and target.startswith("releases/0.")
    assert (layout / "opt" / target / ".installed").exists() and runnable(layout)
    assert not [p for p in (layout / "opt" / "releases").iterdir() if p.name.startswith(".")]
    assert not (layout / "opt" / "state" / "trial.json").exists() and not (layout / "opt" / "current.new").exists()
    events = json.loads((layout / "opt" / "state" / "events.json").read_text())["events"] \
        if (layout / "opt" / "state" / "events.json").exists() else []
    if step in ("journal", "switched", "restarted") and not healthy:
        assert (events[-1]["step"], events[-1]["reason"]) == ("rolled_back", "interrupted")
        assert releases(layout) == ["0.2.0-base"]
    # and the machine runs on: the release recovery left starts and reaches the cloud
    kit.start_kiosk(layout)
    version = (layout / "opt" / target / "VERSION").read_text().strip() if healthy else "0.2.0"
    assert wait_until(lambda: version in cloud.versions_heard(), 60), kit.kiosk_log(layout)


def test_deploy_installs_the_applier_its_units_and_the_pinned_key(bundles, tmp_path):
    import shutil

    from tests.test_deploy import deploy, fake_pi
    root = fake_pi(tmp_path / "root")
    r = deploy(root, "--release-key", str(bundles.pub), release="r1")
    assert r.returncode == 0, r.stderr
    assert (root / "etc/tapshare/release-keys/release.pub.pem").read_bytes() == bundles.pub.read_bytes()
    applier = root / "usr/local/lib/tapshare/apply-update.py"
    assert applier.read_bytes() == kit.APPLIER.read_bytes() and os.access(applier, os.X_OK)
    units = [root / "etc/systemd/system" / n for n in ("tapshare-update.path", "tapshare-update.service",
                                                        "tapshare-update-recover.service")]
    assert "PathExists=/var/lib/tapshare/updates/apply.json" in units[0].read_text()
    stub_log = (root / "tapshare-deploy-stub.log").read_text()
    assert "enable tapshare-update.path tapshare-update-recover.service" in stub_log
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    v = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert v.returncode == 0, v.stderr


class InstallOnly:
    """tapshare-update.path that runs the applier for ``install`` requests only: a ``switch`` request stays in
    apply.json (the applier is slow to come, or never comes) until the test lets it run (``allow_switch``)."""

    def __init__(self, layout: Path) -> None:
        import threading
        self.unit, self.req = kit.PathUnit(layout), layout / "data" / "updates" / "apply.json"
        self.allow_switch = False
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def action(self) -> str | None:
        try:
            return json.loads(self.req.read_text()).get("action")
        except (OSError, ValueError):
            return None

    def _loop(self) -> None:
        while not self._halt.is_set():
            if self.action() == "install" or (self.allow_switch and self.action() == "switch"):
                self.unit.run_applier("run")
            self._halt.wait(0.05)

    def __enter__(self) -> InstallOnly:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join(60)


def start_command(cloud, session_id: str) -> str:
    import time
    now_ms = int(time.time() * 1000)
    command_id = f"start-{session_id}"
    cloud.commands.append({"command_id": command_id, "kind": "start", "grant": {
        "session_id": session_id, "machine_id": cloud.machine_id, "user_ref": "U1", "price_fen_per_l": 200,
        "credit_limit_fen": 1000, "max_volume_ml": 5000, "max_duration_ms": 3_000, "max_idle_ms": 60_000,
        "deadline_ms": now_ms + 30_000, "min_dispense_ml": 0}})
    return command_id


def acks_for(cloud, command_id: str) -> list[dict]:
    return [body for cid, body in list(cloud.acks) if cid == command_id]


def ledger_session(layout: Path, machine_id: str, session_id: str):
    from kiosk.ledger import Ledger
    ledger = Ledger.open(layout / "data" / "ledger.db", machine_id=machine_id, wall_clock=lambda: 0, new_boot=False)
    try:
        return ledger.session(session_id)
    finally:
        ledger.close()


def test_a_start_that_arrives_between_the_idle_check_and_the_restart_is_refused_and_the_cloud_told(bundles, machine):
    """The race the hold closes: the machine was idle, the switch is asked for, the applier has not restarted the
    service yet, and a customer scans. The start is refused (the cloud voids it and releases the customer's hold),
    the valve never opens, and the switch then lands."""
    cloud, layout = machine
    start_and_wait_online(cloud, layout)
    cloud.offer_bundle(bundles.good, "0.3.0", rollout_id=11)
    with InstallOnly(layout) as unit:
        assert wait_until(lambda: unit.action() == "switch", 900), (cloud.reports, unit.unit.output(),
                                                                    kit.kiosk_log(layout))
        assert wait_until(lambda: cloud.heartbeats[-1]["state"] == "updating", 30), kit.kiosk_log(layout)
        command_id = start_command(cloud, "S-under-hold")
        assert wait_until(lambda: acks_for(cloud, command_id), 30), kit.kiosk_log(layout)
        assert [(a["ok"], a["reason"]) for a in acks_for(cloud, command_id)] == [(False, "updating")]
        assert all(h["state"] != "dispensing" and not h["valve_open"] for h in cloud.heartbeats)
        assert ledger_session(layout, cloud.machine_id, "S-under-hold") is None        # never started here
        unit.allow_switch = True
        assert wait_until(lambda: "healthy" in cloud.steps(), 300), (cloud.reports, unit.unit.output())
    assert cloud.steps("0.3.0") == ["downloading", "downloaded", "verified", "installed", "switched", "healthy"]
    assert current(layout).startswith("releases/0.3.0-")
    assert wait_until(lambda: cloud.heartbeats[-1]["software_version"] == "0.3.0"
                      and cloud.heartbeats[-1]["state"] == "idle", 30)     # the new release boots serving


def test_a_switch_that_never_comes_lifts_the_hold_and_is_tried_again_when_idle(bundles, machine):
    cloud, layout = machine
    kit.start_kiosk(layout, env={"TAPSHARE_UPDATE_HOLD_S": "4"})
    assert wait_until(lambda: "0.2.0" in cloud.versions_heard(), 60), kit.kiosk_log(layout)
    cloud.offer_bundle(bundles.good, "0.3.0", rollout_id=12)
    with InstallOnly(layout) as unit:
        assert wait_until(lambda: unit.action() == "switch", 900), (cloud.reports, unit.unit.output())
        assert wait_until(lambda: cloud.heartbeats[-1]["state"] == "updating", 30), kit.kiosk_log(layout)
        # the applier never comes: the hold lifts, the request is withdrawn, the machine serves
        assert wait_until(lambda: "no_switch" in [r["reason"] for r in cloud.reports], 60), kit.kiosk_log(layout)
        assert wait_until(lambda: cloud.heartbeats[-1]["state"] == "idle", 30)
        assert wait_until(lambda: unit.action() in (None, "switch"), 5)
        command_id = start_command(cloud, "S-after-hold")
        assert wait_until(lambda: acks_for(cloud, command_id), 30), kit.kiosk_log(layout)
        assert acks_for(cloud, command_id)[0]["ok"] is True                          # claimed: it pours
        assert wait_until(lambda: (ledger_session(layout, cloud.machine_id, "S-after-hold") or {}).get("state")
                          == "ended", 60), kit.kiosk_log(layout)
        unit.allow_switch = True                                                     # the applier is back
        assert wait_until(lambda: "healthy" in cloud.steps(), 300), (cloud.reports, unit.unit.output(),
                                                                      kit.kiosk_log(layout))
    assert ledger_session(layout, cloud.machine_id, "S-after-hold")["end_reason"] == "max_duration"
