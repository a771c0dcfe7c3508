"""How fast is the dispensing core, and how fast can the ledger checkpoint on this machine?

    .venv/bin/python bench/bench_core.py [--sessions 2000] [--checkpoints 2000]

Prints: the pure core's cost per event (events/s) over realistic sessions (pulse samples every 5 ms,
ticks, checkpoints, stops); and the ledger's durable write rates on a real SQLite file
(WAL, synchronous=FULL): checkpoints/s and session ends (end + report in one transaction)/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiosk.events import Checkpoint, GrantReceived, LinkChanged, PulseCount, SessionEnded, StopPressed, Tick
from kiosk.ledger import Ledger
from kiosk.session import DispenserCore
from tests.core_harness import SETTINGS, grant


def bench_core(sessions: int) -> dict[str, float]:
    core = DispenserCore(SETTINGS)
    t, total, events = 0, 0, 0
    core.handle(LinkChanged(True), t)
    core.handle(PulseCount(0), t)
    start = time.perf_counter()
    for i in range(sessions):
        core.handle(GrantReceived(grant(f"b{i}", expires_at_ms=10**15)), t)
        events += 1
        for _ in range(400):                      # 2 s of flow sampled every 5 ms, 40 pulses/s
            t += 5
            if t % 25 == 0:
                total += 1
            core.handle(PulseCount(total), t)
            core.handle(Tick(), t)
            events += 2
        core.handle(StopPressed(), t)
        t += 1_100
        core.handle(Tick(), t)                    # settles: the bill is final
        t += 16_000
        core.handle(Tick(), t)                    # receipt times out
        events += 3
    elapsed = time.perf_counter() - start
    return {"events": events, "seconds": elapsed, "events_per_s": events / elapsed,
            "us_per_event": elapsed / events * 1e6}


def bench_ledger(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger.open(Path(d) / "ledger.db", machine_id="B1", wall_clock=lambda: int(time.time() * 1000))
        from tests.test_ledger import record, started
        ledger.start_session(started("cp"))
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            a = time.perf_counter()
            ledger.checkpoint(Checkpoint("cp", 1_000 + i * 250, i, 0, 11.0, True, totalizer_pulses=1))
            lat.append(time.perf_counter() - a)
        cp_s = time.perf_counter() - t0
        ends = max(50, n // 10)
        t0 = time.perf_counter()
        for i in range(ends):
            ledger.start_session(started(f"e{i}"))
            ledger.end_session(SessionEnded(record(f"e{i}")))
        end_s = time.perf_counter() - t0
        ledger.close()
    lat.sort()
    return {"checkpoints_per_s": n / cp_s, "checkpoint_p50_ms": statistics.median(lat) * 1000,
            "checkpoint_p99_ms": lat[int(len(lat) * 0.99)] * 1000, "sessions_start_end_per_s": ends / end_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=2_000)
    ap.add_argument("--checkpoints", type=int, default=2_000)
    args = ap.parse_args()
    core = bench_core(args.sessions)
    led = bench_ledger(args.checkpoints)
    print(f"core: {core['events']:,} events in {core['seconds']:.2f} s = {core['events_per_s']:,.0f} events/s "
          f"({core['us_per_event']:.1f} us/event)")
    print(f"ledger (WAL, synchronous=FULL): {led['checkpoints_per_s']:,.0f} checkpoints/s "
          f"(p50 {led['checkpoint_p50_ms']:.2f} ms, p99 {led['checkpoint_p99_ms']:.2f} ms); "
          f"{led['sessions_start_end_per_s']:,.0f} session start+end(+report)/s")
    need = 1000 / SETTINGS.checkpoint_interval_ms
    print(f"headroom: a session needs {need:.0f} checkpoints/s; this machine writes "
          f"{led['checkpoints_per_s'] / need:,.0f}x that")


if __name__ == "__main__":
    main()
