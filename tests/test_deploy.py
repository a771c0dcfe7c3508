"""deploy.sh, run here into a temporary root with a fake Raspberry Pi (os-release, device-tree model,
config.txt) and stubbed package installation; shellcheck; and systemd's notify/watchdog protocol."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiosk import systemd

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy.sh"


def fake_pi(root: Path, os_id: str = "debian", codename: str = "bookworm",
            model: str = "Raspberry Pi 4 Model B Rev 1.5"):
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "os-release").write_text(
        f'PRETTY_NAME="Debian GNU/Linux"\nID={os_id}\nVERSION_CODENAME={codename}\n')
    (root / "proc" / "device-tree").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    (root / "boot" / "firmware").mkdir(parents=True, exist_ok=True)
    # a stock file ends in a board filter: whatever is appended after it applies only to that board
    (root / "boot" / "firmware" / "config.txt").write_text("[all]\ndtparam=audio=on\ncamera_auto_detect=1\n"
                                                          "[cm5]\ndtoverlay=dwc2,dr_mode=host\n")
    (root / "boot" / "firmware" / "cmdline.txt").write_text("console=serial0,115200 console=tty1 root=PARTUUID=1-02 "
                                                           "rootfstype=ext4 fsck.repair=yes rootwait\n")
    (root / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\ninput:x:101:\nrender:x:102:\n")
    return root


def test_a_root_umask_of_077_still_leaves_the_release_readable_by_the_service(tmp_path):
    root = fake_pi(tmp_path)
    old = os.umask(0o077)
    try:
        r = deploy(root, release="r1")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    release = root / "opt/tapshare/releases/r1"
    for p in (root / "opt/tapshare", root / "opt/tapshare/releases", release, release / "kiosk", release / "main.py",
              root / "etc/systemd/system/tapshare.service"):
        assert p.stat().st_mode & 0o005 == 0o005 if p.is_dir() else p.stat().st_mode & 0o004, (p, oct(p.stat().st_mode))
    assert (root / "var/lib/tapshare").stat().st_mode & 0o777 == 0o750


def deploy(root: Path, *args: str, health: str = "true", release: str | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")},
           "TAPSHARE_DEPLOY_STUB": "1", "TAPSHARE_DEPLOY_HEALTH": health, **(env or {})}
    if release:
        env["TAPSHARE_DEPLOY_RELEASE"] = release
    return subprocess.run(["bash", str(DEPLOY), "--root", str(root), *args], env=env, capture_output=True, text=True,
                          timeout=300)


def snapshot(root: Path) -> dict[str, tuple[float, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and "releases" not in p.parts and p.name != "tapshare-deploy-stub.log":
            out[str(p.relative_to(root))] = (p.stat().st_mtime, p.read_bytes())
    return out


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("TAPSHARE_TEST_ALL"):
            pytest.fail("test.sh set up everything, yet shellcheck is missing (see scripts/test-setup.sh)")
        pytest.skip("no shellcheck")
    for script in ("deploy.sh", "run.sh", "test.sh", "scripts/bootstrap.sh", ".ci/run", "scripts/test-setup.sh",
                   "scripts/postgres-for-tests.sh", "scripts/lock-pi.sh", "scripts/fresh-machine-check.sh"):
        r = subprocess.run(["shellcheck", "-x", str(ROOT / script)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stdout


def test_help_and_unknown_options():
    assert "Usage" in subprocess.run(["bash", str(DEPLOY), "--help"], capture_output=True, text=True).stdout
    r = subprocess.run(["bash", str(DEPLOY), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option" in r.stderr


@pytest.mark.parametrize(("kw", "why"), [({"os_id": "ubuntu"}, "unsupported system"),
                                         ({"codename": "bullseye"}, "unsupported release"),
                                         ({"model": "Raspberry Pi 3 Model B Rev 1.2"}, "unsupported board")])
def test_other_systems_are_refused(tmp_path, kw, why):
    r = deploy(fake_pi(tmp_path, **kw))
    assert r.returncode == 1 and why in r.stderr
    assert not (tmp_path / "etc" / "tapshare").exists()


def test_a_first_install_writes_everything_and_a_second_changes_nothing(tmp_path):
    root = fake_pi(tmp_path)
    r = deploy(root, "--machine-id", "PI-0042", "--server-url", "https://water.example.cn")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = (root / "etc/tapshare/config.toml").read_text()
    assert 'id = "PI-0042"' in cfg and 'url = "https://water.example.cn"' in cfg and "/var/lib/tapshare" in cfg
    from kiosk import config as config_mod
    assert config_mod.load(root / "etc/tapshare/config.toml").machine.id == "PI-0042"      # a valid config
    unit = (root / "etc/systemd/system/tapshare.service").read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=always", "User=tapshare",
                 "Environment=GPIOZERO_PIN_FACTORY=lgpio", "Environment=LG_WD=/var/lib/tapshare",
                 "Environment=SDL_VIDEODRIVER=kmsdrm",
                 "ExecStopPost=/opt/tapshare/current/.venv/bin/python -m hal.valve_off "
                 "--config /etc/tapshare/config.toml",
                 "StandardOutput=journal", "StartLimitBurst=5", "OnFailure=tapshare-escalate.service",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/tapshare",
                 "ProtectHome=yes", "PrivateTmp=yes", "UMask=0077", "DevicePolicy=closed",
                 "DeviceAllow=char-gpiochip rw", "DeviceAllow=char-drm rw", "DeviceAllow=char-input r"):
        assert line in unit.splitlines(), line
    deps = [ln for ln in unit.splitlines() if ln.startswith(("After=", "Wants=", "Requires="))]
    assert not any("network-online" in d or "time-sync" in d for d in deps), deps   # offline boots at once
    conf_d = root / "etc/systemd/system.conf.d"
    assert [p.name for p in conf_d.iterdir()] == ["99-tapshare-watchdog.conf"]     # after Pi OS's 70-rpi-...
    assert "RuntimeWatchdogSec=15" in (conf_d / "99-tapshare-watchdog.conf").read_text()
    assert "SystemMaxUse=200M" in (root / "etc/systemd/journald.conf.d/99-tapshare.conf").read_text()
    boot = (root / "boot/firmware/config.txt").read_text()
    assert boot.startswith("[all]\ndtparam=audio=on")                       # the Pi's own lines stay
    block = boot[boot.index("# BEGIN tapshare"):].splitlines()
    assert block[1] == "[all]", block                                       # not under the file's last [cm5]
    assert boot.count("dtoverlay=w1-gpio,gpiopin=4") == 1 and boot.count("gpio=17=op,dl") == 1
    assert (root / "boot/firmware/config.txt.bak").read_text().endswith("[cm5]\ndtoverlay=dwc2,dr_mode=host\n")
    cmdline = (root / "boot/firmware/cmdline.txt").read_text()
    assert cmdline.count("\n") == 1 and cmdline.rstrip().endswith("consoleblank=0 vt.global_cursor_default=0")
    assert os.readlink(root / "etc/systemd/system/getty@tty1.service") == "/dev/null"
    current = root / "opt/tapshare/current"
    assert current.is_symlink() and (current / "main.py").exists() and (current / "hal" / "valve_off.py").exists()
    assert os.readlink(current / ".venv").startswith("../../venvs/py3.11-")
    stub = (root / "tapshare-deploy-stub.log").read_text()
    assert "python3-lgpio" in stub and "fonts-noto-cjk" in stub
    assert "--groups gpio,spi,video,render,input" in stub
    assert "groupadd --system gpio" in stub and "groupadd --system spi" in stub
    assert "groupadd --system video" not in stub                        # only the groups this system lacks
    assert "-m venv --system-site-packages" in stub and "--require-hashes -r" in stub
    assert "systemctl enable --now systemd-timesyncd.service" in stub
    assert (root / "var/lib/tapshare").stat().st_mode & 0o777 == 0o750
    assert "reboot needed" in r.stdout
    before = snapshot(root)
    again = deploy(root, "--machine-id", "SOMETHING-ELSE")
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stdout
    assert snapshot(root) == before                                          # not a byte, not a timestamp


def test_a_technicians_edits_are_kept_and_followed(tmp_path):
    root = fake_pi(tmp_path)
    assert deploy(root).returncode == 0
    cfg = root / "etc/tapshare/config.toml"
    cfg.write_text(cfg.read_text().replace("valve = 17", "valve = 23").replace("valve_active_high = true",
                                                                               "valve_active_high = false"))
    r = deploy(root)
    assert r.returncode == 0 and "kept" in r.stdout
    assert "valve = 23" in cfg.read_text()
    boot = (root / "boot/firmware/config.txt").read_text()
    assert "gpio=23=op,dh" in boot and "gpio=17" not in boot and boot.count("# BEGIN tapshare") == 1


def test_a_release_that_fails_its_health_check_is_rolled_back(tmp_path):
    root = fake_pi(tmp_path)
    assert deploy(root, release="r1").returncode == 0
    r = deploy(root, release="r2", health="false")
    assert r.returncode == 3 and "rolling back to releases/r1" in r.stdout and "runs again" in r.stdout
    assert os.readlink(root / "opt/tapshare/current") == "releases/r1"
    assert not (root / "opt/tapshare/releases/r2").exists()
    ok = deploy(root, release="r3")
    assert ok.returncode == 0 and os.readlink(root / "opt/tapshare/current") == "releases/r3"


def test_a_first_release_that_fails_waits_for_the_reboot_its_boot_settings_need_then_is_disabled(tmp_path):
    root = fake_pi(tmp_path)
    r = deploy(root, release="r1", health="false")       # boot settings just written: maybe the display needs them
    assert r.returncode == 3 and "starts at the next boot" in r.stdout
    assert os.readlink(root / "opt/tapshare/current") == "releases/r1" and not (root / "opt/tapshare/live").exists()
    again = deploy(root, release="r1", health="false")   # after the reboot, checked again: still failing
    assert again.returncode == 3 and "stopped and disabled" in again.stdout, again.stdout
    assert not (root / "opt/tapshare/current").exists() and not (root / "opt/tapshare/releases/r1").exists()
    assert "systemctl disable tapshare.service" in (root / "tapshare-deploy-stub.log").read_text()
    ok = deploy(root, release="r1")
    assert ok.returncode == 0 and "r1 is live" in ok.stdout


def test_old_releases_are_pruned_and_an_unchanged_lock_reuses_the_virtualenv(tmp_path):
    root = fake_pi(tmp_path)
    for rel in ("r1", "r2", "r3"):
        r = deploy(root, release=rel)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (root / "opt/tapshare/releases").iterdir()) == ["r2", "r3"]   # current + previous
    assert "removed old release r1" in r.stdout and "reusing the virtualenv" in r.stdout
    assert len(list((root / "opt/tapshare/venvs").iterdir())) == 1
    assert (root / "tapshare-deploy-stub.log").read_text().count("-m venv") == 1


def test_the_pin_factory_and_display_overlay_follow_the_config(tmp_path):
    root = fake_pi(tmp_path)
    assert deploy(root).returncode == 0
    cfg = root / "etc/tapshare/config.toml"
    cfg.write_text(cfg.read_text().replace('pin_factory = "lgpio"', 'pin_factory = "rpigpio"')
                   .replace('display_overlay = ""', 'display_overlay = "vc4-kms-dsi-ili9881-7inch"'))
    assert deploy(root).returncode == 0
    assert "Environment=GPIOZERO_PIN_FACTORY=rpigpio" in (root / "etc/systemd/system/tapshare.service").read_text()
    boot = (root / "boot/firmware/config.txt").read_text()
    assert "dtoverlay=vc4-kms-dsi-ili9881-7inch\n# END tapshare" in boot


def test_a_malformed_config_is_refused_in_words(tmp_path):
    root = fake_pi(tmp_path)
    assert deploy(root).returncode == 0
    (root / "etc/tapshare/config.toml").write_text("[pins\nvalve = 17\n")
    r = deploy(root)
    assert r.returncode == 1 and "is not valid TOML" in r.stderr and "Traceback" not in r.stderr


def test_the_desktop_is_refused_with_the_reason_or_switched_off_on_request(tmp_path):
    root = fake_pi(tmp_path)
    dm = root / "etc/systemd/system/display-manager.service"
    dm.parent.mkdir(parents=True)
    dm.symlink_to("/lib/systemd/system/lightdm.service")
    r = deploy(root)
    assert r.returncode == 1 and "Raspberry Pi OS Desktop" in r.stderr and "--leave-desktop" in r.stderr
    assert not (root / "opt").exists()                                  # refused before it changed anything
    inside = deploy(root, "--leave-desktop", env={"DISPLAY": ":0"})
    assert inside.returncode == 1 and "from SSH or a" in inside.stderr
    r = deploy(root, "--leave-desktop")
    assert r.returncode == 0 and "switching the desktop off" in r.stdout and "multi-user.target" in r.stdout
    stub = (root / "tapshare-deploy-stub.log").read_text()
    assert "systemctl disable display-manager.service" in stub
    assert "systemctl set-default multi-user.target" in stub and "systemctl stop display-manager.service" in stub


def test_admin_commands_run_as_the_service_user(tmp_path):
    root = fake_pi(tmp_path)
    r = deploy(root, "--pin")
    assert r.returncode == 0
    stub = (root / "tapshare-deploy-stub.log").read_text()
    assert "runuser -u tapshare -- " in stub and "--set-maintenance-pin" in stub.split("runuser -u tapshare -- ")[1]


def test_a_dry_run_changes_nothing(tmp_path):
    root = fake_pi(tmp_path)
    before = snapshot(root)
    r = deploy(root, "--dry-run")
    assert r.returncode == 0 and "would" in r.stdout and "dry run" in r.stdout
    assert snapshot(root) == before and not (root / "opt").exists()


# ---------------------------------------------------------------- systemd notify and watchdog

def listen(tmp_path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    return sock


def test_the_watchdog_is_fed_only_while_every_beat_moves(tmp_path, monkeypatch):
    sock = listen(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    counters = {"core": 0, "ui": 0}
    wd = systemd.Watchdog({"core": lambda: counters["core"], "ui": lambda: counters["ui"],
                           "absent": lambda: None}, 0.05)
    wd.start()
    for _ in range(6):
        counters["core"] += 1
        counters["ui"] += 1
        time.sleep(0.05)
    fed = wd.fed
    assert fed >= 3 and sock.recv(100) == b"WATCHDOG=1"
    for _ in range(6):                         # the UI froze: no more feeding
        counters["core"] += 1
        time.sleep(0.05)
    assert wd.fed <= fed + 1
    wd.stop()
    sock.close()


def test_main_tells_systemd_ready_and_feeds_the_watchdog(tmp_path):
    sock = listen(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--simulate", "--headless", "--data-dir",
                             str(tmp_path / "data"), "--sessions", "1", "--pour-ms", "300:400",
                             "--pause-ms", "100:200"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b"STOPPING=1" not in got:
            try:
                got.append(sock.recv(100))
            except TimeoutError:
                break
    finally:
        proc.wait(30)
        sock.close()
    assert got[0].startswith(b"READY=1\nSTATUS=serving: first frame drawn, ledger written as ")
    assert b"WATCHDOG=1" in got and got[-1] == b"STOPPING=1"
    assert proc.returncode == 0


def test_a_restart_storm_reboots_the_pi_at_most_three_times_an_hour(tmp_path):
    root = fake_pi(tmp_path)
    assert deploy(root).returncode == 0
    escalate = root / "usr/local/lib/tapshare/escalate"
    assert "ExecStart=/usr/local/lib/tapshare/escalate" in (root / "etc/systemd/system/tapshare-escalate.service"
                                                             ).read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/reboots.log\n")
    (bin_dir / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TAPSHARE_ESCALATE_STATE": str(tmp_path / "st/r")}
    outs = [subprocess.run([str(escalate)], env=env, capture_output=True, text=True, timeout=10) for _ in range(4)]
    assert all(o.returncode == 0 for o in outs)
    assert (tmp_path / "reboots.log").read_text().splitlines() == ["reboot"] * 3
    assert "no more reboots, the valve stays closed" in outs[3].stderr
    # an update on trial that crashes is the applier's to roll back: no reboot for it, none counted
    (tmp_path / "st/r").unlink()
    (tmp_path / "trial.json").write_text("{}")
    out = subprocess.run([str(escalate)], env={**env, "TAPSHARE_ESCALATE_TRIAL": str(tmp_path / "trial.json")},
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and "not rebooting" in out.stderr
    assert (tmp_path / "reboots.log").read_text().splitlines() == ["reboot"] * 3 and not (tmp_path / "st/r").exists()
    # nor while deploy.sh (alive) checks a release it just installed: it rolls that back itself
    deploying = subprocess.Popen(["bash", "-c", "sleep 30; exit 0", "deploy.sh"])   # (no exec: bash stays)
    try:
        (tmp_path / "deploying.pid").write_text(f"{deploying.pid}\n")
        env["TAPSHARE_ESCALATE_DEPLOYING"] = str(tmp_path / "deploying.pid")
        out = subprocess.run([str(escalate)], env=env, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0 and "deploy.sh rolls it back; not rebooting" in out.stderr
        assert not (tmp_path / "st/r").exists()
    finally:
        deploying.kill()
        deploying.wait()
    # a PID file left behind (deploy.sh gone, its PID free or another process's), or an empty one, stops nothing
    for pid in (str(deploying.pid), str(os.getpid()), "", "0"):
        (tmp_path / "deploying.pid").write_text(pid + "\n")
        out = subprocess.run([str(escalate)], env=env, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0 and "keeps failing to start: rebooting" in out.stderr, (pid, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr                          # nothing else said
        (tmp_path / "st/r").unlink()
    assert (tmp_path / "reboots.log").read_text().splitlines() == ["reboot"] * 7
