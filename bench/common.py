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
