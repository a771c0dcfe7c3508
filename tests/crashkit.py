"""Kill a running simulated dispenser with SIGKILL at random points, then check boot recovery.

Shared by ``tests/test_crash.py`` (200 kills in the suite) and ``bench/bench_crash.py`` (more).
The child runs ``main.py --simulate --headless --trace``; its JSON lines say which sessions started,
what the core had metered (printed *before* each ledger write) and which ends were committed.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.config import Config
from kiosk.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
FLOW_MAX_ML_PER_MIN = 9_000
CONFIG = """
[machine]
id = "CRASH-1"
[flow]
checkpoint_interval_ms = 50
sample_interval_ms = 5
overrun_window_ms = 100
[limits]
max_idle_ms = 500
[screen]
receipt_display_ms = 1000
"""


@dataclass
class RoundResult:
    started: set[str] = field(default_factory=set)
    ended: dict[str, tuple[int, int]] = field(default_factory=dict)   # id -> (billed pulses, cost fen)
    metered: dict[str, int] = field(default_factory=dict)             # id -> the core's last billed count
    recovered: dict[str, int] = field(default_factory=dict)           # id -> billed pulses after recovery
    unbilled: dict[str, int] = field(default_factory=dict)            # id -> metered minus billed pulses
    killed_mid_session: bool = False
    problems: list[str] = field(default_factory=list)


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "tapshare.toml"
    cfg.write_text(CONFIG + f'[paths]\ndata_dir = "{folder}"\n')
    return cfg


def bound_pulses(cfg: Config) -> int:
    """At most one checkpoint interval (plus the sampling slack) of flow at the fastest simulated rate."""
    per_ms = FLOW_MAX_ML_PER_MIN * 1.15 / 60_000 * cfg.flow.pulses_per_litre / 1000   # +15 %: meter noise
    return math.ceil((cfg.flow.checkpoint_interval_ms + 2 * cfg.flow.sample_interval_ms) * per_ms) + 1


def run_round(folder: Path, rng: random.Random, kill_after_s: tuple[float, float] = (0.05, 0.8)) -> RoundResult:
    cfg_path = write_config(folder)
    res = RoundResult()
    cmd = [sys.executable, str(ROOT / "main.py"), "--config", str(cfg_path), "--simulate", "--headless", "--trace",
           "--log-level", "ERROR", "--pour-ms", "50:300", "--pause-ms", "0:30",
           "--flow-ml-per-min", f"5000:{FLOW_MAX_ML_PER_MIN}", "--seed", str(rng.randrange(1 << 30))]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    ready = threading.Event()
    lines: list[dict] = []

    def reader() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue          # a line cut by the kill
            lines.append(rec)
            if rec["t"] == "ready":
                ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if not ready.wait(15):
        child.kill()
        res.problems.append("child never became ready")
        return res
    time.sleep(rng.uniform(*kill_after_s))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    t.join(5)
    current = None
    for rec in lines:
        if rec["t"] == "started":
            res.started.add(rec["session"])
            current = rec["session"]
        elif rec["t"] == "pulses":
            res.metered[rec["session"]] = rec["billed"]
        elif rec["t"] == "ended":
            res.ended[rec["session"]] = (rec["billed"], rec["cost_fen"])
            current = None
    res.killed_mid_session = current is not None
    check(folder, res)
    return res


def check(folder: Path, res: RoundResult) -> None:
    from kiosk import config as config_mod
    cfg = config_mod.load(folder / "tapshare.toml")
    ledger = Ledger.open(cfg.db_path, machine_id=cfg.machine.id, wall_clock=lambda: int(time.time() * 1000))
    try:
        before_open = {s["session_id"] for s in ledger.sessions("open")}
        for r in ledger.recover_open_sessions():        # exactly what the next boot does
            res.recovered[r.session_id] = r.billed_pulses
        if set(res.recovered) != before_open:
            res.problems.append(f"recovery closed {sorted(res.recovered)}, open were {sorted(before_open)}")
        if ledger.sessions("open"):
            res.problems.append("sessions still open after recovery")
        for sid in res.started:
            if ledger.session(sid) is None:
                res.problems.append(f"started session {sid} is not in the ledger")
        for sid, (billed, cost) in res.ended.items():
            s = ledger.session(sid)
            same = s is not None and (s["state"], s["recovered"], s["billed_pulses"], s["cost_fen"]) == \
                ("ended", 0, billed, cost)
            if not same:
                res.problems.append(f"ended session {sid} lost or changed: {s}")
        limit = bound_pulses(cfg)
        for sid, billed in res.recovered.items():
            metered = res.metered.get(sid, 0)
            res.unbilled[sid] = metered - billed
            if billed > metered:
                res.problems.append(f"{sid}: billed {billed} pulses but only {metered} were metered")
            if metered - billed > limit:
                res.problems.append(f"{sid}: {metered - billed} metered pulses unbilled (bound {limit})")
        reports: dict[str, int] = {}
        for row in ledger.db.query("SELECT payload FROM outbox WHERE kind = 'session_ended'"):
            sid = json.loads(row["payload"])["session_id"]
            reports[sid] = reports.get(sid, 0) + 1
        ended_ids = {s["session_id"] for s in ledger.sessions("ended")}
        if set(reports) != ended_ids or any(n != 1 for n in reports.values()):
            res.problems.append("every ended session must have exactly one report")
        billed_total = sum(s["billed_pulses"] for s in ledger.sessions("ended"))
        if ledger.totalizer_pulses() + bound_pulses(cfg) * len(res.recovered) < billed_total:
            res.problems.append(f"totalizer {ledger.totalizer_pulses()} below billed pulses {billed_total}")
    finally:
        ledger.close()


def run_many(base: Path, rounds: int, workers: int = 2, seed: int = 1) -> list[RoundResult]:
    """``rounds`` kill rounds split over ``workers`` machines (each its own data folder)."""
    results: list[RoundResult] = []
    lock = threading.Lock()

    def worker(i: int, n: int) -> None:
        rng = random.Random(seed * 1000 + i)
        for _ in range(n):
            r = run_round(base / f"machine-{i}", rng)
            with lock:
                results.append(r)

    per = [rounds // workers + (1 if i < rounds % workers else 0) for i in range(workers)]
    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(per)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results
