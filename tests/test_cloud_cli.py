"""python -m cloud's administrative commands."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cloud", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_create_operator_and_dev_user(tmp_path):
    op = run("create-operator", "alice", "--role", "admin", "--data-dir", str(tmp_path))
    assert op.returncode == 0 and len(op.stdout.strip()) >= 40
    user = run("dev-user", "--phone", "13812345678", "--balance-fen", "500", "--data-dir", str(tmp_path))
    assert user.returncode == 0 and user.stdout.startswith("user u-")
    bad = run("dev-user", "--phone", "123", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "phone" in bad.stderr
    prod = run("dev-user", "--phone", "13812345679", "--data-dir", str(tmp_path), env={"TAPSHARE_PRODUCTION": "1"})
    assert prod.returncode == 1 and "production mode" in prod.stderr


def test_new_key_is_32_random_bytes():
    a, b = run("new-key").stdout.strip(), run("new-key").stdout.strip()
    assert len(bytes.fromhex(a)) == 32 and a != b


def test_a_bad_setting_stops_start_up_naming_its_variable(tmp_path):
    """Every setting is validated in one place; a bad value is refused before anything starts, in words."""
    for var, value, words in [("TAPSHARE_OPERATOR_TOKEN_DAYS", "ninety", "whole number from 1 to 36500"),
                              ("TAPSHARE_HEADER_TIMEOUT_S", "0", "from 1 to 600"),
                              ("TAPSHARE_SCANS_PER_MINUTE_PER_NETWORK", "-5", "from 1 to 100000000"),
                              ("TAPSHARE_PRODUCTION", "yes", "1 (on) or 0 (off)"),
                              ("TAPSHARE_PUBLIC_URL", "water.example", "http:// or https://"),
                              ("TAPSHARE_ID_VERIFY", "auto", "manual or dev_auto")]:
        r = run("serve", "--port", "1", "--data-dir", str(tmp_path), env={var: value})
        assert r.returncode == 2, (var, r.stderr)
        assert f"error: {var}: " in r.stderr and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_production_mode_refuses_to_start_in_words(tmp_path):
    r = run("serve", "--port", "1", "--data-dir", str(tmp_path),
            env={"TAPSHARE_PRODUCTION": "1", "TAPSHARE_CLOUD_KEY": "11" * 32, "TAPSHARE_PUBLIC_URL": "https://w.example"})
    assert r.returncode == 2 and "production mode refuses to start" in r.stderr and "Traceback" not in r.stderr
