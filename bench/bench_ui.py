"""The kiosk UI under Xvfb (Mesa's software renderer), beside a bare Kivy window (one Label) measured the
same way in the same run:

* start to first QR code on screen (process start -> the QR texture is shown),
* idle CPU (% of one core over --window-s seconds, after 5 s to settle) and resident memory,
* frame draw time while dispensing (on_draw -> on_flip, p50/p99/max) and the frame count.

The kiosk runs as on a Pi: main.py with simulated hardware, its window, linked to a separate cloud
process (the cloud is not in the kiosk's memory). Prints a table.

    .venv/bin/python bench/bench_ui.py [--window-s 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import enrol_machine, free_port, pct, start_cloud, stop_process  # noqa: E402
from tests.xvfb import Xvfb  # noqa: E402

BARE = """
import os, sys
os.environ["KIVY_NO_ARGS"] = "1"
from kivy.config import Config
Config.set("graphics", "width", "800"); Config.set("graphics", "height", "528")
Config.set("graphics", "maxfps", "30")
from kivy.app import App
from kivy.uix.label import Label
class Bare(App):
    def build(self):
        return Label(text="Tapshare")
Bare().run()
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def idle_figures(pid: int, window_s: float) -> tuple[float, float]:
    time.sleep(5)
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(window_s)
    c1, t1 = cpu_s(pid), time.monotonic()
    return 100 * (c1 - c0) / (t1 - t0), rss_mb(pid)


def bare_window_figures(env: dict, tmp: Path, window_s: float) -> tuple[float, float]:
    """Idle CPU and memory of a bare Kivy window (one Label), measured as the kiosk is."""
    bare_py = tmp / "bare_window.py"             # Kivy's App needs a source file
    bare_py.write_text(BARE)
    bare = subprocess.Popen([sys.executable, str(bare_py)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    figures = idle_figures(bare.pid, window_s)
    stop_process(bare)
    return figures


def start_kiosk(tmp: Path, base: str, secret: str, env: dict, stats: Path) -> tuple[subprocess.Popen, float]:
    """main.py with simulated hardware and its window, linked to the cloud; returns it once its first QR code
    is on screen, with the seconds that took from the process's start."""
    data = tmp / "kiosk"
    from sync.secret import write_secret
    cfg_file = tmp / "kiosk.toml"
    cfg_file.write_text(f'[machine]\nid = "BENCH-1"\n\n[cloud]\nurl = "{base}"\n\n[paths]\n'
                        f'data_dir = "{data}"\n')
    from kiosk.config import load
    write_secret(load(cfg_file).secret_path, bytes.fromhex(secret))
    started = time.monotonic()
    kiosk = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--simulate", "--config", str(cfg_file)],
                             env={**env, "TAPSHARE_UI_STATS": str(stats)}, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_qr = threading.Event()
    qr_at: list[float] = []

    log_lines: list[str] = []

    def read() -> None:
        for line in kiosk.stderr:
            log_lines.append(line)
            if "QR code on screen" in line and not qr_at:
                qr_at.append(time.monotonic() - started)
                first_qr.set()
    threading.Thread(target=read, daemon=True).start()
    if not first_qr.wait(90):
        raise RuntimeError("the kiosk never showed a QR code:\n" + "".join(log_lines[-30:]))
    if os.environ.get("BENCH_UI_LOG"):
        print("".join(log_lines))
    return kiosk, qr_at[0]


def pour_from_a_phone(base: str, h: dict, secret: str, pour_s: float) -> None:
    """A user scans the machine's code, starts a session, and stops it after ``pour_s`` seconds."""
    user = requests.post(base + "/api/v1/dev/users", headers=h, timeout=10,
                         json={"phone": "13800009999", "balance_fen": 10_000}).json()
    uh = {"Authorization": f"Bearer {user['token']}"}
    import contract as p
    code = p.qr_code(bytes.fromhex(secret), "BENCH-1", time.time_ns() // 10**9)
    scan = requests.get(base + "/api/v1/scan", params={"machine": "BENCH-1", "c": code}, headers=uh,
                        timeout=10).json()
    sid = requests.post(base + "/api/v1/sessions", headers=uh, timeout=10, json={
        "presence_token": scan["presence_token"], "expected_price_fen_per_l": 200}).json()["session_id"]
    time.sleep(pour_s)
    requests.post(base + f"/api/v1/sessions/{sid}/stop", headers=uh, timeout=10)


def print_table(bare: tuple[float, float], kiosk: tuple[float, float], after_rss: float, first_qr_s: float,
                draw: list[float], window_s: float, pour_s: float) -> None:
    (bare_cpu, bare_rss), (kiosk_cpu, kiosk_rss) = bare, kiosk
    print(f"{'':28}{'bare Kivy window':>18}{'Tapshare kiosk':>18}")
    print(f"{'idle CPU, % of one core':28}{bare_cpu:>18.2f}{kiosk_cpu:>18.2f}   (over {window_s:.0f} s)")
    print(f"{'resident memory, MB':28}{bare_rss:>18.1f}{kiosk_rss:>18.1f}   (+{kiosk_rss - bare_rss:.1f} MB)")
    print(f"{'memory after a session, MB':28}{'':>18}{after_rss:>18.1f}   (+{after_rss - bare_rss:.1f} MB: every "
          "screen and font size loaded)")
    print(f"start to first QR on screen: {first_qr_s:.2f} s")
    if draw:
        print(f"frame draw while dispensing: {len(draw)} frames in {pour_s:.0f} s, p50 {pct(draw, 0.5):.2f} ms, "
              f"p99 {pct(draw, 0.99):.2f} ms, max {max(draw):.2f} ms")
    else:
        print("frame draw while dispensing: no frames recorded")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window-s", type=float, default=60)
    ap.add_argument("--pour-s", type=float, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    with Xvfb() as x:
        env = x.env(KIVY_HOME=str(tmp / "kivy"))
        bare = bare_window_figures(env, tmp, args.window_s)
        # ------------------------------------------------ a cloud, this machine enrolled, the kiosk linked to it
        port = free_port()
        cloud = start_cloud(tmp / "cloud", port)
        try:
            base = f"http://127.0.0.1:{port}"
            h, secret = enrol_machine(tmp / "cloud", base, "BENCH-1", 200)
            stats = tmp / "ui-stats.json"
            kiosk, first_qr_s = start_kiosk(tmp, base, secret, env, stats)
            kiosk_figures = idle_figures(kiosk.pid, args.window_s)
            # ------------------------------------------------ one pour, to time frames while dispensing
            pour_from_a_phone(base, h, secret, args.pour_s)
            time.sleep(2)
            after_rss = rss_mb(kiosk.pid)
            kiosk.send_signal(signal.SIGTERM)
            kiosk.wait(20)
            draw = json.loads(stats.read_text())["draw_ms"]
        finally:
            stop_process(cloud)
    print_table(bare, kiosk_figures, after_rss, first_qr_s, draw, args.window_s, args.pour_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
