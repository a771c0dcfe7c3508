"""A machine's update layout in a temporary folder, a stand-in cloud that speaks the update contract, and the
parts of systemd the applier needs (a "restart" that starts main.py from ``current``, the path unit that runs the
applier when apply.json appears).

``python tests/updatekit.py restart LAYOUT`` is the restart command the applier runs here (it plays
``systemctl restart tapshare.service``): it stops the kiosk whose pid is in LAYOUT/kiosk.pid and starts
``current/.venv/bin/python current/main.py`` with the saved arguments. Only the standard library: the applier
runs it with the system python3.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPLIER = ROOT / "scripts" / "apply-update.py"


# ---------------------------------------------------------------- playing systemd

def kiosk_env(layout: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPSHARE_UPDATE_CRASH")}
    env.update(TAPSHARE_APP=str(layout / "opt"), TAPSHARE_UPDATES_DIR=str(layout / "data" / "updates"),
               TAPSHARE_RELEASE_KEYS=str(layout / "etc" / "release-keys"), PYTHONDONTWRITEBYTECODE="1")
    return env


def start_kiosk(layout: Path, env: dict | None = None) -> int:
    """main.py from ``current``, as tapshare.service's ExecStart runs it (with ``env`` added: this start only);
    its pid (also in LAYOUT/kiosk.pid)."""
    current = layout / "opt" / "current"
    n = len(list(layout.glob("kiosk-*.log")))
    with open(layout / f"kiosk-{n}.log", "wb") as log:
        proc = subprocess.Popen([str(current / ".venv" / "bin" / "python"), str(current / "main.py"), "--simulate",
                                 "--headless", "--config", str(layout / "etc" / "config.toml"), "--data-dir",
                                 str(layout / "data"), "--log-level", "DEBUG"],
                                cwd=current, env={**kiosk_env(layout), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
    (layout / "kiosk.pid").write_text(str(proc.pid))
    return proc.pid


def stop_kiosk(layout: Path) -> None:
    try:
        pid = int((layout / "kiosk.pid").read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:           # not our child (started by an earlier restart): poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def restart(layout: Path) -> None:
    stop_kiosk(layout)
    start_kiosk(layout)


def kiosk_log(layout: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:]
                     for p in sorted(layout.glob("kiosk-*.log")))


class PathUnit:
    """tapshare-update.path: runs the applier (as a subprocess, as systemd would) whenever apply.json appears."""

    def __init__(self, layout: Path, health_s: float = 120, crash_at: str = "") -> None:
        self.layout, self.health_s, self.crash_at = layout, health_s, crash_at
        self.runs: list[subprocess.CompletedProcess] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def env(self) -> dict:
        env = kiosk_env(self.layout)
        env.update(TAPSHARE_UPDATE_HEALTH_S=str(self.health_s), TAPSHARE_UPDATE_PYTHON=sys.executable,
                   TAPSHARE_UPDATE_RESTART=f"{sys.executable} {Path(__file__).resolve()} restart {self.layout}",
                   # no systemd here: no automatic restarts to count (the booted root's test has them)
                   TAPSHARE_UPDATE_STATUS="", TAPSHARE_UPDATE_RESET="")
        if self.crash_at:
            env["TAPSHARE_UPDATE_CRASH_AT"] = self.crash_at
        return env

    def run_applier(self, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(["python3", str(APPLIER), *(args or ("run",))], env=self.env(), capture_output=True,
                           text=True, timeout=600)
        self.runs.append(r)
        return r

    def _loop(self) -> None:
        while not self._halt.is_set():
            if (self.layout / "data" / "updates" / "apply.json").exists():
                self.run_applier("run")
            self._halt.wait(0.05)

    def __enter__(self) -> PathUnit:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join(60)

    def output(self) -> str:
        return "\n".join(f"--- rc {r.returncode}\n{r.stderr[-3000:]}" for r in self.runs)


# ---------------------------------------------------------------- the stand-in cloud

class StandInCloud:
    """The device side of the contract, just enough for one machine: time, (empty or queued) command polls,
    acknowledgements, events, heartbeats answered with settings and the current offer, bundles with Range, and
    update reports. Every request but /time must be signed with the machine's secret (checked with
    contract.signing); a report that is not a valid UpdateReportMsg is refused with 422."""

    def __init__(self, machine_id: str, secret: bytes) -> None:
        self.machine_id, self.secret = machine_id, secret
        self.offer: dict | None = None
        self.bundles: dict[str, Path] = {}
        self.reports: list[dict] = []
        self.heartbeats: list[dict] = []
        self.commands: list[dict] = []
        self.acks: list[tuple[str, dict]] = []
        self.range_requests: list[str] = []
        self.cut_download_after: int | None = None        # drop the connection after this many bytes, once
        self.lock = threading.Lock()
        kit = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                kit._handle(self, "GET")

            def do_POST(self) -> None:
                kit._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def steps(self, version: str | None = None) -> list[str]:
        with self.lock:
            return [r["step"] for r in self.reports if version is None or r["version"] == version]

    def versions_heard(self) -> set[str]:
        with self.lock:
            return {h.get("software_version") for h in self.heartbeats}

    @staticmethod
    def _json(h, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        import contract as p
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        now = time.time_ns() // 1_000_000
        if h.path == "/device/v1/time":
            return self._json(h, 200, {"server_time_ms": now})
        try:
            ok = (h.headers[p.HEADER_MACHINE] == self.machine_id and p.verify_signature(
                self.secret, method, h.path, int(h.headers[p.HEADER_TIMESTAMP]), h.headers[p.HEADER_NONCE], body,
                h.headers[p.HEADER_SIGNATURE]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            return self._json(h, 401, {"error": "bad_signature", "message": "not signed by this machine"})
        path = h.path.split("?")[0]
        if path == "/device/v1/commands":
            with self.lock:
                cmds, self.commands = self.commands, []
            if not cmds:
                time.sleep(0.3)
            return self._json(h, 200, {"commands": cmds, "server_time_ms": now})
        if m := re.fullmatch(r"/device/v1/commands/([^/]+)/ack", path):
            self.acks.append((m.group(1), json.loads(body)))
            return self._json(h, 200, {"ok": True, "session_state": "active"})
        if path == "/device/v1/events":
            events = json.loads(body)["events"]
            return self._json(h, 200, {"results": [{"event_id": e["event_id"], "status": "accepted"}
                                                   for e in events], "server_time_ms": now})
        if path == "/device/v1/progress":
            return self._json(h, 200, {"ok": True})
        if path == "/device/v1/heartbeat":
            with self.lock:
                self.heartbeats.append(json.loads(body))
            answer = {"server_time_ms": now, "settings": {"price_fen_per_l": 200, "timezone": "Asia/Shanghai"}}
            if self.offer:
                answer["update"] = self.offer
            return self._json(h, 200, answer)
        if path == "/device/v1/update-report":
            try:
                msg = p.UpdateReportMsg.model_validate_json(body)
            except ValueError as e:
                return self._json(h, 422, {"error": "invalid", "message": str(e)[:200]})
            with self.lock:
                self.reports.append(msg.model_dump())
            return self._json(h, 200, {"ok": True})
        if m := re.fullmatch(r"/device/v1/releases/([0-9.]+)/bundle", path):
            return self._bundle(h, m.group(1))
        return self._json(h, 404, {"error": "not_found", "message": path})

    def _bundle(self, h: BaseHTTPRequestHandler, version: str) -> None:
        src = self.bundles.get(version)
        if src is None:
            return self._json(h, 404, {"error": "not_found", "message": f"no release {version}"})
        size = src.stat().st_size
        start = 0
        rng = h.headers.get("Range")
        if rng:
            self.range_requests.append(rng)
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            if not m or int(m.group(1)) >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start = int(m.group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(size - start))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        cut, self.cut_download_after = self.cut_download_after, None
        with open(src, "rb") as fh:
            fh.seek(start)
            sent = 0
            while chunk := fh.read(1 << 16):
                if cut is not None and sent + len(chunk) > cut:
                    h.wfile.write(chunk[: cut - sent])
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(2)
                    return
                h.wfile.write(chunk)
                sent += len(chunk)

    def offer_bundle(self, path: Path, version: str, rollout_id: int = 1) -> None:
        self.bundles[version] = path
        self.offer = {"rollout_id": rollout_id, "version": version, "url": f"/device/v1/releases/{version}/bundle",
                      "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- layouts and bundles

def checkout_copy(dest: Path) -> Path:
    """This working tree's files (tracked and new, as they are now) in a fresh git checkout at ``dest``."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in names:
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "release"], cwd=dest, check=True)
    return dest


