"""Runs every benchmark script and prints one table of the figures that matter (and writes it, with each
script's full output, to bench/out/). ``--quick`` uses smaller runs (minutes instead of most of an hour).

    .venv/bin/python bench/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"

# script, full arguments, quick arguments, and the figures: (what, regex on its output, format)
BENCHES = [
    ("bench_core.py", [], ["--sessions", "500", "--checkpoints", "500"], [
        ("core throughput", r"= ([\d,]+) events/s", "{} events/s"),
        ("ledger checkpoints (WAL, synchronous=FULL)", r"([\d,]+) checkpoints/s", "{} /s"),
    ]),
    ("bench_hal.py", [], ["--seconds", "1.5", "--presses", "60"], [
        ("pulses lost at 2 kHz", r"2000 Hz: .*?lost (\d+)", "{}"),
        ("stop button -> valve closed, p99", r"stop button edge -> valve pin inactive: .*?p99 ([\d.]+) ms", "{} ms"),
        ("credit limit -> valve closed, p99 (over-credit window)",
         r"credit-limit pulse -> valve pin inactive: .*?p99 ([\d.]+) ms", "{} ms"),
    ]),
    ("bench_crash.py", [], ["--rounds", "60"], [
        ("crash recovery: problems (lost or double-billed)", r"(\d+) problems", "{}"),
        ("crash recovery: most unbilled after SIGKILL",
         r"unbilled after recovery .*?max (\d+ pulses \([\d.]+ ml\))", "{}"),
    ]),
    ("bench_sync.py", [], ["--backlog", "2000", "--sessions", "60"], [
        ("scan-to-valve (phone start -> valve pin high), p50/p99",
         r"phone start -> valve pin high: p50 ([\d.]+) ms, p99 ([\d.]+) ms", "{} / {} ms"),
        ("outbox drain rate", r"= ([\d,]+) events/s", "{} reports/s"),
    ]),
    ("bench_cloud.py", [], ["--machines", "100", "1000", "--seconds", "15", "--rate", "30"], [
        ("cloud: phone start -> command at the dispenser, by fleet size",
         r"N=\s*(\d+): .*?p50 ([\d.]+) ms, p99 ([\d.]+) ms", "N={}: p50 {} ms, p99 {} ms"),
        ("cloud: machine status polled by phones at machines (1/s each), alongside",
         r"status polls from (\d+) phones .*?: (\d+), p50 ([\d.]+) ms, p99 ([\d.]+) ms",
         "{} phones, {} polls: p50 {} ms, p99 {} ms"),
    ]),
    ("bench_faults.py", [], ["--outage-s", "10"], [
        ("fault suite: sessions lost, billed twice or left holding money",
         r"(\d+) faults, (\d+) sessions lost, billed twice or left holding money",
         "{1} in {0} faults (table: bench/out/bench_faults.py.txt)"),
    ]),
    ("bench_ui.py", [], ["--window-s", "20", "--pour-s", "5"], [
        ("kiosk idle CPU (bare Kivy window, kiosk)", r"idle CPU, % of one core\s+([\d.]+)\s+([\d.]+)", "{} % / {} %"),
        ("kiosk memory (bare window, kiosk)", r"resident memory, MB\s+([\d.]+)\s+([\d.]+)", "{} MB / {} MB"),
        ("start to first QR on screen", r"first QR on screen: ([\d.]+) s", "{} s"),
    ]),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", help="run only these scripts (e.g. bench_core.py)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []
    for script, full, quick, figures in BENCHES:
        if args.only and script not in args.only:
            continue
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *(quick if args.quick else full)],
                           cwd=ROOT, capture_output=True, text=True)
        text = r.stdout + r.stderr
        (OUT / f"{script}.txt").write_text(text)
        print(f"{script}: exit {r.returncode} in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        for what, pattern, fmt in figures:
            found = re.findall(pattern, r.stdout)
            if not found:
                rows.append((what, f"not found (see bench/out/{script}.txt)"))
                continue
            for match in (found if isinstance(found[0], tuple) and "N=" in fmt else found[:1]):
                groups = match if isinstance(match, tuple) else (match,)
                rows.append((what, fmt.format(*groups)))
    width = max(len(w) for w, _ in rows) if rows else 10
    header = (f"Tapshare benchmarks, {dt.date.today().isoformat()}, {platform.node()} ({platform.machine()}, "
              f"Python {platform.python_version()}){' --quick' if args.quick else ''}")
    lines = [header, "", f"| {'what'.ljust(width)} | figure |", f"| {'-' * width} | --- |"]
    lines += [f"| {w.ljust(width)} | {f} |" for w, f in rows]
    table = "\n".join(lines)
    print(table)
    (OUT / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
