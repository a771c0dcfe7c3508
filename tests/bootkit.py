"""A Debian bookworm root booted with systemd-nspawn (systemd as PID 1) that looks enough like a Raspberry Pi 4
for deploy.sh: a /proc/cpuinfo with a Pi's Model and Revision lines, /boot/firmware/config.txt and cmdline.txt,
a stand-in python3-lgpio package in a local apt repository (tests/standins/lgpio.py: an in-memory gpiochip that
logs every level it is driven to), and an Xvfb screen in place of the Pi's KMS display.

The root is built once with debootstrap from Debian's package registry and kept in a cache folder
(``TAPSHARE_BOOT_CACHE``, default /var/cache/tapshare-test-boot), keyed by its package list; every test boots a
copy, never the cache. pip's download cache is kept there too, so a warm run downloads nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TAPSHARE_BOOT_CACHE", "/var/cache/tapshare-test-boot"))
MIRROR = "http://deb.debian.org/debian"
# What deploy.sh installs (so that its apt-get finds everything there), plus systemd to boot and Xvfb for
# the screen. Not python3-lgpio: that comes from the stand-in repository, as it would from the Pi's archive.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "ca-certificates", "python3", "python3-venv",
            "python3-dev", "fonts-noto-cjk", "libsdl2-2.0-0", "libgl1", "libegl1", "libgles2", "libmtdev1",
            "libdrm2", "libgbm1", "systemd-timesyncd", "sqlite3", "xvfb", "xauth", "libgl1-mesa-dri")
CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n\n"
           "Hardware\t: BCM2835\nRevision\t: c03115\nSerial\t\t: 10000000b0075e11\n"
           "Model\t\t: Raspberry Pi 4 Model B Rev 1.5\n")
CONFIG_TXT = ("# Raspberry Pi OS's stock lines\n[all]\ndtparam=audio=on\ncamera_auto_detect=1\ndisplay_auto_detect=1\n"
              "auto_initramfs=1\ndtoverlay=vc4-kms-v3d\nmax_framebuffers=2\narm_64bit=1\n\n[cm5]\n"
              "dtoverlay=dwc2,dr_mode=host\n")
CMDLINE_TXT = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait\n"
XVFB_UNIT = """[Unit]
Description=Xvfb, the test's stand-in for the Pi's display
[Service]
ExecStart=/usr/bin/Xvfb :0 -screen 0 800x480x24 -nolisten tcp
[Install]
WantedBy=multi-user.target
"""
# The kiosk draws on Xvfb instead of KMSDRM, and the unit's ProtectProc= mounts a /proc of its own, so the fake
# Pi's cpuinfo is bound into it again. Everything else in deploy.sh's unit stays as written.
DISPLAY_DROPIN = """[Unit]
Wants=xvfb.service
After=xvfb.service
[Service]
Environment=DISPLAY=:0
Environment=SDL_VIDEODRIVER=x11
BindReadOnlyPaths=/srv/fake-pi/cpuinfo:/proc/cpuinfo
"""
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
       "TERM": "dumb"}


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb") if shutil.which(t) is None]


def cached_root(log) -> Path:
    """The pristine bookworm root, built once (under a lock, so parallel runs wait for one build)."""
    key = hashlib.sha256(" ".join(("bookworm", MIRROR, *PACKAGES)).encode()).hexdigest()[:12]
    root = CACHE / f"bookworm-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root
        building = CACHE / f"building-{key}"
        shutil.rmtree(building, ignore_errors=True)
        log(f"debootstrap bookworm into {building} (once; later runs reuse it)")
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
                        str(building), MIRROR], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=1200)
        (building / ".complete").touch()
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
    return root


def standin_deb(dest: Path) -> Path:
    """python3-lgpio as a Debian package (Architecture: all) holding tests/standins/lgpio.py."""
    pkg = dest / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    site = pkg / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True)
    shutil.copy(REPO / "tests/standins/lgpio.py", site / "lgpio.py")
    for path in (pkg, *pkg.rglob("*")):             # dpkg-deb refuses a DEBIAN folder made under umask 077
        path.chmod(0o755 if path.is_dir() else 0o644)
    (pkg / "DEBIAN/control").write_text(
        "Package: python3-lgpio\nVersion: 0.2.2-1~standin1\nArchitecture: all\nMaintainer: Tapshare tests\n"
        "Depends: python3\nSection: python\nPriority: optional\n"
        "Description: stand-in for the Raspberry Pi archive's lgpio bindings (tests only)\n")
    deb = dest / "python3-lgpio_0.2.2-1~standin1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(pkg)
    return deb


def local_repo(repo: Path) -> None:
    """A flat apt repository (``deb [trusted=yes] file:/srv/standin-repo ./``) with the stand-in package."""
    repo.mkdir(parents=True)
    deb = standin_deb(repo)
    control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True).stdout
    data = deb.read_bytes()
    (repo / "Packages").write_text(control.rstrip("\n") + f"\nFilename: ./{deb.name}\nSize: {len(data)}\n"
                                   f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n")


def source_tree(dest: Path) -> None:
    """The checkout's tracked files (what a technician's git clone has), without .git."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in names.decode().split("\0"):
        src = REPO / name
        if name and src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


