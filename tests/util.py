"""Helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``pred`` until true or ``timeout_s`` passes (for real threads and servers; no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return bool(pred())
