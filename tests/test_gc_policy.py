"""The serving process's garbage-collection policy (cloud/gc_policy.py): no automatic full collection (at 10,000
held long-polls one walked ~900,000 objects for up to 2 s with the GIL held), one every ``full_every_s`` instead,
which still frees cyclic garbage that reached the oldest generation; and ``python -m cloud serve`` applies it."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import weakref

from cloud.gc_policy import NEVER, YOUNG_THRESHOLD, GcPolicy
from tests.util import wait_until


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def old_cycle() -> weakref.ref:
    """Two objects that refer to each other, old enough to be in the oldest generation, then dropped."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)                                # survives the young and middle collections: now the oldest
    gc.collect(1)
    ref = weakref.ref(a)
    del a, b
    return ref


def test_old_cyclic_garbage_waits_for_the_timed_full_collection_and_is_then_freed():
    before = gc.get_threshold()
    policy = GcPolicy(full_every_s=0.5)
    policy.apply()
    try:
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, NEVER) and gc.get_freeze_count() > 0
        ref = old_cycle()
        for _ in range(30):                      # lots of young collections: none of them reaches it
            [Node() for _ in range(YOUNG_THRESHOLD)]
        assert ref() is not None and policy.full_collections == 0
        assert wait_until(lambda: ref() is None, timeout_s=5)            # the timed full collection freed it
        assert policy.full_collections >= 1 and policy.last_found >= 2
    finally:
        policy.undo()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_zero_keeps_cpythons_defaults():
    before = gc.get_threshold()
    policy = GcPolicy(full_every_s=0)
    policy.apply()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    ref = old_cycle()
    gc.collect()
    assert ref() is None
    policy.undo()


def test_the_serving_process_applies_it(tmp_path):
    """The real command line: the process logs its timed full collections (here every second)."""
    from bench.common import free_port
    port = free_port()
    env = {**os.environ, "TAPSHARE_GC_FULL_EVERY_S": "1"}
    log = tmp_path / "cloud.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cloud", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--data-dir", str(tmp_path / "data"), "--log-level", "info"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        assert wait_until(lambda: log.read_text().count("full garbage collection:") >= 2, timeout_s=30), \
            log.read_text()[-2000:]
        assert time.monotonic() - t0 >= 1.5
    finally:
        proc.terminate()
        proc.wait(10)