class BootedPi:
    """A booted copy of the cached root. ``sh()`` runs a command inside (nsenter into every namespace)."""

    def __init__(self, work: Path, log) -> None:
        self.work, self.log = work, log
        self.root = work / "root"
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def prepare(self) -> None:
        # the files made here are read by apt's _apt user and the service user: not under the umask 077 that an
        # in-process cloud (create_app) leaves on this test process
        old = os.umask(0o022)
        try:
            self._prepare()
        finally:
            os.umask(old)

    def _prepare(self) -> None:
        pristine = cached_root(self.log)
        for stale in CACHE.glob("work-*"):          # left by a run that was killed: its process is gone
            pid = stale.name.removeprefix("work-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(pristine), str(self.root)], check=True)
        r = self.root
        (r / "srv/fake-pi").mkdir(parents=True)
        (r / "srv/fake-pi/cpuinfo").write_text(CPUINFO)
        (r / "boot/firmware").mkdir(parents=True, exist_ok=True)
        (r / "boot/firmware/config.txt").write_text(CONFIG_TXT)
        (r / "boot/firmware/cmdline.txt").write_text(CMDLINE_TXT)
        local_repo(r / "srv/standin-repo")
        (r / "etc/apt/sources.list.d/standin.list").write_text("deb [trusted=yes] file:/srv/standin-repo ./\n")
        units = r / "etc/systemd/system"
        (units / "xvfb.service").write_text(XVFB_UNIT)
        (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
        os.symlink("/etc/systemd/system/xvfb.service", units / "multi-user.target.wants/xvfb.service")
        (units / "tapshare.service.d").mkdir(parents=True)
        (units / "tapshare.service.d/display.conf").write_text(DISPLAY_DROPIN)
        source_tree(r / "root/tapshare")
        self._trust_like_the_host()
        (CACHE / "pip").mkdir(parents=True, exist_ok=True)

    def _trust_like_the_host(self) -> None:
        """Where this machine reaches PyPI through a TLS-inspecting proxy, its CA bundle (and pip's setting to use
        it) go into the container too: a fact of the test machine's network, not of the Pi."""
        extra = list(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        if not extra:
            return
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", self.root / "etc/ssl/certs/ca-certificates.crt")
        (self.root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")

    def boot(self) -> None:
        logf = open(self.work / "nspawn.log", "wb")        # noqa: SIM115 (open while the container runs)
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "-D", str(self.root), "--register=no", "--keep-unit", "--console=passive",
             f"--machine=tapshare-boot-{os.getpid()}", "--resolv-conf=copy-host",
             # the bind source is read inside the container for /proc destinations: a path in the root
             "--bind-ro=/srv/fake-pi/cpuinfo:/proc/cpuinfo", f"--bind={CACHE / 'pip'}:/root/.cache/pip"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            self.pid = self._init_pid()
            if self.pid:
                r = self.sh("systemctl is-system-running --wait", check=False, timeout=90)
                state = (r.stdout + r.stderr).strip()
                if r.stdout.strip() in ("running", "degraded"):
                    self.log(f"container booted: {state}")
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the container did not boot (init PID {self.pid or 'not found'}, state {state!r}, nspawn "
                           f"{'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'running'}): "
                           f"{(self.work / 'nspawn.log').read_text()[-2000:]}")

    def _init_pid(self) -> int:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and comm == "systemd":
                return int(stat.parent.name)
        return 0

    def sh(self, command: str, *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        # -r -w: the container's root and folder too (from inside a chroot, entering its namespaces is not enough)
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "--", "/bin/bash", "-c", command],
                           env=ENV, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{command!r} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def prop(self, name: str) -> str:
        return self.sh(f"systemctl show tapshare.service -p {name} --value").stdout.strip()

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid:
            self.sh("systemctl poweroff --no-block", check=False, timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.work, ignore_errors=True)


def exposure(security_output: str) -> float:
    """The overall exposure figure from ``systemd-analyze security UNIT``."""
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", security_output)
    if not m:
        raise AssertionError(f"no exposure level in:\n{security_output[-1500:]}")
    return float(m.group(1))
