"""The kiosk's side of fleet updates: it runs unprivileged, so it fetches, checks and asks; root installs.

A release offered in the heartbeat's answer (:class:`contract.UpdateOfferMsg`) goes through:

1. **download** to ``<updates>/<version>.part`` with resume (Range), never past the offer's ``size_bytes``;
   the whole file's sha256 must be the offer's (else it is deleted: ``failed``, ``sha256_mismatch``);
2. **verify**: the bundle's signature by a key pinned in ``/etc/tapshare/release-keys`` (root's, written by
   deploy.sh only), every file's hash, the device type and anti-rollback (never at or below the highest version
   this machine ever installed: ``/opt/tapshare/state/installed.json``, which only root writes). A refusal is
   reported with its code and this offer is never tried again;
3. **install**: ``apply.json`` asks root's applier (scripts/apply-update.py, started by a systemd path unit) to
   verify it again, unpack it beside the running release and build its venv, all while the machine serves;
4. **switch** only when idle: the core thread is asked for an update's hold (:meth:`kiosk.runtime.Runtime.
   begin_update`), which it grants only with no session, the valve closed and no technician, and from that same
   step refuses every start (the cloud is told at once and releases the customer's hold). Only then does a second
   ``apply.json`` make the applier switch and restart the service; while busy, ``deferred`` is reported once.
   If the applier refuses or fails the switch the hold ends at once; if no restart comes within the hold
   (``TAPSHARE_UPDATE_HOLD_S``, 180 s) the core lifts it by itself, the request is withdrawn and the switch is
   tried again when idle, ``RETRY_HOLDS`` holds later (an applier that never comes must not keep the machine
   held). The new release writes ``healthy-<version>`` after the cloud accepted its first
   heartbeat; without it the applier switches back.

Every step is reported (``POST /device/v1/update-report``), from a queue kept on disk and retried until the
cloud accepts each report, so a restart (which an update always is) loses none. What the applier did (installed,
switched, rolled back, refused, failed) it records in ``state/events.json``, which whichever release runs next
reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import contract as p
from contract import bundle as b
from kiosk.events import UPDATE_HOLD_MS
from kiosk.runtime import Runtime
from sync.client import AuthProblem, CloudClient, Rejected, SyncError, TooLarge, Transient

log = logging.getLogger("tapshare.update")

TERMINAL = ("refused", "failed", "rolled_back")
RETRY_HOLDS = 5          # after a switch that never came, serve this many holds' time before holding again


def default_paths(data_dir: Path) -> dict[str, Path]:
    """Where the updater works (``<data_dir>/updates``, which the applier's path unit watches) and what it reads
    (each configurable by environment, for tests)."""
    env = os.environ.get
    return {"updates": Path(env("TAPSHARE_UPDATES_DIR", str(data_dir / "updates"))),
            "app": Path(env("TAPSHARE_APP", "/opt/tapshare")),
            "keys": Path(env("TAPSHARE_RELEASE_KEYS", "/etc/tapshare/release-keys")),
            "hold_ms": int(float(env("TAPSHARE_UPDATE_HOLD_S", str(UPDATE_HOLD_MS / 1000))) * 1000)}


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Updater:
    def __init__(self, runtime: Runtime, client: CloudClient, *, running_version: str, updates: Path, app: Path,
                 keys: Path, device_type: str = b.DEVICE_TYPE, interval_s: float = 0.5,
                 hold_ms: int = UPDATE_HOLD_MS) -> None:
        self.rt, self.client, self.running = runtime, client, running_version
        self.updates, self.app, self.keys, self.device_type = updates, app, keys, device_type
        self.interval_s, self.hold_ms = interval_s, hold_ms
        self._offer: p.UpdateOfferMsg | None = None
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._healthy_written = False
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)

    # ------------------------------------------------------------------ called by the heartbeat thread
    def offer(self, update: p.UpdateOfferMsg | None) -> None:
        if update != self._offer:
            self._offer = update
            self._wake.set()

    def heartbeat_accepted(self) -> None:
        """The cloud accepted a heartbeat with our version: if we are a release on trial, say we are healthy."""
        if self._healthy_written:
            return
        self._healthy_written = True
        trial = _read_json(self.app / "state" / "trial.json", None)
        if not isinstance(trial, dict) or trial.get("version") != self.running:
            return
        (self.updates / f"healthy-{self.running}").touch()
        log.warning("release %s reached the cloud: healthy", self.running)
        self._queue_report(int(trial.get("rollout_id") or 0), self.running, "healthy")
        self._wake.set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.updates.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._halt.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self._collect_applier_events()
                self._send_reports()
                self._work()
            except Exception:
                log.exception("updater step failed; trying again")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    # ------------------------------------------------------------------ reports (kept on disk until accepted)
    def _queue_report(self, rollout_id: int, version: str, step: str, reason: str = "", detail: str = "") -> None:
        if rollout_id < 1:
            return
        with self._lock:
            queue = _read_json(self.updates / "reports.json", [])
            queue.append({"rollout_id": rollout_id, "version": version, "step": step, "reason": reason[:40],
                          "detail": detail[:500], "running_version": self.running})
            _write_json(self.updates / "reports.json", queue)
        log.info("update %s: %s %s %s", version, step, reason, detail)

    def _send_reports(self) -> None:
        if not self.client.time_synced:
            return
        while not self._halt.is_set():
            with self._lock:
                queue = _read_json(self.updates / "reports.json", [])
            if not queue:
                return
            try:
                self.client.update_report(p.UpdateReportMsg(**queue[0]))
            except Rejected as e:
                log.error("the cloud refuses the update report %s: %s (dropped)", queue[0], e)
            except (AuthProblem, Transient, SyncError) as e:
                log.info("update report not sent: %s", e)
                return
            with self._lock:
                queue = _read_json(self.updates / "reports.json", [])
                _write_json(self.updates / "reports.json", queue[1:])

    def _collect_applier_events(self) -> None:
        events = _read_json(self.app / "state" / "events.json", {}).get("events", [])
        seen = _read_json(self.updates / "seen.json", {"seq": 0})
        new = [e for e in events if isinstance(e, dict) and int(e.get("seq", 0)) > seen["seq"]]
        for e in new:
            self._queue_report(int(e.get("rollout_id") or 0), str(e["version"]), str(e["step"]),
                               str(e.get("reason", "")), str(e.get("detail", "")))
            if e["step"] in TERMINAL:
                self.rt.end_update(str(e["version"]), f"{e['step']}:{e.get('reason', '')}"[:60])   # serve again
                self._finish(int(e.get("rollout_id") or 0), str(e["version"]))
            elif e["step"] == "deferred":      # the applier left a stale switch undone: serve, ask again when idle
                self.rt.end_update(str(e["version"]), f"deferred:{e.get('reason', '')}"[:60])
            elif e["step"] == "installed":
                state = self._state()
                if state.get("version") == e["version"] and state.get("phase") == "installing":
                    self._set_state(phase="installed")
        if new:
            _write_json(self.updates / "seen.json", {"seq": max(int(e["seq"]) for e in new)})

    # ------------------------------------------------------------------ the offer's progress (on disk)
    def _state(self) -> dict:
        return _read_json(self.updates / "offer.json", {})

    def _set_state(self, **fields) -> dict:
        state = {**self._state(), **fields}
        _write_json(self.updates / "offer.json", state)
        return state

    def _finished(self) -> set[str]:
        return set(_read_json(self.updates / "finished.json", []))

    def _finish(self, rollout_id: int, version: str) -> None:
        """This offer is over (refused, failed, rolled back or done): never tried again, its files gone."""
        done = self._finished() | {f"{rollout_id}:{version}"}
        _write_json(self.updates / "finished.json", sorted(done)[-100:])
        if self._state().get("version") == version:
            (self.updates / "offer.json").unlink(missing_ok=True)
        for f in (self.updates / f"{version}.part", self.updates / f"{version}.bundle"):
            f.unlink(missing_ok=True)

    def _refuse(self, o: p.UpdateOfferMsg, step: str, code: str, message: str) -> None:
        log.error("update %s %s: %s (%s)", o.version, step, message, code)
        self._queue_report(o.rollout_id, o.version, step, code, message)
        self._finish(o.rollout_id, o.version)

    def _work(self) -> None:
        state = self._state()
        if state.get("version") == self.running:           # we are the release that offer installed
            if state.get("phase") == "switching":
                self._finish(int(state["rollout_id"]), self.running)
            return
        o = self._offer
        if o is None or o.version == self.running or f"{o.rollout_id}:{o.version}" in self._finished():
            return
        if state.get("version") != o.version or state.get("sha256") != o.sha256:
            state = self._begin(o)
            if state is None:
                return
        phase = state["phase"]
        if phase == "downloading":
            self._download(o)
        elif phase == "downloaded":
            self._verify(o)
        elif phase == "installed":
            self._switch_when_idle(o, state)
        elif phase == "switching":
            self._watch_switch(o, state)

    def _begin(self, o: p.UpdateOfferMsg) -> dict | None:
        for f in self.updates.glob("*.part"):
            f.unlink()
        for f in self.updates.glob("*.bundle"):
            f.unlink()
        if not list(self.keys.glob("*.pub.pem")):
            self._refuse(o, "refused", "unknown_key", f"no release key is pinned in {self.keys}")
            return None
        try:
            b.check_applicable(b.ReleaseManifest(format=1, version=o.version, min_version="0.0.0",
                                                 device_types=[self.device_type], created_ms=0,
                                                 files={"app/x": b.FileEntry(sha256="0" * 64, size=0)}),
                               self.device_type, self.running, self.highest_installed())
        except b.BundleRefused as e:                     # a downgrade is refused before a byte is downloaded
            self._refuse(o, "refused", e.code, e.message)
            return None
        self._queue_report(o.rollout_id, o.version, "downloading")
        return self._set_state(rollout_id=o.rollout_id, version=o.version, sha256=o.sha256, phase="downloading",
                               deferred=False)

    def highest_installed(self) -> str:
        found = str(_read_json(self.app / "state" / "installed.json", {}).get("highest", "0.0.0"))
        return max([found, self.running], key=b.parse_version)

    def _download(self, o: p.UpdateOfferMsg) -> None:
        part = self.updates / f"{o.version}.part"
        try:
            self.client.download(o.url, part, max_bytes=o.size_bytes)
        except TooLarge as e:
            part.unlink(missing_ok=True)
            self._refuse(o, "failed", "too_large", str(e))
            return
        except Rejected as e:
            self._refuse(o, "failed", "download_refused", str(e))
            return
        except SyncError as e:
            log.info("update %s: download interrupted (%s); resuming later", o.version, e)
            return
        if part.stat().st_size != o.size_bytes:
            log.info("update %s: %d of %d bytes; resuming", o.version, part.stat().st_size, o.size_bytes)
            return
        h = hashlib.sha256()
        with open(part, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != o.sha256:
            part.unlink()
            self._refuse(o, "failed", "sha256_mismatch", "the downloaded file is not the one offered (sha256)")
            return
        os.replace(part, self.updates / f"{o.version}.bundle")
        self._queue_report(o.rollout_id, o.version, "downloaded")
        self._set_state(phase="downloaded")
        self._wake.set()

    def _verify(self, o: p.UpdateOfferMsg) -> None:
        path = self.updates / f"{o.version}.bundle"
        try:
            keys = [b.load_public_key(k.read_bytes()) for k in sorted(self.keys.glob("*.pub.pem"))]
            with open(path, "rb") as fh:
                manifest = b.verify_bundle(fh, keys)
            if manifest.version != o.version:
                raise b.BundleRefused("malformed", f"the bundle is release {manifest.version}, not {o.version}")
            b.check_applicable(manifest, self.device_type, self.running, self.highest_installed())
        except b.BundleRefused as e:
            self._refuse(o, "refused", e.code, e.message)
            return
        self._queue_report(o.rollout_id, o.version, "verified")
        self._set_state(phase="installing")
        self._request("install", o, path)

    def _request(self, action: str, o: p.UpdateOfferMsg, path: Path, **extra) -> None:
        _write_json(self.updates / "apply.json", {"action": action, "version": o.version, "bundle": str(path),
                                                  "sha256": o.sha256, "rollout_id": o.rollout_id, **extra})

    def _switch_when_idle(self, o: p.UpdateOfferMsg, state: dict) -> None:
        """Ask the core for the hold (idle check and refusal of new starts in one step on the core thread), and
        only once it holds ask root for the switch, which restarts the service."""
        if self.rt.clock.wall_ms() < int(state.get("retry_at_ms", 0)):
            return
        why = self.rt.begin_update(o.version, hold_ms=self.hold_ms)
        if why:
            if not state.get("deferred"):
                self._queue_report(o.rollout_id, o.version, "deferred", "busy", why)
                self._set_state(deferred=True)
            return
        now_ms = self.rt.clock.wall_ms()
        self._set_state(phase="switching")
        log.warning("update %s: idle and holding (no new starts), asking for the switch", o.version)
        # the applier must not begin a switch so late that the restart could come after the hold has lifted
        self._request("switch", o, self.updates / f"{o.version}.bundle", not_after_ms=now_ms + self.hold_ms // 2)

    def _watch_switch(self, o: p.UpdateOfferMsg, state: dict) -> None:
        """The switch was asked for and the machine holds; a restart ends this process. If the hold is gone (the
        core lifted it at its deadline: the applier never acted) withdraw the request and try again when idle."""
        if self.rt.snapshot.updating_version == o.version:
            return
        req = _read_json(self.updates / "apply.json", None)
        if isinstance(req, dict) and req.get("action") == "switch" and req.get("version") == o.version:
            (self.updates / "apply.json").unlink(missing_ok=True)
        log.error("update %s: no restart within the hold; serving again, the switch is tried again when idle",
                  o.version)
        if not state.get("no_switch_reported"):
            self._queue_report(o.rollout_id, o.version, "deferred", "no_switch",
                               f"the switch did not happen within {self.hold_ms // 1000} s; tried again when idle")
        self._set_state(phase="installed", deferred=False, no_switch_reported=True,
                        retry_at_ms=self.rt.clock.wall_ms() + RETRY_HOLDS * self.hold_ms)