def make_layout(layout: Path, checkout: Path, cloud_url: str, machine_id: str, secret: bytes, keys: list[Path],
                venvs: Path) -> Path:
    """/opt/tapshare, /var/lib/tapshare, /etc/tapshare in ``layout``: release 0.2.0 (a copy of ``checkout``, as
    deploy.sh installs it, on this test run's venv) current and live; the release keys pinned."""
    opt = layout / "opt"
    base = opt / "releases" / "0.2.0-base"
    shutil.copytree(checkout, base, ignore=shutil.ignore_patterns(".git"))
    os.symlink(sys.prefix, base / ".venv")
    (base / ".installed").touch()
    os.symlink("releases/0.2.0-base", opt / "current")
    (opt / "live").write_text("releases/0.2.0-base\nserving\n")
    (opt / "venvs").symlink_to(venvs)                     # shared by the tests: a venv is built once per run
    (layout / "data" / "updates").mkdir(parents=True)
    (layout / "etc" / "release-keys").mkdir(parents=True)
    for k in keys:
        shutil.copy(k, layout / "etc" / "release-keys" / k.name)
    from sync.secret import write_secret
    write_secret(layout / "etc" / "device.secret", secret)
    (layout / "etc" / "config.toml").write_text(
        f'[machine]\nid = "{machine_id}"\n[cloud]\nurl = "{cloud_url}"\nsecret_file = "{layout}/etc/device.secret"\n'
        'heartbeat_interval_ms = 1000\npoll_wait_ms = 1000\n[limits]\nmax_idle_ms = 60000\n'
        '[screen]\nreceipt_display_ms = 1000\n')
    return layout


