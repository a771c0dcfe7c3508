"""The real deploy.sh in a booted Debian bookworm (systemd as PID 1, under systemd-nspawn) that passes for a
Raspberry Pi 4: first install, a second run that changes nothing, an upgrade, two releases that crash (rolled
back, exit 3), SIGKILL of the service (ExecStopPost closes the valve), root's admin commands, and
systemd-analyze verify/security on the unit. Nothing in deploy.sh is stubbed: apt-get, useradd, pip with
hashes, systemctl and the soak all run for real. The only stand-ins are the Pi itself (tests/bootkit.py: its
/proc/cpuinfo, boot files, python3-lgpio and an Xvfb screen for its display).

Slow (a few minutes with the cache warm; the first run builds the root with debootstrap). Needs root.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import bootkit

pytestmark = pytest.mark.timeout(1500)

DEPLOY = "./deploy.sh --soak 30"
# A main.py whose config check (deploy.sh runs --print-config) passes, but which, started by systemd, ...
BROKEN_MAIN = '''import os, sys, time
from kiosk import config, systemd
if "NOTIFY_SOCKET" not in os.environ:
    config.load(sys.argv[sys.argv.index("--config") + 1])
    raise SystemExit(0)
'''
# ... exits 0.2 s after READY=1, as a kiosk does when Kivy finds no display
CRASH_AFTER_READY = BROKEN_MAIN + '''systemd.notify("READY=1\\nSTATUS=starting: waiting for the first frame")
time.sleep(0.2)
raise SystemExit("no display")
'''
# ... or says "serving", then dies 5 s into the soak
CRASH_IN_SOAK = BROKEN_MAIN + '''systemd.notify("READY=1\\nSTATUS=serving: first frame drawn, ledger written")
time.sleep(5)
raise SystemExit("a slow leak")
'''


@pytest.fixture(scope="module")
def pi():
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root (CI and test.sh's set-up run as root)")
    missing = bootkit.missing_tools()
    if missing:
        if os.environ.get("TAPSHARE_TEST_ALL"):
            pytest.fail(f"test.sh set up everything, yet {', '.join(missing)} is missing")
        pytest.skip(f"needs {', '.join(missing)} (apt-get install debootstrap systemd-container)")
    started = time.monotonic()
    box = bootkit.BootedPi(bootkit.CACHE / f"work-{os.getpid()}",
                           lambda m: print(f"[boot {time.monotonic() - started:5.1f}s] {m}", flush=True))
    try:
        box.prepare()
        box.boot()
        yield box
    finally:
        box.shutdown()


def deploy(pi: bootkit.BootedPi, *args: str, env: str = ""):
    # as a hardened root runs it: umask 077 (deploy.sh must still leave everything readable by the service)
    r = pi.sh(f"cd /root/tapshare && umask 077 && {env} {DEPLOY} {' '.join(args)}", check=False, timeout=900)
    print(r.stdout[-3000:], r.stderr[-3000:])
    return r


def serving(pi: bootkit.BootedPi, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pi.prop("ActiveState") == "active" and pi.prop("StatusText").startswith("serving"):
            return pi.prop("MainPID")
        time.sleep(1)
    raise AssertionError(f"not serving: {pi.prop('ActiveState')} {pi.prop('StatusText')!r}")


def current(pi: bootkit.BootedPi) -> str:
    return pi.sh("readlink /opt/tapshare/current").stdout.strip()


def releases(pi: bootkit.BootedPi) -> list[str]:
    return sorted(pi.sh("ls /opt/tapshare/releases").stdout.split())


def test_first_install_is_live_only_after_it_serves(pi):
    r = deploy(pi, "--machine-id", "BOOT-0001", "--server-url", "http://127.0.0.1:9")
    assert r.returncode == 0, r.stderr
    assert "says \"serving: first frame drawn, ledger written as tapshare" in r.stdout
    assert "watching it for 30 s" in r.stdout and "is live" in r.stdout
    serving(pi)
    assert pi.prop("NRestarts") == "0"
    owners = pi.sh("stat -c '%U %n' /var/lib/tapshare/ledger.db*").stdout.split("\n")
    assert all(line.startswith("tapshare ") for line in owners if line), owners
    # the valve pin was claimed as an output at its inactive level (the stand-in gpiochip's log)
    chip = pi.sh("cat /var/lib/tapshare/lgpio-standin.log").stdout
    assert " claim_output 17 0" in chip and " write 17 1" not in chip
    boot = pi.sh("cat /boot/firmware/config.txt").stdout
    assert boot.split("# BEGIN tapshare")[1].splitlines()[1] == "[all]"
    assert "consoleblank=0" in pi.sh("cat /boot/firmware/cmdline.txt").stdout
    assert pi.sh("python3 -c 'import lgpio; print(lgpio.__version__)'").stdout.strip() == "0.2.2.0-standin"


def test_the_unit_verifies_and_is_hardened(pi):
    verify = pi.sh("systemd-analyze verify /etc/systemd/system/tapshare.service", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = pi.sh("systemd-analyze security --no-pager tapshare.service", check=False)
    level = bootkit.exposure(security.stdout)
    print(f"systemd-analyze security: exposure {level}")
    assert level <= 5.0, security.stdout


def test_a_second_run_changes_nothing(pi):
    pid = pi.prop("MainPID")
    r = deploy(pi)
    assert r.returncode == 0 and "nothing to change" in r.stdout, r.stdout
    assert pi.prop("MainPID") == pid                                  # not even restarted


def test_an_upgrade_reuses_the_virtualenv_and_keeps_one_release_back(pi):
    before = current(pi)
    pi.sh("echo '# upgraded' >> /root/tapshare/README.md")
    r = deploy(pi)
    assert r.returncode == 0 and "reusing the virtualenv" in r.stdout and "is live" in r.stdout, r.stdout
    assert current(pi) != before and releases(pi) == sorted([before.split("/")[1], current(pi).split("/")[1]])
    serving(pi)


@pytest.mark.parametrize("crasher", [CRASH_AFTER_READY, CRASH_IN_SOAK], ids=["after-ready", "in-soak"])
def test_a_release_that_crashes_is_rolled_back(pi, crasher):
    live, kept = current(pi), releases(pi)
    pi.sh("cp /root/tapshare/main.py /root/main.py.good")
    pi.sh(f"cat > /root/tapshare/main.py <<'EOF'\n{crasher}EOF")
    try:
        r = deploy(pi)
    finally:
        pi.sh("cp /root/main.py.good /root/tapshare/main.py")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "rolling back to " + live in r.stdout and "runs again" in r.stdout
    assert current(pi) == live and releases(pi) == kept                 # the bad release is gone
    serving(pi)


def test_sigkill_of_the_service_still_closes_the_valve(pi):
    pid = serving(pi)
    pi.sh("systemctl kill -s KILL --kill-whom=main tapshare.service")
    deadline = time.monotonic() + 60
    while pi.prop("MainPID") in (pid, "0") and time.monotonic() < deadline:
        time.sleep(0.5)
    serving(pi)                                                         # restarted by systemd
    journal = pi.sh("journalctl -u tapshare.service -o cat --no-pager").stdout
    assert "valve_off: BCM 17 at level 0 (valve closed)" in journal, journal[-2000:]


def test_the_unit_names_its_escalation_and_the_live_release(pi):
    assert pi.prop("OnFailure") == "tapshare-escalate.service"
    assert pi.sh("systemctl show tapshare-escalate.service -p LoadState --value").stdout.strip() == "loaded"
    live = pi.sh("sed -n 1p /opt/tapshare/live").stdout.strip()
    assert live == current(pi)


def test_admin_commands_as_root_leave_the_ledger_to_the_service(pi):
    refused = pi.sh("/opt/tapshare/current/.venv/bin/python /opt/tapshare/current/main.py "
                    "--config /etc/tapshare/config.toml --status", check=False)
    assert refused.returncode == 2 and "belongs to tapshare" in refused.stderr
    r = deploy(pi, "--pin", env="TAPSHARE_MAINTENANCE_PIN=246810")
    assert r.returncode == 0, r.stderr
    owners = pi.sh("stat -c '%U %n' /var/lib/tapshare/ledger.db*").stdout.split("\n")
    assert all(line.startswith("tapshare ") for line in owners if line), owners
    serving(pi)


# ---------------------------------------------------------------- a fleet update inside the booted root

def test_a_fleet_update_lands_and_a_crashing_one_rolls_back_without_a_reboot(pi, tmp_path_factory):
    """The real units do it all: the kiosk (as the service user, hardened) hears of 0.3.0 from a cloud on the host,
    downloads and checks it; tapshare-update.path starts root's applier, which checks again, installs (reusing
    deploy.sh's venv: same lock), switches only when the kiosk holds the machine, restarts tapshare.service with
    systemctl and commits once the new release reached the cloud. Then 0.4.0, whose main.py dies at once: systemd
    restarts it, the applier sees it crash and rolls back before the start limit fails the unit, so
    tapshare-escalate never reboots the Pi for it."""
    import subprocess
    import sys

    from sync.secret import write_secret
    from tests import updatekit as kit
    from tests.util import wait_until

    base = tmp_path_factory.mktemp("boot-update")
    key = base / "release.pem"
    make = [sys.executable, str(kit.ROOT / "scripts" / "make-bundle.py")]
    subprocess.run([*make, "--new-key", str(key)], check=True, capture_output=True)
    (base / "src").mkdir()
    src = kit.checkout_copy(base / "src")
    out = subprocess.run([*make, "--key", str(key), "--src", str(src), "--out", str(base), "--version", "0.3.0",
                          "--min-version", "0.2.0", "--host-wheels"], check=True, capture_output=True, text=True)
    good = Path(out.stdout.split()[0])

    def as_040(m):
        m["version"] = "0.4.0"
    crashing = kit.rewrite_bundle(good, base / "crash.bundle", key=key, manifest_edit=as_040, replace={
        "app/main.py": b"import sys\nsys.exit('this release cannot start')\n"})

    cloud = kit.StandInCloud("BOOT-0001", b"boot-secret-" + bytes(20))
    try:
        root = pi.root
        (root / "etc/tapshare/release-keys/boot-test.pub.pem").write_bytes((base / "release.pub.pem").read_bytes())
        pi.sh("chmod 0644 /etc/tapshare/release-keys/boot-test.pub.pem")
        write_secret(root / "etc/tapshare/device.secret", cloud.secret, overwrite=True)
        pi.sh("chown tapshare:tapshare /etc/tapshare/device.secret && chmod 0600 /etc/tapshare/device.secret")
        cfg = root / "etc/tapshare/config.toml"
        text = cfg.read_text()
        cfg.write_text(text.replace('url = "http://127.0.0.1:9"', f'url = "{cloud.url}"\nheartbeat_interval_ms = 2000'))
        before = current(pi)
        pi.sh("systemctl restart tapshare.service")
        serving(pi)
        assert wait_until(lambda: "0.2.0" in cloud.versions_heard(), 60), pi.sh(
            "journalctl -u tapshare.service -o cat --no-pager | tail -40").stdout

        cloud.offer_bundle(good, "0.3.0", rollout_id=31)
        assert wait_until(lambda: "healthy" in cloud.steps("0.3.0") or "rolled_back" in cloud.steps(), 600), (
            cloud.reports, pi.sh("journalctl -u tapshare-update.service -o cat --no-pager | tail -40").stdout)
        assert cloud.steps("0.3.0") == ["downloading", "downloaded", "verified", "installed", "switched", "healthy"]
        assert wait_until(lambda: pi.sh("test -e /opt/tapshare/state/trial.json", check=False).returncode != 0, 30)
        live = current(pi)
        assert live.startswith("releases/0.3.0-") and pi.sh(f"cat /opt/tapshare/{live}/VERSION").stdout == "0.3.0\n"
        # deploy.sh's venv, found by its name: nothing was installed from the bundle's wheels
        assert pi.sh(f"readlink /opt/tapshare/{live}/.venv").stdout == pi.sh(
            f"readlink /opt/tapshare/{before}/.venv").stdout
        kept = sorted([before.split("/")[1], live.split("/")[1]])     # the oldest pruned, just after the commit
        assert wait_until(lambda: releases(pi) == kept, 30), releases(pi)
        serving(pi)
        assert wait_until(lambda: "0.3.0" in cloud.versions_heard(), 30)
        journal = pi.sh("journalctl -u tapshare-update.service -o cat --no-pager").stdout
        assert "0.3.0: healthy, live" in journal, journal[-3000:]

        init_pid = pi.pid
        cloud.offer_bundle(crashing, "0.4.0", rollout_id=32)
        assert wait_until(lambda: "rolled_back" in cloud.steps("0.4.0"), 600), (
            cloud.reports, pi.sh("journalctl -u tapshare-update.service -o cat --no-pager | tail -40").stdout)
        back = next(r for r in cloud.reports if r["step"] == "rolled_back")
        assert back["reason"] == "crashed" and back["running_version"] == "0.3.0", back
        assert current(pi) == live
        serving(pi)
        assert pi.proc.poll() is None and pi._init_pid() == init_pid        # the container was not rebooted
        escalate = pi.sh("journalctl -u tapshare-escalate.service -o cat --no-pager").stdout
        assert "keeps failing to start: rebooting" not in escalate, escalate
        assert pi.prop("ActiveState") == "active"
        assert pi.sh("cat /opt/tapshare/state/installed.json").stdout.strip() == '{"highest": "0.3.0"}'
    finally:
        cloud.close()
