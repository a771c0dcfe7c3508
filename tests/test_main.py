"""main.py as a real process: signals, exit codes, clear errors, the admin commands."""

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from kiosk.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def fast(tmp_path) -> list[str]:
    """A config whose timeouts suit a test: a walk-away ends after 0.5 s without flow."""
    cfg = tmp_path / "fast.toml"
    cfg.write_text("[limits]\nmax_idle_ms = 500\n[flow]\noverrun_window_ms = 100\n[screen]\n"
                   "receipt_display_ms = 1000\n")
    return ["--config", str(cfg), "--data-dir", str(tmp_path)]


def test_print_config_is_valid_toml_with_every_key():
    out = run("--print-config")
    assert out.returncode == 0
    data = tomllib.loads(out.stdout)
    assert data["limits"]["max_duration_ms"] == 300_000 and data["pins"]["valve_active_high"] is True


def test_a_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[limits]\nmax_duration_ms = 900000\n")
    out = run("--config", str(cfg), "--simulate", "--headless")
    assert out.returncode == 2
    assert "configuration error: limits.max_duration_ms: must be at most 600000, got 900000" in out.stderr


def test_a_simulated_run_completes_its_sessions(tmp_path):
    out = run("--simulate", "--headless", *fast(tmp_path), "--sessions", "3", "--trace",
              "--pour-ms", "200:400", "--pause-ms", "0:50", "--seed", "3")
    assert out.returncode == 0, out.stderr
    ended = [json.loads(line) for line in out.stdout.splitlines() if '"ended"' in line]
    assert len(ended) == 3
    assert "stopped; valve closed" in out.stderr
    status = json.loads(run("--status", "--data-dir", str(tmp_path)).stdout)
    assert status["ended_sessions"] == 3 and status["open_sessions"] == [] and status["lockouts"] == {}
    assert status["totalizer_pulses"] >= sum(e["billed"] for e in ended)
    assert status["outbox_pending"] >= 4             # boot + three session reports


def test_sigterm_mid_session_ends_it_and_closes_the_valve(tmp_path):
    p = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--simulate", "--headless", "--data-dir",
                          str(tmp_path), "--trace", "--pour-ms", "5000:6000"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = None
    for line in p.stdout:
        rec = json.loads(line)
        if rec["t"] == "pulses" and rec["billed"] > 20:
            started = rec["session"]
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 0
    assert "signal SIGTERM: stopping" in err and "stopped; valve closed" in err
    ledger = Ledger.open(tmp_path / "ledger.db", machine_id="SIM-0001", wall_clock=lambda: 0, new_boot=False)
    s = ledger.session(started)
    assert s["state"] == "ended" and s["end_reason"] == "shutdown" and not s["recovered"]
    assert s["billed_pulses"] > 20


def test_a_corrupt_ledger_keeps_the_machine_out_of_service(tmp_path):
    (tmp_path / "ledger.db").write_bytes(b"\x00garbage" * 512)
    out = run("--simulate", "--headless", "--data-dir", str(tmp_path), "--sessions", "1", "--trace")
    assert out.returncode == 3
    assert "LEDGER UNAVAILABLE" in out.stderr and "corrupt or not a database" in out.stderr
    assert "valve opened" not in out.stderr
    ready = json.loads(out.stdout.splitlines()[0])
    assert ready["state"] == "out_of_service" and "corrupt" in ready["ledger_error"]
    status = run("--status", "--data-dir", str(tmp_path))
    assert status.returncode == 3 and "corrupt" in status.stderr


def test_clear_lockout_needs_an_active_lockout(tmp_path):
    run("--simulate", "--headless", *fast(tmp_path), "--sessions", "1", "--pour-ms", "50:60")
    out = run("--clear-lockout", "ghost_flow", "--data-dir", str(tmp_path))
    assert out.returncode == 1 and "no lockout 'ghost_flow'; active: none" in out.stderr
    ledger = Ledger.open(tmp_path / "ledger.db", machine_id="SIM-0001", wall_clock=lambda: int(time.time() * 1000))
    ledger.set_lockout("ghost_flow", True, "60 ml")
    ledger.close()
    out = run("--clear-lockout", "ghost_flow", "--actor", "tech-3", "--data-dir", str(tmp_path))
    assert out.returncode == 0 and "queued" in out.stdout
    # the next start applies it within a second
    out = run("--simulate", "--headless", *fast(tmp_path), "--sessions", "1", "--pour-ms", "50:60", "--trace")
    assert out.returncode == 0, out.stderr
    assert '"ended"' in out.stdout
    assert json.loads(run("--status", "--data-dir", str(tmp_path)).stdout)["lockouts"] == {}


def test_without_gpio_hardware_it_stays_out_of_service(tmp_path):
    p = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--headless", "--data-dir", str(tmp_path),
                          "--trace"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready = json.loads(p.stdout.readline())
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert ready["state"] == "out_of_service"
    assert "pin factory lgpio" in ready["hardware_error"]
    assert "HARDWARE UNAVAILABLE" in err and "stopped; valve closed" in err
    assert p.returncode == 4
    status = json.loads(run("--status", "--data-dir", str(tmp_path)).stdout)
    assert status["lockouts"] == {}           # a hardware fault is re-checked at every start, not stored


def test_set_maintenance_pin_on_a_fresh_ledger_needs_no_traceback(tmp_path):
    import os
    env = {**os.environ, "TAPSHARE_MAINTENANCE_PIN": "482913"}
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data-dir", str(tmp_path), "--set-maintenance-pin"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "maintenance PIN set" in out.stdout
    led = Ledger.open(tmp_path / "ledger.db", machine_id="x", wall_clock=lambda: 0, new_boot=False)
    try:
        stored = json.dumps(led.setting("maintenance_pin"))
        assert stored and "482913" not in stored               # the hash, never the PIN
        assert [e["kind"] for e in led.events("maintenance_pin_set")] == ["maintenance_pin_set"]
        assert led.outbox_depth() == 0                  # the CLI logs it; it cannot queue reports
    finally:
        led.close()
    weak = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data-dir", str(tmp_path), "--set-maintenance-pin"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "TAPSHARE_MAINTENANCE_PIN": "123456"})
    assert weak.returncode != 0 and "Traceback" not in weak.stderr and "error:" in weak.stderr
    env = {k: v for k, v in os.environ.items() if k != "TAPSHARE_MAINTENANCE_PIN"}
    none = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data-dir", str(tmp_path), "--set-maintenance-pin"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          start_new_session=True)                        # no terminal to ask on
    assert none.returncode == 2 and "Traceback" not in none.stderr and "TAPSHARE_MAINTENANCE_PIN" in none.stderr


def test_root_refuses_to_touch_the_service_users_ledger(tmp_path):
    """As root, an admin command in a data dir that belongs to another user (the service's) is refused before it
    creates a ledger, a -wal or a -shm that would then be root's and lock the service out ("readonly database")."""
    import os

    import pytest
    if os.geteuid() != 0:
        pytest.skip("needs root (CI and test.sh's set-up run as root)")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)
    for args in (["--status"], ["--clear-lockout", "ghost_flow"], ["--set-maintenance-pin"]):
        r = run("--data-dir", str(data), *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "belongs to nobody" in r.stderr and "sudo -u nobody" in r.stderr and "Traceback" not in r.stderr
        assert list(data.iterdir()) == []
    os.chown(data, 0, 0)                                           # root's own data dir: allowed
    assert run("--data-dir", str(data), "--status").returncode == 0
