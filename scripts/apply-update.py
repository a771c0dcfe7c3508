#!/usr/bin/python3
"""Install and switch to a release the kiosk downloaded (run as root by systemd; deploy.sh installs this file as
/usr/local/lib/tapshare/apply-update.py, outside every release, so no update can replace the code that decides
whether to trust an update).

    apply-update.py run              do what <updates>/apply.json asks (tapshare-update.path starts this)
    apply-update.py recover [--boot] finish or undo what power loss interrupted (at boot: before tapshare.service)

The kiosk (unprivileged) downloads and checks a bundle and then asks, by writing ``apply.json``:

* ``{"action": "install", ...}``: copy the bundle somewhere only root writes, verify it AGAIN (signature by a key
  pinned in /etc/tapshare/release-keys, every file's hash, device type, anti-rollback: nothing the kiosk says is
  trusted), unpack only the manifest's files into ``releases/.<dir>.partial``, install the venv offline from the
  bundled wheelhouse (or reuse the one for the same lock), write ``VERSION``, mark ``.installed``, rename to
  ``releases/<version>-<sha8>``. Slow (minutes for a new venv on a Pi), so it runs while the machine serves.
* ``{"action": "switch", ...}``: sent by the kiosk only when idle, once its core holds the machine (refuses every
  start) until the restart: a request found after its ``not_after_ms`` (wall clock) is left undone (``deferred``,
  ``stale``: the hold may have lifted and a customer may be pouring). Else journal the trial (``state/trial.json``:
  from, to, deadline), point ``current`` at the new release (symlink + rename), restart the service, and wait
  ``TAPSHARE_UPDATE_HEALTH_S`` (120) seconds for the new release to write ``<updates>/healthy-<version>`` (after
  the cloud accepted a heartbeat with that version). Without it: switch back, restart, record ``rolled_back``.

Each outcome is appended to ``state/events.json``, which the kiosk running afterwards reports to the cloud.
Crash safety: ``current`` only ever changes by an atomic rename to a complete (``.installed``) release; a trial
journal without a ``healthy`` file is rolled back by ``recover``; a ``.partial`` release dir is deleted; the
highest installed version (anti-rollback) is raised only once a release proved healthy.

Needs only python3 and python3-cryptography (apt): no venv, no import from a release.
Paths (for tests): TAPSHARE_APP (/opt/tapshare), TAPSHARE_UPDATES_DIR (/var/lib/tapshare/updates),
TAPSHARE_RELEASE_KEYS (/etc/tapshare/release-keys), TAPSHARE_UPDATE_RESTART (the command that restarts the
service), TAPSHARE_UPDATE_PYTHON (the Python the venv is made for: python3).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DEVICE_TYPE = "tapshare-pi"
BUNDLE_FORMAT = 1
MAX_FILES = 20_000
VERSION_RE = re.compile(r"^\d{1,6}(?:\.\d{1,6}){1,3}$")
SAFE_PATH = re.compile(r"^(?:app|wheels)/(?:[A-Za-z0-9_.+@=-]+/)*[A-Za-z0-9_.+@=-]+$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_EVENTS = 200

APP = Path(os.environ.get("TAPSHARE_APP", "/opt/tapshare"))
UPDATES = Path(os.environ.get("TAPSHARE_UPDATES_DIR", "/var/lib/tapshare/updates"))
KEYS = Path(os.environ.get("TAPSHARE_RELEASE_KEYS", "/etc/tapshare/release-keys"))
STATE = APP / "state"                 # root's: the trial journal, events, the highest installed version
HEALTH_S = float(os.environ.get("TAPSHARE_UPDATE_HEALTH_S", "120"))
RESTART = shlex.split(os.environ.get("TAPSHARE_UPDATE_RESTART", "systemctl restart tapshare.service"))
PYTHON = os.environ.get("TAPSHARE_UPDATE_PYTHON", "python3")
CRASH_AT = os.environ.get("TAPSHARE_UPDATE_CRASH_AT", "")   # tests: SIGKILL ourselves at this step
# How the service is asked about during a trial ("" for none): its automatic restarts since the switch and whether
# systemd gave up on it. A release that keeps crashing is rolled back at once, not after HEALTH_S, and before
# systemd's start limit (5 in 10 min) fails the unit and tapshare-escalate reboots the Pi for it.
STATUS = shlex.split(os.environ.get("TAPSHARE_UPDATE_STATUS",
                                    "systemctl show tapshare.service -p NRestarts -p ActiveState"))
RESET = shlex.split(os.environ.get("TAPSHARE_UPDATE_RESET", "systemctl reset-failed tapshare.service"))
TRIAL_RESTARTS = int(os.environ.get("TAPSHARE_UPDATE_TRIAL_RESTARTS", "2"))   # crashes of a new release: enough
# Disk: an install needs the bundle's copy, the unpacked files and (for a new lock) a venv of about VENV_FACTOR
# times its wheels, and leaves RESERVE free for the ledger and the journal; releases other than the live, the
# previous and the one on trial are pruned first.
RESERVE_BYTES = int(float(os.environ.get("TAPSHARE_UPDATE_RESERVE_MB", "64")) * 1024 * 1024)
VENV_FACTOR = 3


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def log(msg: str) -> None:
    print(f"apply-update: {msg}", file=sys.stderr, flush=True)


def crash_point(step: str) -> None:
    """Where a test cuts the power (SIGKILL: nothing is flushed or cleaned up)."""
    if step == CRASH_AT:
        log(f"crash point {step}: SIGKILL")
        os.kill(os.getpid(), signal.SIGKILL)


def parse_version(text: str) -> tuple[int, ...]:
    if not isinstance(text, str) or not VERSION_RE.fullmatch(text):
        raise Refused("malformed", f"not a version: {str(text)[:30]!r}")
    return tuple(int(x) for x in text.split("."))


# ---------------------------------------------------------------- state files (written atomically)

def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record(rollout_id: int, version: str, step: str, reason: str = "", detail: str = "") -> None:
    """An outcome for the kiosk to report (``state/events.json``: the last MAX_EVENTS, each with a seq)."""
    data = read_json(STATE / "events.json") or {"events": []}
    events = data["events"]
    seq = (events[-1]["seq"] + 1) if events else 1
    events.append({"seq": seq, "rollout_id": rollout_id, "version": version, "step": step, "reason": reason,
                   "detail": detail[:500], "at_ms": time.time_ns() // 1_000_000})
    write_json(STATE / "events.json", {"events": events[-MAX_EVENTS:]})
    log(f"{version}: {step} {reason} {detail}".rstrip())


def highest_installed() -> str:
    data = read_json(STATE / "installed.json") or {}
    return str(data.get("highest", "0.0.0"))


def switch_current(target: str) -> None:
    """Point ``current`` at ``target`` (``releases/<dir>``) atomically: a new symlink renamed over the old."""
    new = APP / "current.new"
    if new.is_symlink() or new.exists():
        new.unlink()
    os.symlink(target, new)
    os.replace(new, APP / "current")
    fsync_dir(APP)


def current_target() -> str:
    try:
        return os.readlink(APP / "current")
    except OSError:
        return ""


def restart_service() -> None:
    if RESET:       # a unit that hit its start limit refuses "restart" until its failed state is reset
        subprocess.run(RESET, capture_output=True, text=True)
    r = subprocess.run(RESTART, capture_output=True, text=True)
    if r.returncode != 0:
        log(f"restart ({' '.join(RESTART)}) failed: {r.stderr.strip()[:300]}")


def service_status() -> dict[str, str]:
    """The service's ``NRestarts`` and ``ActiveState`` (empty when not asked for or not known)."""
    if not STATUS:
        return {}
    try:
        r = subprocess.run(STATUS, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = (line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs} if r.returncode == 0 else {}


def crashing(base: dict[str, str], now: dict[str, str]) -> str:
    """Why the release on trial is failing by systemd's account, or ""."""
    if not base or not now:
        return ""
    if now.get("ActiveState") == "failed":
        return "systemd gave up on it (its start limit)"
    try:
        restarts = int(now.get("NRestarts", "0")) - int(base.get("NRestarts", "0"))
    except ValueError:
        return ""
    return f"it stopped and was restarted {restarts} times" if restarts >= TRIAL_RESTARTS else ""


# ---------------------------------------------------------------- verification (independent of the kiosk's)

def pinned_keys() -> list[Ed25519PublicKey]:
    keys = []
    for path in sorted(KEYS.glob("*.pub.pem")):
        key = serialization.load_pem_public_key(path.read_bytes())
        if isinstance(key, Ed25519PublicKey):
            keys.append(key)
    return keys


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def check_manifest(raw: bytes, raw_sig: bytes, keys: list[Ed25519PublicKey]) -> dict:
    try:
        sig = json.loads(raw_sig)
        signature = base64.b64decode(sig["signature"], validate=True)
        kid = str(sig["key_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise Refused("bad_signature", "manifest.sig is not a signature file") from e
    match = [k for k in keys if key_id(k) == kid]
    if not match:
        raise Refused("unknown_key", f"signed with key {kid[:16]}, which this machine does not trust")
    try:
        match[0].verify(signature, raw)
    except InvalidSignature as e:
        raise Refused("bad_signature", "the manifest's signature does not match") from e
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise Refused("malformed", "the manifest is not JSON") from e
    if not isinstance(m, dict) or json.dumps(m, sort_keys=True, separators=(",", ":"),
                                             ensure_ascii=False).encode() != raw:
        raise Refused("malformed", "the manifest is not in canonical form")
    if m.get("format") != BUNDLE_FORMAT:
        raise Refused("unsupported_format", f"bundle format {m.get('format')!r}")
    parse_version(m.get("version"))
    parse_version(m.get("min_version"))
    files, types = m.get("files"), m.get("device_types")
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise Refused("malformed", "device_types is not a list of names")
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
        raise Refused("malformed", "files is not a list of 1 to 20000 files")
    for name, entry in files.items():
        if (not SAFE_PATH.fullmatch(name) or "/../" in f"/{name}/" or "/./" in f"/{name}/"
                or not isinstance(entry, dict) or not SHA_RE.fullmatch(str(entry.get("sha256")))
                or type(entry.get("size")) is not int or entry["size"] < 0):
            raise Refused("malformed", f"bad file entry {name[:100]!r}")
    return m


def verify_bundle(path: Path, keys: list[Ed25519PublicKey]) -> dict:
    """The signed manifest, if the bundle is exactly what it lists (nothing more, nothing less, every hash)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            by_name: dict[str, tarfile.TarInfo] = {}
            for mem in members:
                if mem.name in by_name:
                    raise Refused("tampered", f"{mem.name[:100]} is in the bundle twice")
                by_name[mem.name] = mem
            small = []
            for n in ("manifest.json", "manifest.sig"):
                mem = by_name.get(n)
                if mem is None or not mem.isreg() or mem.size > 4 << 20:
                    raise Refused("malformed", f"the bundle has no {n}")
                small.append(tar.extractfile(mem).read())
            m = check_manifest(small[0], small[1], keys)
            extra = set(by_name) - set(m["files"]) - {"manifest.json", "manifest.sig"}
            if extra:
                raise Refused("tampered", f"{sorted(extra)[0][:100]} is not in the manifest")
            for name, entry in m["files"].items():
                mem = by_name.get(name)
                if mem is None or not mem.isreg() or mem.size != entry["size"]:
                    raise Refused("tampered", f"{name[:100]} is missing, not a file, or of another size")
                h = hashlib.sha256()
                fh = tar.extractfile(mem)
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                if h.hexdigest() != entry["sha256"]:
                    raise Refused("tampered", f"{name[:100]} is not the file that was signed")
    except tarfile.TarError as e:
        raise Refused("malformed", f"not a bundle: {e}") from e
    return m


def check_applicable(m: dict, running: str) -> None:
    if DEVICE_TYPE not in m["device_types"]:
        raise Refused("wrong_device_type", f"release {m['version']} is for {', '.join(m['device_types'])}")
    if parse_version(m["version"]) <= parse_version(highest_installed()):
        raise Refused("downgrade", f"release {m['version']} is not newer than {highest_installed()}, the "
                                   "highest version installed here")
    if parse_version(running) < parse_version(m["min_version"]):
        raise Refused("too_old", f"release {m['version']} upgrades from {m['min_version']}; this runs {running}")


def running_version() -> str:
    try:
        text = (APP / "current" / "VERSION").read_text().strip()
        parse_version(text)
        return text
    except (OSError, Refused):
        pass
    try:        # a release deploy.sh installed: its contract package says
        src = (APP / "current" / "contract" / "__init__.py").read_text()
        found = re.search(r'^SOFTWARE_VERSION = "([0-9.]+)"', src, re.M)
        return found.group(1) if found else "0.0.0"
    except OSError:
        return "0.0.0"


# ---------------------------------------------------------------- install

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def python_version() -> str:
    """The machine's Python as ``3.11``."""
    return subprocess.run([PYTHON, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                          capture_output=True, text=True, check=True).stdout.strip()


def venv_name(dotted_python: str, lock_sha256: str) -> str:
    """A virtualenv's folder under venvs/: deploy.sh's name (``py3.11-<lock hash>``), so each reuses the other's."""
    return f"py{dotted_python}-{lock_sha256[:12]}"


# ---------------------------------------------------------------- disk space

def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def prune(*, venvs: bool) -> int:
    """Remove the releases that are neither current, previous (deploy.sh's roll-back target) nor on trial, and
    (``venvs``) the virtualenvs no remaining release uses; the bytes freed."""
    keep = {current_target()}
    for name in ("previous", "live"):
        try:
            keep.add((APP / name).read_text().splitlines()[0].strip())
        except (OSError, IndexError):
            pass
    trial = read_json(STATE / "trial.json")
    if trial:
        keep.update((str(trial.get("from", "")), str(trial.get("to", ""))))
    freed = 0
    for d in (APP / "releases").iterdir():
        if d.name.startswith(".") or f"releases/{d.name}" in keep or not d.is_dir():
            continue
        freed += tree_bytes(d)
        shutil.rmtree(d, ignore_errors=True)
        log(f"pruned the old release {d.name}")
    if not venvs:
        return freed
    used = set()
    for d in (APP / "releases").iterdir():
        try:
            used.add(os.path.basename(os.readlink(d / ".venv")))
        except OSError:
            pass
    for v in (APP / "venvs").glob("*") if (APP / "venvs").is_dir() else ():
        if v.is_dir() and v.name not in used and not v.is_symlink():
            freed += tree_bytes(v)
            shutil.rmtree(v, ignore_errors=True)
            log(f"pruned the unused virtualenv {v.name}")
    return freed


def need_space(path: Path, needed: int, what: str) -> None:
    if free_bytes(path) < needed + RESERVE_BYTES:
        prune(venvs=True)           # a roll-back leaves its venv (for a retry); room first
    have = free_bytes(path)
    if have < needed + RESERVE_BYTES:
        raise Refused("no_space", f"{what} needs {needed // 2**20 + 1} MiB and {RESERVE_BYTES // 2**20} MiB stay free "
                                  f"for the ledger; {have // 2**20} MiB are free on {path}")


def install(req: dict) -> None:
    version, rollout_id = str(req.get("version", "")), int(req.get("rollout_id", 0) or 0)
    parse_version(version)
    src = Path(str(req.get("bundle", "")))
    if src.parent.resolve() != UPDATES.resolve() or not src.is_file():
        raise Refused("bad_request", f"no bundle {src.name!r} in {UPDATES}")
    # a copy only root can write: the kiosk cannot change it between our checks and the unpacking
    staged = STATE / "incoming.bundle"
    prune(venvs=False)
    need_space(STATE, src.stat().st_size, "a copy of the bundle")
    shutil.copyfile(src, staged)
    digest = sha256_file(staged)
    if digest != req.get("sha256"):
        raise Refused("sha256_mismatch", "the bundle is not the file the cloud offered")
    m = verify_bundle(staged, pinned_keys())
    if m["version"] != version:
        raise Refused("malformed", f"the bundle is release {m['version']}, not {version}")
    check_applicable(m, running_version())
    name = f"{version}-{digest[:8]}"
    final = APP / "releases" / name
    if (final / ".installed").is_file():
        record(rollout_id, version, "installed", detail=f"releases/{name} was installed already")
        return
    partial = APP / "releases" / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    dotted = python_version()
    tag = "py" + dotted.replace(".", "")
    app_bytes = sum(e["size"] for f, e in m["files"].items() if f.startswith("app/"))
    wheel_bytes = sum(e["size"] for f, e in m["files"].items() if f.startswith(f"wheels/{tag}/"))
    lock_entry = m["files"].get(f"app/requirements-pi-{tag}.lock")
    venv_known = bool(lock_entry) and (APP / "venvs" / venv_name(dotted, lock_entry["sha256"])
                                       / ".installed").is_file()
    need_space(APP / "releases", app_bytes + (0 if venv_known else (1 + VENV_FACTOR) * wheel_bytes),
               f"release {version}" + ("" if venv_known else " and its virtualenv"))
    partial.mkdir(parents=True)
    with tarfile.open(staged, "r:") as tar:
        for fname, entry in m["files"].items():
            if not fname.startswith("app/"):
                continue
            dest = partial / fname[4:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with tar.extractfile(tar.getmember(fname)) as fh, open(dest, "wb") as out:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != entry["sha256"]:
                raise Refused("tampered", f"{fname} changed while unpacking")
        crash_point("unpacked")
        lock = partial / f"requirements-pi-{tag}.lock"
        if not lock.is_file():
            raise Refused("no_python", f"the release has no {lock.name} for this machine's Python")
        key = venv_name(dotted, sha256_file(lock))
        venv = APP / "venvs" / key
        if not (venv / ".installed").is_file():
            wheels = STATE / "wheels"
            shutil.rmtree(wheels, ignore_errors=True)
            wheels.mkdir()
            for fname in m["files"]:
                if fname.startswith(f"wheels/{tag}/"):
                    (wheels / fname.rsplit("/", 1)[1]).write_bytes(tar.extractfile(tar.getmember(fname)).read())
            install_venv(venv, lock, wheels)
            shutil.rmtree(wheels, ignore_errors=True)
    crash_point("venv")
    os.symlink(f"../../venvs/{key}", partial / ".venv")
    (partial / "VERSION").write_text(version + "\n")
    (partial / ".installed").touch()
    os.rename(partial, final)
    fsync_dir(final.parent)
    staged.unlink()
    record(rollout_id, version, "installed", detail=f"releases/{name}")


def install_venv(venv: Path, lock: Path, wheels: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PYTHON, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "--no-input",
                        "--no-index", "--find-links", str(wheels), "--require-hashes", "-r", str(lock)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise Refused("install_failed", f"pip: {(r.stderr or r.stdout).strip()[-400:]}")
    (venv / ".installed").touch()


# ---------------------------------------------------------------- switch, trial, roll back

def switch(req: dict) -> None:
    version, rollout_id = str(req.get("version", "")), int(req.get("rollout_id", 0) or 0)
    parse_version(version)
    not_after_ms = req.get("not_after_ms")
    if isinstance(not_after_ms, int) and time.time_ns() // 1_000_000 > not_after_ms:
        record(rollout_id, version, "deferred", "stale", "the switch was asked for too long ago: the machine may "
                                                         "be serving again; the kiosk asks again when idle")
        return
    found = sorted(d.name for d in (APP / "releases").glob(f"{version}-*") if (d / ".installed").is_file())
    if not found:
        raise Refused("not_installed", f"release {version} is not installed")
    target = f"releases/{found[-1]}"
    was = current_target()
    if was == target:
        return
    healthy = UPDATES / f"healthy-{version}"
    healthy.unlink(missing_ok=True)
    trial = {"from": was, "to": target, "version": version, "rollout_id": rollout_id,
             "deadline_ms": time.time_ns() // 1_000_000 + int(HEALTH_S * 1000)}
    write_json(STATE / "trial.json", trial)
    crash_point("journal")
    switch_current(target)
    record(rollout_id, version, "switched", detail=f"{was} -> {target}")
    crash_point("switched")
    restart_service()
    crash_point("restarted")
    started = time.monotonic()
    deadline, base, why, next_look = started + HEALTH_S, service_status(), "", started + 1
    while time.monotonic() < deadline and not healthy.exists() and not why:
        time.sleep(0.2)
        if time.monotonic() >= next_look:
            why, next_look = crashing(base, service_status()), time.monotonic() + 1
    if healthy.exists():
        commit(trial)
    elif why:
        roll_back(trial, "crashed", f"release {version} did not stay up: {why} in its first "
                                    f"{time.monotonic() - started:.0f} s")
        restart_service()
    else:
        roll_back(trial, "no_heartbeat", f"release {version} did not reach the cloud within {HEALTH_S:.0f} s "
                                         "of its start")
        restart_service()


def commit(trial: dict) -> None:
    """The new release proved itself: it is live, the old one previous, and nothing older installs again."""
    version = trial["version"]
    if parse_version(version) > parse_version(highest_installed()):
        write_json(STATE / "installed.json", {"highest": version})
    if trial["from"]:
        (APP / "previous").write_text(trial["from"] + "\n")
    (APP / "live").write_text(f"{trial['to']}\nserving: update {version} reached the cloud\n")
    (STATE / "trial.json").unlink()
    fsync_dir(STATE)
    log(f"{version}: healthy, live")
    prune(venvs=True)


def roll_back(trial: dict, reason: str, detail: str) -> None:
    if trial["from"] and (APP / trial["from"] / ".installed").exists():
        switch_current(trial["from"])
    record(int(trial.get("rollout_id") or 0), trial["version"], "rolled_back", reason, detail)
    failed = APP / trial["to"]
    (STATE / "trial.json").unlink()
    fsync_dir(STATE)
    if failed.is_dir() and current_target() != trial["to"]:
        shutil.rmtree(failed, ignore_errors=True)


def recover(boot: bool) -> bool:
    """Finish or undo what an interrupted run left; True if ``current`` changed (the service needs a restart)."""
    changed = False
    for d in (APP / "releases").glob(".*.partial"):
        log(f"removing the half-unpacked {d.name}")
        shutil.rmtree(d, ignore_errors=True)
    for leftover in (APP / "current.new", STATE / "incoming.bundle"):
        if leftover.is_symlink() or leftover.exists():
            leftover.unlink()
    shutil.rmtree(STATE / "wheels", ignore_errors=True)
    for v in (APP / "venvs").glob("*"):
        if v.is_dir() and not (v / ".installed").exists():
            shutil.rmtree(v, ignore_errors=True)        # a venv pip did not finish
    trial = read_json(STATE / "trial.json")
    if trial is not None:
        if (UPDATES / f"healthy-{trial['version']}").exists() and current_target() == trial["to"]:
            commit(trial)
        else:
            was = current_target()
            roll_back(trial, "interrupted", f"the switch to {trial['version']} was interrupted (power loss or "
                                            "a crash) before the release proved healthy")
            changed = current_target() != was
    return changed and not boot


def run() -> int:
    req_path = UPDATES / "apply.json"
    req = read_json(req_path)
    if req is None:
        return 0
    req_path.unlink(missing_ok=True)            # one request, one run: a failing one is not retried in a loop
    action = req.get("action")
    version = str(req.get("version", ""))[:30]
    rollout_id = req.get("rollout_id") if isinstance(req.get("rollout_id"), int) else 0
    try:
        if action == "install":
            install(req)
        elif action == "switch":
            switch(req)
        else:
            raise Refused("bad_request", f"unknown action {str(action)[:20]!r}")
    except Refused as e:
        record(rollout_id, version if VERSION_RE.fullmatch(version) else "0.0.0",
               "failed" if e.code in ("install_failed", "not_installed", "bad_request", "no_python", "no_space")
               else "refused",
               e.code, e.message)
        for d in (APP / "releases").glob(".*.partial"):
            shutil.rmtree(d, ignore_errors=True)
        (STATE / "incoming.bundle").unlink(missing_ok=True)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "recover"):
        print(__doc__, file=sys.stderr)
        return 2
    STATE.mkdir(parents=True, exist_ok=True)
    (APP / "releases").mkdir(parents=True, exist_ok=True)
    with open(STATE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one applier at a time; released by the kernel if we die
        if argv[0] == "recover":
            if recover(boot="--boot" in argv):
                restart_service()
            return 0
        if recover(boot=False):
            restart_service()
        return run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