def rewrite_bundle(src: Path, dst: Path, *, key: Path | None = None, replace: dict[str, bytes] | None = None,
                   manifest_edit=None, sig_edit=None) -> Path:
    """A copy of a bundle with files replaced and/or the manifest changed; re-signed with ``key`` if given (the
    manifest then lists the new files' hashes), else the old signature is kept (what an attacker can do)."""
    from contract import bundle as b
    replace = replace or {}
    with tarfile.open(src, "r:") as tar:
        raw = tar.extractfile("manifest.json").read()
        sig = tar.extractfile("manifest.sig").read()
        manifest = json.loads(raw)
        if key is not None:
            for name, data in replace.items():
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if manifest_edit:
            manifest_edit(manifest)
        if key is not None:
            m = b.ReleaseManifest.model_validate(manifest)
            raw, sig = b.manifest_bytes(m), b.sign_manifest(m, b.load_private_key(key.read_bytes()))
        if sig_edit:
            sig = sig_edit(sig)
        with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
            for member in tar.getmembers():
                data = {"manifest.json": raw, "manifest.sig": sig}.get(member.name, replace.get(member.name))
                if data is None:
                    out.addfile(member, tar.extractfile(member))
                else:
                    info = tarfile.TarInfo(member.name)
                    info.size, info.mode, info.mtime = len(data), 0o644, member.mtime
                    out.addfile(info, io.BytesIO(data))
    return dst


def new_machine() -> tuple[str, bytes]:
    return f"UPD-{secrets.token_hex(3)}", secrets.token_bytes(32)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "restart":
        restart(Path(sys.argv[2]))
    else:
        sys.exit("usage: updatekit.py restart LAYOUT")
