"""Soak: the real dispenser for thousands of sessions, to show that nothing in it grows without bound.

The app is ``main.py --simulate`` (simulated hardware, the same core, ledger, sync link and, unless
``--headless``, its Kivy window under Xvfb), linked to a real cloud (``python -m cloud serve``, its own process,
SQLite) on loopback. Simulated people start every session from a "phone" (scan the machine's code, start, pour,
stop from the phone), at an accelerated rate (short pours, a 1 s receipt, a short overrun window), one after
another; ``--driver sim`` uses main.py's own simulated users instead (no cloud, no link).

Sampled from outside, every ``--sample-s``: the kiosk's and the cloud's resident memory, threads and file
descriptors; the ledger's and its WAL's size. From inside the kiosk (its opt-in diagnostics, kiosk/diag.py,
``TAPSHARE_DIAG_FILE``): Python's traced heap (tracemalloc), Kivy's live textures and caches, the core's and the
sync link's long-lived collections. Halfway through warm-up (``--warmup`` sessions) the kiosk is sent SIGUSR1,
which takes the tracemalloc baseline (the snapshot's own memory settles before warm-up ends); at the end the
sites that grew most since then are printed.

Prints each figure's growth per 1,000 sessions after warm-up (least squares over the samples), for the first and
the second half of that span (a plateau shows as a second half near zero), and the top growing allocation sites.
Samples go to ``<out>/soak-samples.json`` and the diagnostics' lines to ``<out>/diag.jsonl``.

    .venv/bin/python bench/bench_soak.py                         # 5,000 sessions, window under Xvfb
    .venv/bin/python bench/bench_soak.py --sessions 600 --headless
    .venv/bin/python bench/bench_soak.py --hours 8               # as many sessions as 8 hours hold
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
from contextlib import ExitStack
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import enrol_machine, free_port, start_cloud, stop_process  # noqa: E402
from kiosk.diag import open_fds, rss_kb  # noqa: E402

MACHINE = "SOAK-1"
PRICE_FEN_PER_L = 200


def threads_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def size_kb(path: Path) -> float:
    try:
        return path.stat().st_size / 1024
    except OSError:
        return 0.0


# ------------------------------------------------------------------ the cloud and the machine
def kiosk_config(tmp: Path, base: str, args: argparse.Namespace) -> Path:
    """Accelerated timers: a 1 s receipt, a short overrun window, a heartbeat every 5 s (all within the
    config's documented bounds)."""
    cfg = tmp / "kiosk.toml"
    cfg.write_text(f'[machine]\nid = "{MACHINE}"\n\n[cloud]\nurl = "{base}"\nheartbeat_interval_ms = 5000\n\n'
                   f'[pricing]\ndisplay_price_fen_per_l = {PRICE_FEN_PER_L}\n\n'
                   f'[screen]\nreceipt_display_ms = 1000\n\n[flow]\noverrun_window_ms = {args.overrun_ms}\n\n'
                   f'[paths]\ndata_dir = "{tmp / "kiosk"}"\n')
    return cfg


def start_kiosk(tmp: Path, cfg: Path, env: dict, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "main.py"), "--simulate", "--config", str(cfg), "--log-level", "WARNING"]
    if args.headless:
        cmd.append("--headless")
    if args.driver == "sim":
        lo, hi = args.pour_ms
        cmd += ["--sessions", "0", "--pour-ms", f"{lo}:{hi}", "--pause-ms", "100:300", "--seed", "23"]
    diag_env = {"TAPSHARE_DIAG_FILE": str(tmp / "diag.jsonl"),
                "TAPSHARE_DIAG_INTERVAL_MS": str(int(args.sample_s * 1000)),
                "TAPSHARE_DIAG_TRACEMALLOC": str(args.tracemalloc)}
    log = open(tmp / "kiosk.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env={**env, **diag_env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)


class Phones:
    """People with phones at the machine, one after another: scan, start, pour ``pour_ms``, stop from the phone,
    wait for the bill."""

    def __init__(self, base: str, admin: dict, secret: str, pour_ms: tuple[int, int], people: int = 20,
                 seed: int = 23) -> None:
        import random
        self.base, self.secret = base, bytes.fromhex(secret)
        self.http = requests.Session()
        self.rng = random.Random(seed)
        self.pour_ms = pour_ms
        self.tokens = []
        for i in range(people):
            r = self.http.post(base + "/api/v1/dev/users", headers=admin, timeout=10,
                               json={"phone": f"1380000{i:04d}", "balance_fen": 10_000_000})
            r.raise_for_status()
            self.tokens.append(r.json()["token"])
        self.failures: dict[str, int] = {}

    def _fail(self, why: str) -> None:
        self.failures[why] = self.failures.get(why, 0) + 1

    def one(self) -> bool:
        import contract as p
        uh = {"Authorization": f"Bearer {self.rng.choice(self.tokens)}"}
        code = p.qr_code(self.secret, MACHINE, time.time_ns() // 10**9)
        r = self.http.get(self.base + "/api/v1/scan", params={"machine": MACHINE, "c": code}, headers=uh, timeout=10)
        if r.status_code != 200:
            self._fail(f"scan {r.status_code}")
            time.sleep(0.5)
            return False
        r = self.http.post(self.base + "/api/v1/sessions", headers=uh, timeout=10, json={
            "presence_token": r.json()["presence_token"], "expected_price_fen_per_l": PRICE_FEN_PER_L})
        if r.status_code != 200:
            self._fail(f"start {r.status_code} {r.json().get('code', '') if r.content else ''}")
            time.sleep(0.5)
            return False
        sid = r.json()["session_id"]
        if not self._wait(uh, sid, lambda s: s["state"] != "starting", 10):
            self._fail("never active")
        time.sleep(self.rng.uniform(*self.pour_ms) / 1000)
        self.http.post(self.base + f"/api/v1/sessions/{sid}/stop", headers=uh, timeout=10)
        if not self._wait(uh, sid, lambda s: s["state"] not in ("starting", "active"), 30):
            self._fail("never ended")
            return False
        return True

    def _wait(self, uh: dict, sid: str, pred, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.http.get(self.base + f"/api/v1/sessions/{sid}", headers=uh, timeout=10)
            if r.status_code == 200 and pred(r.json()):
                return True
            time.sleep(0.05)
        return False


def sim_sessions(tmp: Path) -> int:
    """Sessions main.py's own simulated users have ended (read from its ledger)."""
    import sqlite3
    try:
        con = sqlite3.connect(f"file:{tmp / 'kiosk' / 'ledger.db'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT count(*) FROM sessions WHERE state = 'ended'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


# ------------------------------------------------------------------ sampling
class Sampler(threading.Thread):
    def __init__(self, tmp: Path, kiosk: subprocess.Popen, cloud: subprocess.Popen | None, every_s: float,
                 sessions) -> None:
        super().__init__(daemon=True)
        self.tmp, self.kiosk, self.cloud, self.every_s, self.sessions = tmp, kiosk, cloud, every_s, sessions
        self.samples: list[dict] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict:
        k, led = self.kiosk.pid, self.tmp / "kiosk" / "ledger.db"
        s = {"t_s": round(time.monotonic() - self.t0, 1), "sessions": self.sessions(),
             "kiosk_rss_kb": rss_kb(k), "kiosk_threads": threads_of(k), "kiosk_fds": open_fds(k),
             "ledger_kb": round(size_kb(led), 1), "wal_kb": round(size_kb(Path(str(led) + "-wal")), 1)}
        if self.cloud is not None:
            c = self.cloud.pid
            s |= {"cloud_rss_kb": rss_kb(c), "cloud_threads": threads_of(c), "cloud_fds": open_fds(c),
                  "cloud_db_kb": round(sum(size_kb(f) for f in (self.tmp / "cloud").glob("*.db*")), 1)}
        return s

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            if self.kiosk.poll() is not None:
                return
            self.samples.append(self.sample())


def diag_lines(tmp: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (tmp / "diag.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def flatten(line: dict) -> dict[str, float]:
    """A diagnostics line's numbers, nested ones as ``provider.name``."""
    out: dict[str, float] = {}
    for k, v in line.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, dict):
            out |= {f"{k}.{n}": x for n, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
    return out


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def growth_rows(series: dict[str, list[tuple[float, float]]]) -> list[tuple[str, float, float, float | None,
                                                                           float | None, float | None]]:
    """(figure, at warm-up's end, at the end, per 1,000 sessions over all / first half / second half)."""
    rows = []
    for name, pts in series.items():
        pts = sorted(pts)
        if len(pts) < 3:
            continue
        mid = (pts[0][0] + pts[-1][0]) / 2
        first, second = [q for q in pts if q[0] <= mid], [q for q in pts if q[0] >= mid]
        per_k = [None if s is None else s * 1000 for s in (slope(pts), slope(first), slope(second))]
        rows.append((name, pts[0][1], pts[-1][1], *per_k))
    return rows


def fmt(v: float | None, unit_div: float = 1.0) -> str:
    return "-" if v is None else f"{v / unit_div:+.2f}" if abs(v / unit_div) < 100 else f"{v / unit_div:+.0f}"


def report(samples: list[dict], lines: list[dict], warmup: int, args: argparse.Namespace) -> None:
    after = [s for s in samples if s["sessions"] >= warmup]
    series: dict[str, list[tuple[float, float]]] = {}
    for s in after:
        for k, v in s.items():
            if k not in ("t_s", "sessions", "wall_ms"):
                series.setdefault(k, []).append((s["sessions"], v))
    # the diagnostics lines carry no session count: take the nearest sample's by time
    by_wall = sorted((s["wall_ms"], s["sessions"]) for s in samples if "wall_ms" in s)
    for line in lines:
        if not by_wall:
            break
        n = min(by_wall, key=lambda ws: abs(ws[0] - line["wall_ms"]))[1]
        if n < warmup:
            continue
        for k, v in flatten(line).items():
            if k in ("wall_ms", "mono_ms", "rss_kb", "threads", "fds", "traced_peak_kb") or k.startswith("gc_"):
                continue
            series.setdefault(f"diag.{k}", []).append((n, v))
    total = samples[-1]["sessions"] if samples else 0
    span = (samples[-1]["t_s"] if samples else 0) / 60
    print(f"\nsoak: {total} sessions in {span:.1f} min ({'headless' if args.headless else 'window under Xvfb'}, "
          f"driver {args.driver}); growth after warm-up ({warmup} sessions), least squares per 1,000 sessions")
    print(f"{'figure':34}{'at warm-up':>12}{'at end':>12}{'/1k all':>11}{'/1k 1st half':>14}{'/1k 2nd half':>14}")
    for name, a, b, all_k, first_k, second_k in growth_rows(series):
        kb = name.endswith("_kb")
        div = 1024 if kb else 1
        unit = " MB" if kb else ""
        print(f"{name + unit:34}{a / div:>12.2f}{b / div:>12.2f}{fmt(all_k, div):>11}{fmt(first_k, div):>14}"
              f"{fmt(second_k, div):>14}")
    growth = next((ln["growth"] for ln in reversed(lines) if ln.get("growth")), None)
    if growth:
        print("\ntop allocation sites that grew since warm-up (tracemalloc):")
        for g in growth[:12]:
            print(f"  {g['size_diff_kb']:>+9.1f} KB {g['count_diff']:>+8} blocks  {g['site']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=5_000)
    ap.add_argument("--hours", type=float, default=0, help="stop after this much wall time (0: no limit)")
    ap.add_argument("--warmup", type=int, default=0, help="sessions before the baseline (default: 10 %%, 50-300)")
    ap.add_argument("--headless", action="store_true", help="no window (the same core and threads)")
    ap.add_argument("--driver", choices=("phone", "sim"), default="phone")
    ap.add_argument("--pour-ms", type=lambda t: tuple(int(x) for x in t.split(":")), default=(300, 900))
    ap.add_argument("--overrun-ms", type=int, default=200)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--tracemalloc", type=int, default=1, help="frames per trace in the kiosk (0: off)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    warmup = args.warmup or max(50, min(300, args.sessions // 10))
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.hours * 3600 if args.hours else None
    done = [0]
    with ExitStack() as stack:
        env = {**os.environ, "KIVY_HOME": str(tmp / "kivy"), "KIVY_NO_ARGS": "1"}
        if not args.headless:
            from tests.xvfb import Xvfb
            env = stack.enter_context(Xvfb()).env(KIVY_HOME=str(tmp / "kivy"))
        cloud = phones = None
        base = "http://127.0.0.1:1"
        if args.driver == "phone":
            port = free_port()
            cloud = start_cloud(tmp / "cloud", port)
            stack.callback(stop_process, cloud)
            base = f"http://127.0.0.1:{port}"
            admin, secret = enrol_machine(tmp / "cloud", base, MACHINE, PRICE_FEN_PER_L, "soak")
            from kiosk.config import load
            from sync.secret import write_secret
            cfg = kiosk_config(tmp, base, args)
            write_secret(load(cfg).secret_path, bytes.fromhex(secret))
            phones = Phones(base, admin, secret, args.pour_ms)
        else:
            cfg = kiosk_config(tmp, base, args)
        kiosk = start_kiosk(tmp, cfg, env, args)
        stack.callback(stop_process, kiosk)
        count = (lambda: done[0]) if phones is not None else (lambda: sim_sessions(tmp))
        sampler = Sampler(tmp, kiosk, cloud, args.sample_s, count)
        marked, failed_in_a_row = False, 0
        started = time.monotonic()
        sampler.start()
        while count() < args.sessions and (deadline is None or time.monotonic() < deadline):
            if kiosk.poll() is not None:
                print("the kiosk exited:\n" + (tmp / "kiosk.log").read_text()[-3000:])
                return 1
            if phones is not None:
                if phones.one():
                    done[0] += 1
                    failed_in_a_row = 0
                else:
                    failed_in_a_row += 1
                if failed_in_a_row >= 50:               # a soak of a machine that serves nobody measures nothing
                    print(f"50 sessions in a row failed ({phones.failures}): the machine does not serve; its log:\n"
                          + (tmp / "kiosk.log").read_text()[-3000:])
                    return 1
            else:
                time.sleep(1)
            if not marked and count() >= warmup // 2:
                # the diagnostics take their tracemalloc baseline (its snapshot's memory settles before warm-up ends)
                marked = True
                kiosk.send_signal(signal.SIGUSR1)
            n = count()
            if n and n % 100 == 0 and phones is not None:
                print(f"  {n} sessions, {(time.monotonic() - started) / 60:.1f} min, kiosk RSS "
                      f"{rss_kb(kiosk.pid) / 1024:.1f} MB", flush=True)
        sampler.samples.append(sampler.sample())       # before the last snapshot, which costs memory itself
        sampler.halt.set()
        kiosk.send_signal(signal.SIGUSR1)              # the growth since the baseline
        deadline_s = time.monotonic() + 60
        while args.tracemalloc and time.monotonic() < deadline_s and \
                not any("growth" in ln for ln in diag_lines(tmp)):
            time.sleep(1)
        lines = diag_lines(tmp)
        for s in sampler.samples:                       # each sample's wall time, to place the diagnostics lines
            s["wall_ms"] = int(time.time() * 1000 - (time.monotonic() - sampler.t0 - s["t_s"]) * 1000)
        (out / "soak-samples.json").write_text(json.dumps(sampler.samples, indent=1))
        (out / "diag.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        if phones is not None and phones.failures:
            print(f"phone-side failures: {phones.failures}")
        report(sampler.samples, lines, warmup, args)
        print(f"\n(data in {tmp}; samples in {out / 'soak-samples.json'}; kiosk log {tmp / 'kiosk.log'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
