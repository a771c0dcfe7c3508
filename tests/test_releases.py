"""Fleet updates, the cloud's side (issue 22), against a real cloud: bundles built by scripts/make-bundle.py are
uploaded (and refused when signed by an unknown key, re-signed wrongly, tampered with, too large, or a second
version with other bytes), rolled out to chosen machines or a percentage, offered in the heartbeat's answer
only to the machines of an active rollout, downloaded with Range so a download resumes, and the machines'
reports recorded; a rollout stops by itself (alarm, audit) when too many roll back, also when two reports
arrive at once (SQLite and PostgreSQL). Each machine's steps are kept in order of arrival, also those a heartbeat
overtook, repeats as one row, at most HISTORY_ROWS per machine and rollout."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import requests

from cloud import db as t
from cloud.__main__ import create_operator
from cloud.releases.service import HISTORY_ROWS, selected
from tests.test_bundle import checkout, members, write

ROOT = Path(__file__).resolve().parent.parent
MAKE = [sys.executable, str(ROOT / "scripts" / "make-bundle.py")]


def make(tmp: Path, key: Path, version: str, text: str = "print('hello')\n") -> Path:
    work = tmp / f"build-{version}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    work.mkdir()
    out = subprocess.run([*MAKE, "--key", str(key), "--src", str(checkout(work, text)), "--out", str(work / "dist"),
                          "--version", version, "--min-version", "0.2.0", "--host-wheels"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.split()[0])


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Two keys (one trusted by the cloud), and bundles: 0.3.0, 0.3.0 again with other contents, 0.4.0, one signed
    by the untrusted key, one with a file changed after signing, one whose signature is another manifest's."""
    tmp = tmp_path_factory.mktemp("bundles")
    keys = {}
    for name in ("trusted", "stranger"):
        subprocess.run([*MAKE, "--new-key", str(tmp / f"{name}.pem")], check=True, capture_output=True)
        keys[name] = tmp / f"{name}.pem"
    good = make(tmp, keys["trusted"], "0.3.0")
    other = make(tmp, keys["trusted"], "0.3.0", "print('other')\n")
    newer = make(tmp, keys["trusted"], "0.4.0")
    stranger = make(tmp, keys["stranger"], "0.5.0")
    files = members(good)
    tampered = write(tmp / "tampered.bundle", {**files, "app/main.py": b"print('evil')\n"})
    badsig = write(tmp / "badsig.bundle", {**files, "manifest.sig": members(other)["manifest.sig"]})
    return {"pub": tmp / "trusted.pub.pem", "good": good, "other": other, "newer": newer, "stranger": stranger,
            "tampered": tampered, "badsig": badsig}


def trust(cloud, kit) -> None:
    keys = cloud.settings.release_keys_dir
    keys.mkdir(parents=True, exist_ok=True)
    shutil.copy(kit["pub"], keys / "release.pub.pem")


def upload(cloud, path, token: str | None = None, **kw) -> requests.Response:
    data = path.read_bytes() if isinstance(path, Path) else path
    return cloud.op("POST", "/api/v1/operator/releases", token, data=data,
                    headers={"Content-Type": "application/octet-stream", **kw.pop("headers", {})}, **kw)


def rollout(cloud, token: str | None = None, **body) -> requests.Response:
    return cloud.op("POST", "/api/v1/operator/rollouts", token, json=body)


def offer(device, version: str = "0.2.0") -> dict | None:
    r = device.heartbeat(software_version=version)
    assert r.status_code == 200, r.text
    return r.json().get("update")


def report(device, rollout_id: int, step: str, version: str = "0.3.0", **fields) -> requests.Response:
    return device.request("POST", "/device/v1/update-report",
                          {"rollout_id": rollout_id, "version": version, "step": step, **fields})


