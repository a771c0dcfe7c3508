"""Opt-in diagnostics for soak runs: the process's own figures as JSON lines, every few seconds.

Off unless ``TAPSHARE_DIAG_FILE`` names a file. Then a thread appends one JSON line to it every
``TAPSHARE_DIAG_INTERVAL_MS`` (default 10,000), and one more at once on SIGUSR1 or :meth:`Diagnostics.mark`.
Each line has the wall time, resident memory, threads, open file descriptors, the garbage collector's counts
and, from every registered provider, the sizes of the long-lived collections it owns (the core's remembered
session ids, the sync link's command tables, Kivy's textures and caches: see README, "Bounded resources").

With ``TAPSHARE_DIAG_TRACEMALLOC=N`` (frames per trace, 1 is enough to name a line) Python's allocations are
traced from the start: each line then carries the traced total. The first SIGUSR1 (sent by ``bench/bench_soak.py``
when warm-up is over) takes a baseline snapshot; each later one adds the allocation sites that grew most since.
Tracing costs memory and time: it is for benchmarks, never for a machine in service.

This is runtime code (it reads clocks and /proc and writes a file); the pure core only answers
:meth:`~kiosk.session.DispenserCore.collection_sizes`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable

log = logging.getLogger("tapshare.diag")

FILE_ENV = "TAPSHARE_DIAG_FILE"
INTERVAL_ENV = "TAPSHARE_DIAG_INTERVAL_MS"
TRACE_ENV = "TAPSHARE_DIAG_TRACEMALLOC"
TOP_GROWTH = 15                 # allocation sites listed per line once a baseline is taken


def rss_kb(pid: int | str = "self") -> int:
    """Resident memory of a process in KiB (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int | str = "self") -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def native_memory() -> dict:
    """Memory outside Python's heap, as the libraries count it: SQLite's (page caches and statements of every
    connection in the process: ``sqlite3_memory_used``) and glibc malloc's, in use and held free (fragmentation)
    (``mallinfo2``). Empty where a library is not there (another libc, a static SQLite)."""
    out: dict = {}
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        out["sqlite_kb"] = lib.sqlite3_memory_used() // 1024
    except (OSError, AttributeError):
        pass
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _MallInfo2
        m = mallinfo2()
        out["malloc_in_use_kb"] = (m.uordblks + m.hblkhd) // 1024
        out["malloc_free_kb"] = m.fordblks // 1024
    except (OSError, AttributeError):
        pass
    return out


class Diagnostics(threading.Thread):
    """Writes the figures of this process and of its ``providers`` (name -> function returning a dict of
    numbers) to ``path`` as JSON lines."""

    def __init__(self, path: str, *, interval_ms: int = 10_000, trace_frames: int = 0) -> None:
        super().__init__(name="diagnostics", daemon=True)
        self.path, self.interval_s = path, max(0.5, interval_ms / 1000)
        self.providers: dict[str, Callable[[], dict]] = {}
        self.trace_frames = trace_frames
        self._halt = threading.Event()
        self._now = threading.Event()
        self._baseline: tracemalloc.Snapshot | None = None
        self._want_baseline = False
        self._lines = 0

    @classmethod
    def from_env(cls) -> Diagnostics | None:
        path = os.environ.get(FILE_ENV, "")
        if not path:
            return None
        try:
            interval_ms = int(os.environ.get(INTERVAL_ENV, "10000"))
            frames = int(os.environ.get(TRACE_ENV, "0"))
        except ValueError:
            log.error("%s and %s must be whole numbers: diagnostics off", INTERVAL_ENV, TRACE_ENV)
            return None
        return cls(path, interval_ms=interval_ms, trace_frames=frames)

    def start(self) -> None:
        if self.trace_frames > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(self.trace_frames)
        log.warning("diagnostics: a line every %.1f s to %s (tracemalloc %s)", self.interval_s, self.path,
                    f"{self.trace_frames} frames" if self.trace_frames else "off")
        super().start()

    def install_signal(self) -> None:
        """SIGUSR1 is :meth:`mark`. Call from the main thread."""
        signal.signal(signal.SIGUSR1, lambda _s, _f: self.mark())

    def mark(self) -> None:
        """Write a line now, with the tracemalloc baseline (the first time) or the growth since it (safe from any
        thread)."""
        self._want_baseline = True
        self._now.set()

    def stop(self) -> None:
        self._halt.set()
        self._now.set()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.write_line()
            except Exception:              # diagnostics must never take anything down
                log.exception("diagnostics line failed")
            self._now.wait(self.interval_s)
            self._now.clear()

    def figures(self) -> dict:
        out: dict = {"wall_ms": time.time_ns() // 1_000_000, "mono_ms": time.monotonic_ns() // 1_000_000,
                     "rss_kb": rss_kb(), "threads": threading.active_count(), "fds": open_fds(),
                     "gc_counts": list(gc.get_count()), "native": native_memory()}
        for name, fn in list(self.providers.items()):
            try:
                out[name] = fn()
            except Exception as e:  # a provider's object may be half torn down at exit
                out[name] = {"error": repr(e)[:200]}
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            out["traced_kb"], out["traced_peak_kb"] = current // 1024, peak // 1024
            if self._want_baseline and self._baseline is None:
                self._baseline = self._snapshot()
                out["baseline"] = True
            elif self._want_baseline:          # a snapshot costs memory and time: only when asked
                out["growth"] = self._growth()
        self._want_baseline = False
        return out

    def write_line(self) -> None:
        line = json.dumps(self.figures(), ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self._lines += 1

    @staticmethod
    def _snapshot() -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces((
            tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<unknown>")))

    def _growth(self) -> list[dict]:
        """The allocation sites that grew most since the baseline (size and count differences)."""
        assert self._baseline is not None
        stats = self._snapshot().compare_to(self._baseline, "traceback" if self.trace_frames > 1 else "lineno")
        out = []
        for s in sorted(stats, key=lambda st: st.size_diff, reverse=True)[:TOP_GROWTH]:
            frames = [f"{f.filename}:{f.lineno}" for f in s.traceback]     # oldest first: the site is the last
            out.append({"site": frames[-1] if frames else "?", "stack": frames[-8:],
                        "size_diff_kb": round(s.size_diff / 1024, 1), "size_kb": round(s.size / 1024, 1),
                        "count_diff": s.count_diff, "count": s.count})
        return out
