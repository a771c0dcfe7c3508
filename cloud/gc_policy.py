"""Python's cyclic garbage collector, tuned for a server process that holds thousands of long-polls.

Each held long-poll is a few hundred container objects (its connection, request, coroutines, timers) that live
for up to a minute. With CPython's default thresholds they survive the young collections, reach the oldest
generation, and whenever that has grown by a quarter a full collection walks every object in the process with
the GIL held: measured at 10,000 machines over three instances, about 900,000 objects per instance and full
collections of 0.5 to 1.9 s every 10-20 s, a pause for every request of the instance and most of the
start->command p99 (3.9 s; 0.6 s with this policy).

So a serving process (``python -m cloud serve``, not the tests, which run many apps in one process):

* moves what exists once the app is built (modules, models, the machines' keys) out of the collector's sight
  (``gc.freeze``: it is still freed by reference counting, it is only never walked);
* collects the young generations as before, less often (``YOUNG_THRESHOLD`` allocations, not 700);
* never starts a full collection by itself, and runs one every ``full_every_s`` instead (a thread of its own),
  logged with what it found: cyclic garbage that reached the oldest generation waits at most that long.

``full_every_s`` 0 keeps CPython's defaults (``TAPSHARE_GC_FULL_EVERY_S``)."""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger("tapshare.cloud")

YOUNG_THRESHOLD = 7_000          # allocations between young collections (CPython's default: 700)
MIDDLE_THRESHOLD = 10            # young collections between middle ones (CPython's default)
NEVER = 2 ** 30                  # middle collections between automatic full ones: none


class GcPolicy:
    def __init__(self, full_every_s: float) -> None:
        self.full_every_s = full_every_s
        self.full_collections = 0
        self.last_found = 0           # unreachable objects the last full collection found
        self.last_pause_ms = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._before: tuple[int, int, int] | None = None

    def apply(self) -> None:
        if self.full_every_s <= 0:
            return
        self._before = gc.get_threshold()
        gc.collect()                  # what start-up left behind, before the rest is frozen
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, NEVER)
        self._thread = threading.Thread(target=self._run, name="gc-full", daemon=True)
        self._thread.start()

    def collect_now(self) -> int:
        t0 = time.perf_counter()
        found = gc.collect()
        self.last_pause_ms = (time.perf_counter() - t0) * 1000
        self.full_collections += 1
        self.last_found = found
        log.info("full garbage collection: %d unreachable objects found in %.0f ms (%d tracked)", found,
                 self.last_pause_ms, len(gc.get_objects()))
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.full_every_s):
            try:
                self.collect_now()
            except Exception:                       # never: gc.collect raises nothing; a thread must not die
                log.exception("full garbage collection failed")

    def undo(self) -> None:
        """CPython's defaults again (for a process that goes on after the server, such as a test)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._before is not None:
            gc.set_threshold(*self._before)
            gc.unfreeze()
            self._before = None
