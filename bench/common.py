"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def wait_until(pred: Callable[[], bool], timeout_s: float = 30.0, step_s: float = 0.0005) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step_s)
    return bool(pred())


def start_cloud(data_dir, port: int, preexec_fn=None):
    """``python -m cloud serve`` as its own process (SQLite in data_dir); returns it once it accepts."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    # the load generator is one address standing for thousands of phones: lift the per-network scan limit
    env = {**os.environ, "TAPSHARE_SCANS_PER_MINUTE_PER_NETWORK": "1000000",
           "TAPSHARE_SCANS_PER_MINUTE_PER_MACHINE": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "cloud", "serve", "--port", str(port), "--data-dir",
                             str(data_dir), "--log-level", "warning"], cwd=root, preexec_fn=preexec_fn,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("the cloud did not start")


def stop_process(proc) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    import subprocess
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def enrol_machine(data_dir, base: str, machine_id: str, price_fen_per_l: int, operator: str = "bench"
                  ) -> tuple[dict, str]:
    """An admin (made with the cloud's CLI on ``data_dir``) enrols ``machine_id`` at the cloud at ``base``;
    returns the admin's headers and the machine's secret (hex)."""
    import subprocess
    import sys
    from pathlib import Path

    import requests
    root = Path(__file__).resolve().parent.parent
    admin = subprocess.run([sys.executable, "-m", "cloud", "create-operator", operator, "--role", "admin",
                            "--data-dir", str(data_dir)], cwd=root, capture_output=True, text=True,
                           check=True).stdout.strip()
    h = {"Authorization": f"Bearer {admin}"}
    r = requests.post(base + "/api/v1/operator/machines", headers=h, timeout=10,
                      json={"machine_id": machine_id, "price_fen_per_l": price_fen_per_l})
    r.raise_for_status()
    r = requests.post(base + "/device/v1/enroll", timeout=10,
                      json={"machine_id": machine_id, "enrolment_token": r.json()["enrolment_token"]})
    r.raise_for_status()
    return h, r.json()["secret_hex"]
