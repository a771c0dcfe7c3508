"""SIGKILL the running simulated dispenser many times; print what boot recovery found.

    .venv/bin/python bench/bench_crash.py [--rounds 600] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiosk import config as config_mod
from tests.crashkit import bound_pulses, run_many, write_config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        results = run_many(Path(d), args.rounds, args.workers, args.seed)
        elapsed = time.monotonic() - t0
        cfg = config_mod.load(write_config(Path(d) / "probe"))
    problems = [p for r in results for p in r.problems]
    unbilled = sorted(v for r in results for v in r.unbilled.values())
    cal_ml = 1000 / cfg.flow.pulses_per_litre
    print(f"rounds: {len(results)} SIGKILLs in {elapsed:.0f} s ({args.workers} machines)")
    print(f"killed mid-session: {sum(r.killed_mid_session for r in results)}; sessions recovered at boot: "
          f"{sum(len(r.recovered) for r in results)}; sessions completed between kills: "
          f"{sum(len(r.ended) for r in results)}")
    if unbilled:
        worst = unbilled[-1]
        print(f"unbilled after recovery (metered - billed): max {worst} pulses ({worst * cal_ml:.1f} ml), "
              f"p50 {unbilled[len(unbilled) // 2]} pulses; bound (one checkpoint at max flow): "
              f"{bound_pulses(cfg)} pulses")
    print(f"lost ended sessions, double reports, open sessions after recovery: {len(problems)} problems")
    for p in problems[:20]:
        print("  ", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
