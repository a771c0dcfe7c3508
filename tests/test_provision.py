"""Provisioning a dispenser with a real cloud, and the dispenser process serving a phone through it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sync.secret import SecretFileError, read_secret, write_secret
from tests.cloudkit import CloudServer

ROOT = Path(__file__).resolve().parent.parent


def test_secret_files_are_private(tmp_path):
    path = tmp_path / "device.secret"
    write_secret(path, bytes(range(32)))
    assert oct(path.stat().st_mode & 0o777) == "0o600" and read_secret(path) == bytes(range(32))
    with pytest.raises(SecretFileError, match="already provisioned"):
        write_secret(path, bytes(32))
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="readable by others"):
        read_secret(path)
    os.chmod(path, 0o600)
    path.write_text("not hex")
    with pytest.raises(SecretFileError, match="hex"):
        read_secret(path)
    assert read_secret(tmp_path / "missing") is None


def test_provision_then_serve_a_phone_through_the_cloud(tmp_path):
    with CloudServer(tmp_path / "cloud") as cloud:
        r = cloud.op("POST", "/api/v1/operator/machines", json={"machine_id": "P1", "price_fen_per_l": 200})
        token = r.json()["enrolment_token"]
        cfg = tmp_path / "tapshare.toml"
        cfg.write_text(f'[machine]\nid = "P1"\n[cloud]\nurl = "{cloud.url}"\npoll_wait_ms = 2000\n'
                       f'heartbeat_interval_ms = 1000\n[paths]\ndata_dir = "{tmp_path / "d"}"\n'
                       '[flow]\noverrun_window_ms = 100\n')
        main = [sys.executable, str(ROOT / "main.py"), "--config", str(cfg)]
        out = subprocess.run([*main, "--provision", token], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert oct((tmp_path / "d" / "device.secret").stat().st_mode & 0o777) == "0o600"
        again = subprocess.run([*main, "--provision", token], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already provisioned" in again.stderr
        proc = subprocess.Popen([*main, "--simulate", "--headless", "--trace"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert json.loads(proc.stdout.readline())["t"] == "ready"
            user = cloud.user("13600000001", balance_fen=1_000)
            deadline = time.time() + 20
            while time.time() < deadline:
                machines = cloud.op("GET", "/api/v1/operator/machines").json()["machines"]
                if machines[0]["heartbeat"] and machines[0]["online"]:
                    break
                time.sleep(0.2)
            import contract as p
            secret = bytes.fromhex((tmp_path / "d" / "device.secret").read_text().strip())
            scan = user.scan("P1", p.qr_code(secret, "P1", int(time.time())))
            start = user.start(scan.json()["presence_token"])
            assert start.status_code == 200, start.text
            sid = start.json()["session_id"]
            for line in proc.stdout:
                rec = json.loads(line)
                if rec["t"] == "pulses" and rec["billed"] >= 20:
                    break
            assert rec["session"] == sid
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert "cloud link to" in err and "stopped; valve closed" in err
        deadline = time.time() + 20
        state = None
        while time.time() < deadline:
            state = user.call("GET", f"/api/v1/sessions/{sid}").json()["state"]
            if state == "ended":
                break
            time.sleep(0.2)
        assert state == "ended"        # the SIGTERM ended the session and its report went out before exit
        bill = user.call("GET", f"/api/v1/sessions/{sid}").json()
        assert bill["end_reason"] == "shutdown" and bill["bill"]["volume_ml"] > 0
        assert requests.get(cloud.url + "/healthz", timeout=5).ok