def steps(cloud, rollout_id: int) -> dict:
    r = cloud.op("GET", f"/api/v1/operator/rollouts/{rollout_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_uploads_are_checked_and_kept(cloud, kit):
    assert upload(cloud, kit["good"]).json()["error"] == "unknown_key"        # no key trusted yet
    trust(cloud, kit)
    viewer = create_operator(cloud.settings.url(), "viewer-rel", "viewer")
    assert upload(cloud, kit["good"], viewer).status_code == 403
    r = upload(cloud, kit["good"])
    assert r.status_code == 200, r.text
    rel = r.json()
    raw = kit["good"].read_bytes()
    assert rel["version"] == "0.3.0" and rel["sha256"] == hashlib.sha256(raw).hexdigest()
    assert rel["size_bytes"] == len(raw) and rel["manifest"]["min_version"] == "0.2.0"
    assert rel["manifest"]["app_files"] >= 2 and "files" not in rel["manifest"]
    kept = cloud.settings.data_dir / "releases" / "0.3.0.bundle"
    assert kept.read_bytes() == raw and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert upload(cloud, kit["good"]).json()["sha256"] == rel["sha256"]       # the very same bytes: fine
    r = upload(cloud, kit["other"])
    assert r.status_code == 409 and r.json()["error"] == "version_exists"
    assert kept.read_bytes() == raw
    for name, code in (("stranger", "unknown_key"), ("tampered", "tampered"), ("badsig", "bad_signature")):
        r = upload(cloud, kit[name])
        assert r.status_code == 422 and r.json()["error"] == code, (name, r.text)
    r = upload(cloud, b"not a tar at all" * 100)
    assert r.status_code == 422 and r.json()["error"] == "malformed"
    assert upload(cloud, b"").json()["error"] == "empty"
    r = cloud.op("POST", "/api/v1/operator/releases", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    # too large: by Content-Length at once, and while streaming a body that does not say its length
    conn = http.client.HTTPConnection(cloud.url.removeprefix("http://"), timeout=10)
    conn.putrequest("POST", "/api/v1/operator/releases")
    for k, v in {"Authorization": f"Bearer {cloud.admin}", "Content-Type": "application/octet-stream",
                 "Content-Length": str(500 * 1024 * 1024)}.items():
        conn.putheader(k, v)
    conn.endheaders(b"x" * 1000)
    assert conn.getresponse().status == 413
    conn.close()
    cloud.app.state.services.releases.max_bytes = 4096
    r = upload(cloud, iter([raw[i:i + 1000] for i in range(0, len(raw), 1000)]))
    assert r.status_code == 413 and r.json()["error"] == "bundle_too_large"
    cloud.app.state.services.releases.max_bytes = 400 * 1024 * 1024
    assert upload(cloud, kit["newer"]).status_code == 200
    assert sorted(os.listdir(cloud.settings.data_dir / "releases")) == ["0.3.0.bundle", "0.4.0.bundle"]
    listed = cloud.op("GET", "/api/v1/operator/releases", viewer).json()
    assert [x["version"] for x in listed["releases"]] == ["0.4.0", "0.3.0"]
    audit = cloud.op("GET", "/api/v1/operator/audit?action=release_upload").json()["entries"]
    assert sorted(e["target"] for e in audit) == ["0.3.0", "0.4.0"]
    # withdrawn: listed as such, no rollout of it
    r = cloud.op("POST", "/api/v1/operator/releases/0.4.0/withdraw")
    assert r.status_code == 200 and r.json()["withdrawn_ms"]
    cloud.provision("M-W")
    assert rollout(cloud, version="0.4.0", machine_ids=["M-W"]).status_code == 409
    assert cloud.op("POST", "/api/v1/operator/releases/9.9.9/withdraw").status_code == 404


@pytest.fixture
def fleet(cloud, kit):
    trust(cloud, kit)
    assert upload(cloud, kit["good"]).status_code == 200
    return cloud, {m: cloud.provision(m) for m in ("M-A", "M-B", "M-C")}


def test_rollout_to_chosen_machines(fleet, kit):
    cloud, dev = fleet
    viewer = create_operator(cloud.settings.url(), "viewer-ro", "viewer")
    assert rollout(cloud, viewer, version="0.3.0", machine_ids=["M-A"]).status_code == 403
    assert rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-NONE"]).json()["error"] == "no_machine"
    assert rollout(cloud, version="0.3.0", machine_ids=["M-A"], percent=5).status_code == 422
    assert rollout(cloud, version="0.3.0").status_code == 422
    assert rollout(cloud, version="0.3.0", percent=0).status_code == 422
    assert rollout(cloud, version="0.9.0", machine_ids=["M-A"]).status_code == 404
    r = rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-B"], max_rollback_pct=50)
    assert r.status_code == 200, r.text
    ro = r.json()
    rid = ro["rollout_id"]
    assert ro["state"] == "active" and ro["counts"]["pending"] == 2 and ro["machine_count"] == 2
    r = rollout(cloud, version="0.3.0", machine_ids=["M-B", "M-C"])
    assert r.status_code == 409 and r.json()["error"] == "machine_in_rollout" and r.json()["machines"] == ["M-B"]
    raw = kit["good"].read_bytes()
    up = offer(dev["M-A"])
    assert up == {"rollout_id": rid, "version": "0.3.0", "url": "/device/v1/releases/0.3.0/bundle",
                  "sha256": hashlib.sha256(raw).hexdigest(), "size_bytes": len(raw)}
    assert offer(dev["M-C"]) is None                                      # not in the rollout
    assert "update" not in dev["M-C"].heartbeat().json()                  # left out, not null
    # refused: offered no more
    assert report(dev["M-B"], rid, "refused", reason="too_old", detail="runs 0.1.0").json() == {"recorded": True}
    assert offer(dev["M-B"]) is None
    # paused: nothing offered or served; resumed: offered again
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/pause", viewer).status_code == 403
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/pause").json()["state"] == "paused"
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/pause").status_code == 409
    assert offer(dev["M-A"]) is None
    assert dev["M-A"].request("GET", up["url"]).status_code == 404
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/resume").json()["state"] == "active"
    assert offer(dev["M-A"])["rollout_id"] == rid
    # the new release's heartbeat: healthy, and nothing more offered
    assert offer(dev["M-A"], "0.3.0") is None
    view = steps(cloud, rid)
    by = {m["machine_id"]: m for m in view["machines"]}
    assert by["M-A"]["step"] == "healthy" and by["M-A"]["heartbeat_version"] == "0.3.0"
    assert by["M-B"]["step"] == "refused" and by["M-B"]["reason"] == "too_old"
    assert view["counts"]["healthy"] == 1 and view["counts"]["refused"] == 1 and view["state"] == "active"
    listed = cloud.op("GET", "/api/v1/operator/rollouts", viewer).json()["rollouts"]
    assert [x["rollout_id"] for x in listed] == [rid] and listed[0]["counts"]["refused"] == 1
    # stopped: M-B and M-C may be in a new one
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/stop").json()["state"] == "stopped"
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/resume").status_code == 409
    assert rollout(cloud, version="0.3.0", machine_ids=["M-B", "M-C"]).status_code == 200
    actions = [e["action"] for e in cloud.op("GET", "/api/v1/operator/audit?target=" + str(rid)).json()["entries"]]
    assert sorted(actions) == ["rollout_create", "rollout_pause", "rollout_resume", "rollout_stop"]


def test_rollout_to_a_percentage(cloud, kit):
    trust(cloud, kit)
    assert upload(cloud, kit["good"]).status_code == 200
    dev = {f"M-{i:02d}": cloud.provision(f"M-{i:02d}") for i in range(20)}
    r = rollout(cloud, version="0.3.0", percent=40)
    assert r.status_code == 200, r.text
    ro = r.json()
    chosen = {m for m in dev if selected(ro["rollout_id"], m, 40)}
    assert 0 < len(chosen) < 20 and ro["machine_count"] == len(chosen) and ro["percent"] == 40
    assert {m["machine_id"] for m in steps(cloud, ro["rollout_id"])["machines"]} == chosen
    assert {m for m, d in dev.items() if offer(d) is not None} == chosen
    # the rest may take another; a machine already in one may not
    rest = sorted(set(dev) - chosen)
    assert rollout(cloud, version="0.3.0", machine_ids=rest).status_code == 200
    assert rollout(cloud, version="0.3.0", percent=100).status_code == 409


def test_download_resumes_with_range(fleet, kit):
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A"]).json()["rollout_id"]
    up = offer(dev["M-A"])
    first = dev["M-A"].request("GET", up["url"], headers={"Range": "bytes=0-4095"})
    assert first.status_code == 206 and len(first.content) == 4096
    assert first.headers["Content-Range"] == f"bytes 0-4095/{up['size_bytes']}"
    rest = dev["M-A"].request("GET", up["url"], headers={"Range": "bytes=4096-"})
    assert rest.status_code == 206 and int(rest.headers["Content-Length"]) == up["size_bytes"] - 4096
    assert hashlib.sha256(first.content + rest.content).hexdigest() == up["sha256"]
    whole = dev["M-A"].request("GET", up["url"])
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == up["sha256"]
    for bad in (f"bytes={up['size_bytes']}-", "bytes=-5", "pages=1-"):
        r = dev["M-A"].request("GET", up["url"], headers={"Range": bad})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{up['size_bytes']}", bad
    assert dev["M-B"].request("GET", up["url"]).status_code == 404          # not offered to it
    assert dev["M-A"].request("GET", "/device/v1/releases/0.4.0/bundle").status_code == 404
    assert requests.get(cloud.url + up["url"], timeout=10).status_code == 401     # unsigned
    assert report(dev["M-A"], rid, "downloaded").json()["recorded"]
    cloud.op("POST", "/api/v1/operator/releases/0.3.0/withdraw")
    assert dev["M-A"].request("GET", up["url"]).status_code == 404
    assert steps(cloud, rid)["state"] == "stopped" and offer(dev["M-A"]) is None


def test_a_pause_lets_a_machine_finish_the_download_it_began(fleet, kit):
    """A pause stops new offers; a machine whose download broke off resumes it (a refusal would make its updater
    report ``failed``, which counts against the rollout). One that never began gets nothing; after a stop, none."""
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-B"]).json()["rollout_id"]
    up = offer(dev["M-A"])
    assert offer(dev["M-B"]) == up
    first = dev["M-A"].request("GET", up["url"], headers={"Range": "bytes=0-4095"})
    assert first.status_code == 206
    assert report(dev["M-A"], rid, "downloading").json()["recorded"]
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/pause").json()["state"] == "paused"
    rest = dev["M-A"].request("GET", up["url"], headers={"Range": "bytes=4096-"})
    assert rest.status_code == 206, rest.text
    assert hashlib.sha256(first.content + rest.content).hexdigest() == up["sha256"]
    assert dev["M-B"].request("GET", up["url"]).status_code == 404                 # it had not begun
    assert offer(dev["M-A"]) is None and offer(dev["M-B"]) is None                 # nothing new offered
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{rid}/stop").json()["state"] == "stopped"
    assert dev["M-A"].request("GET", up["url"], headers={"Range": "bytes=4096-"}).status_code == 404


def test_reports_are_recorded(fleet):
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-B"]).json()["rollout_id"]
    assert report(dev["M-A"], rid + 1, "downloaded").json() == {"recorded": False}      # another rollout
    assert report(dev["M-C"], rid, "downloaded").json() == {"recorded": False}          # not in it
    assert report(dev["M-A"], rid, "downloaded", "0.4.0").json() == {"recorded": False}  # another version
    assert report(dev["M-A"], rid, "warp").status_code == 422
    for step in ("downloading", "downloaded", "verified", "installed", "deferred", "switched"):
        assert report(dev["M-A"], rid, step, detail=f"now {step}").json() == {"recorded": True}
        assert steps(cloud, rid)["machines"][0]["step"] == step
    assert report(dev["M-A"], rid, "healthy", running_version="0.3.0").json()["recorded"]
    assert report(dev["M-A"], rid, "switched").json() == {"recorded": False}     # a late copy of an earlier step
    m = steps(cloud, rid)["machines"][0]
    assert m["step"] == "healthy" and m["running_version"] == "0.3.0"
    assert steps(cloud, rid)["state"] == "active"                                # M-B is not there yet
    report(dev["M-B"], rid, "switched")
    assert offer(dev["M-B"], "0.3.0") is None                                    # its new release's heartbeat
    view = steps(cloud, rid)
    assert view["state"] == "done" and view["counts"]["healthy"] == 2
    assert rollout(cloud, version="0.3.0", machine_ids=["M-A"]).status_code == 200     # done: no longer covers


def history(cloud, rollout_id: int, machine_id: str, token: str | None = None) -> dict:
    r = cloud.op("GET", f"/api/v1/operator/rollouts/{rollout_id}/machines/{machine_id}/steps", token)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_report_the_heartbeat_overtook_is_kept_without_moving_the_step(fleet):
    """The heartbeat of the new release marks the machine healthy before its queued ``switched`` report arrives:
    the current step stays healthy, and the history has both in the order they arrived, the machine's own rows
    in its own order (it sends them one at a time), the late ones marked as not applied, with their detail."""
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-B"]).json()["rollout_id"]
    mine = ["downloading", "downloaded", "verified", "installed", "deferred"]
    for step in mine:
        assert report(dev["M-A"], rid, step, detail=f"步骤 {step}").json() == {"recorded": True}
    assert offer(dev["M-A"], "0.3.0") is None                                   # back, running 0.3.0: healthy
    late = "已于 14:02 切换到新版本，旧版本保留在 previous 以便回滚"
    assert report(dev["M-A"], rid, "switched", detail=late, running_version="0.2.0").json() == {"recorded": False}
    assert report(dev["M-A"], rid, "healthy", running_version="0.3.0").json() == {"recorded": False}
    assert offer(dev["M-A"], "0.3.0") is None                                   # no step: not in the history
    m = {x["machine_id"]: x for x in steps(cloud, rid)["machines"]}["M-A"]
    assert m["step"] == "healthy" and m["reason"] == "heartbeat"
    h = history(cloud, rid, "M-A", create_operator(cloud.settings.url(), "viewer-steps", "viewer"))
    assert h["step"] == "healthy" and h["max_rows"] == HISTORY_ROWS and h["version"] == "0.3.0"
    rows = h["steps"]
    assert [(x["step"], x["source"], x["applied"]) for x in rows] == [
        ("pending", "cloud", True), *[(s, "machine", True) for s in mine], ("healthy", "heartbeat", True),
        ("switched", "machine", False), ("healthy", "machine", False)]
    assert [x["step"] for x in rows if x["source"] == "machine"] == [*mine, "switched", "healthy"]
    assert rows[-2]["detail"] == late and rows[-2]["running_version"] == "0.2.0"
    assert rows[6]["reason"] == "heartbeat" and rows[6]["running_version"] == "0.3.0"
    assert [x["step_id"] for x in rows] == sorted(x["step_id"] for x in rows)
    assert [x["at_ms"] for x in rows] == sorted(x["at_ms"] for x in rows)
    # after healthy, a rollback still moves the step (today's rule), and is in the history after the rest
    why = "重启后 120 秒内没有心跳"
    assert report(dev["M-A"], rid, "rolled_back", reason="unhealthy", detail=why).json()["recorded"]
    rows = history(cloud, rid, "M-A")["steps"]
    assert (rows[-1]["step"], rows[-1]["applied"], rows[-1]["detail"]) == ("rolled_back", True, why)
    # a report of another version is kept, not applied; the other machine's history is its own
    assert report(dev["M-B"], rid, "downloading", "0.4.0").json() == {"recorded": False}
    rows = history(cloud, rid, "M-B")["steps"]
    assert [(x["step"], x["version"], x["applied"]) for x in rows] == [("pending", "0.3.0", True),
                                                                      ("downloading", "0.4.0", False)]


def test_repeats_are_one_row_and_the_history_is_capped(fleet):
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-B"]).json()["rollout_id"]
    report(dev["M-A"], rid, "downloaded")
    for i in range(12):                                   # busy for a long time: one row
        assert report(dev["M-A"], rid, "deferred", reason="busy", detail=f"正在出水（第 {i} 次）").json()["recorded"]
    rows = history(cloud, rid, "M-A")["steps"]
    assert [(x["step"], x["repeats"]) for x in rows] == [("pending", 1), ("downloaded", 1), ("deferred", 12)]
    d = rows[-1]
    assert d["detail"] == "正在出水（第 11 次）" and d["last_at_ms"] >= d["at_ms"]
    report(dev["M-A"], rid, "deferred", reason="maintenance")             # another reason: a row of its own
    assert [x["reason"] for x in history(cloud, rid, "M-A")["steps"]][-2:] == ["busy", "maintenance"]
    # steps that alternate are rows each, and only the newest HISTORY_ROWS are kept
    sent = []
    for i in range(HISTORY_ROWS + 4):
        step = ("downloading", "downloaded")[i % 2]
        assert report(dev["M-A"], rid, step, detail=f"#{i}").json()["recorded"]
        sent.append((step, f"#{i}"))
    rows = history(cloud, rid, "M-A")["steps"]
    assert len(rows) == HISTORY_ROWS and [(x["step"], x["detail"]) for x in rows] == sent[-HISTORY_ROWS:]
    assert [x["step"] for x in history(cloud, rid, "M-B")["steps"]] == ["pending"]


def test_the_steps_of_a_rollout_that_ended_long_ago_are_deleted_and_its_outcomes_kept(fleet):
    """Step rows are capped per machine and rollout, but rollouts go on for years: a rollout's steps go
    ``update_history_days`` after it ended (the minute prune); an open one's, and each machine's outcome, stay."""
    from cloud.app import _prune
    cloud, dev = fleet
    svc = cloud.app.state.services
    old = rollout(cloud, version="0.3.0", machine_ids=["M-A"]).json()["rollout_id"]
    report(dev["M-A"], old, "downloaded")
    assert cloud.op("POST", f"/api/v1/operator/rollouts/{old}/stop").status_code == 200
    live = rollout(cloud, version="0.3.0", machine_ids=["M-B"]).json()["rollout_id"]
    report(dev["M-B"], live, "downloaded")
    keep_ms = svc.settings.update_history_days * 86_400_000
    _prune(svc)                                            # ended just now: kept
    assert [x["step"] for x in history(cloud, old, "M-A")["steps"]] == ["pending", "downloaded"]
    with svc.database.tx() as conn:                        # as if it had ended a day more than that ago
        conn.execute(t.rollouts.update().where(t.rollouts.c.rollout_id == old).values(
            updated_ms=svc.now() - keep_ms - 86_400_000))
    _prune(svc)
    gone = history(cloud, old, "M-A")
    assert gone["steps"] == [] and gone["step"] == "downloaded"          # the outcome stays
    assert [x["step"] for x in history(cloud, live, "M-B")["steps"]] == ["pending", "downloaded"]


def test_a_machines_history_is_only_for_a_rollout_it_is_in(fleet):
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A"]).json()["rollout_id"]
    base = "/api/v1/operator/rollouts"
    r = cloud.op("GET", f"{base}/{rid + 1}/machines/M-A/steps")
    assert r.status_code == 404 and r.json()["error"] == "no_rollout" and str(rid + 1) in r.json()["message"]
    r = cloud.op("GET", f"{base}/{rid}/machines/M-C/steps")
    assert r.status_code == 404 and r.json()["error"] == "no_machine" and "M-C" in r.json()["message"]
    assert cloud.op("GET", f"{base}/{rid}/machines/M-NONE/steps").json()["error"] == "no_machine"
    assert cloud.op("GET", f"{base}/0/machines/M-A/steps").status_code == 422
    assert cloud.op("GET", f"{base}/{rid}/machines/{'M' * 65}/steps").status_code == 422
    assert requests.get(cloud.url + f"{base}/{rid}/machines/M-A/steps", timeout=10).status_code == 401
    assert report(dev["M-C"], rid, "downloading").json() == {"recorded": False}     # not in it: nowhere
    assert cloud.op("GET", f"{base}/{rid}/machines/M-C/steps").status_code == 404


def test_rollbacks_stop_a_rollout(fleet):
    cloud, dev = fleet
    rid = rollout(cloud, version="0.3.0", machine_ids=["M-A", "M-B", "M-C"], max_rollback_pct=40).json()["rollout_id"]
    report(dev["M-A"], rid, "switched")
    report(dev["M-A"], rid, "healthy")
    report(dev["M-B"], rid, "switched")
    assert steps(cloud, rid)["state"] == "active"
    report(dev["M-B"], rid, "rolled_back", reason="unhealthy", detail="no heartbeat in 120 s")   # 1 of 2: 50 %
    view = steps(cloud, rid)
    assert view["state"] == "stopped" and "1 of 2" in view["stop_reason"]
    assert offer(dev["M-C"]) is None
    cases = cloud.op("GET", "/api/v1/operator/alarm-cases?state=active&rule=rollout").json()["alarms"]
    assert len(cases) == 1 and cases[0]["detail"]["rollout_id"] == rid and cases[0]["detail"]["rolled_back"] == 1
    audit = cloud.op("GET", "/api/v1/operator/audit?action=rollout_auto_stop").json()["entries"]
    assert [e["target"] for e in audit] == [str(rid)]


def test_two_rollbacks_at_once_are_both_counted(cloud, kit):
    """Each alone stays under the limit (1 of 3); together they pass it (2 of 4): the second report must see the
    first, at whichever instance and whatever the database."""
    trust(cloud, kit)
    assert upload(cloud, kit["good"]).status_code == 200
    for round_ in range(3):
        names = [f"M-{round_}-{i}" for i in range(4)]
        dev = {m: cloud.provision(m) for m in names}
        rid = rollout(cloud, version="0.3.0", machine_ids=names, max_rollback_pct=40).json()["rollout_id"]
        for m in names[:2]:
            report(dev[m], rid, "healthy")
        barrier, answers = threading.Barrier(2), []

        def roll_back(device, rid: int, barrier: threading.Barrier, answers: list) -> None:
            barrier.wait()
            answers.append(report(device, rid, "rolled_back").status_code)

        threads = [threading.Thread(target=roll_back, args=(dev[m], rid, barrier, answers)) for m in names[2:]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert answers == [200, 200]
        view = steps(cloud, rid)
        assert view["counts"]["rolled_back"] == 2 and view["state"] == "stopped", view["stop_reason"]


def test_tar_helpers_make_what_they_say(kit):
    """The refused bundles differ from the good one only where they should (else the refusals prove nothing)."""
    good, tampered = members(kit["good"]), members(kit["tampered"])
    assert set(good) == set(tampered) and good["app/main.py"] != tampered["app/main.py"]
    assert json.loads(members(kit["badsig"])["manifest.sig"])["key_id"] == json.loads(good["manifest.sig"])["key_id"]
    with tarfile.open(fileobj=io.BytesIO(kit["badsig"].read_bytes())) as tar:
        assert tar.extractfile("manifest.json").read() == good["manifest.json"]
