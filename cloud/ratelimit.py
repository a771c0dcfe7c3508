"""Fixed-window rate limits kept in memory, with bounded memory.

Used where a limit protects against guessing or flooding and need not survive a restart (QR scans per network
and per machine). Limits that move money or send SMS are counted in the database instead (see accounts). A
fleet of several cloud instances shares limits through PostgreSQL (the fleet issue); one instance's memory is
enough for one instance.
"""

from __future__ import annotations

import threading


class RateLimiter:
    """At most ``limit`` hits per key in each window of ``window_ms``; remembers at most ``max_keys`` keys (the
    oldest windows are forgotten first, which can only let a few more hits through, never block one wrongly)."""

    def __init__(self, limit: int, window_ms: int, max_keys: int = 100_000) -> None:
        self.limit, self.window_ms, self.max_keys = limit, window_ms, max_keys
        self._hits: dict[str, tuple[int, int]] = {}      # key -> (window start, hits)
        self._lock = threading.Lock()

    def hit(self, key: str, now_ms: int) -> int | None:
        """Count a hit; ``None`` if allowed, else the seconds until the key's window ends (for Retry-After)."""
        window = now_ms - now_ms % self.window_ms
        with self._lock:
            start, n = self._hits.get(key, (window, 0))
            if start != window:
                start, n = window, 0
            if n >= self.limit:
                return max(1, (start + self.window_ms - now_ms + 999) // 1000)
            self._hits[key] = (start, n + 1)
            if len(self._hits) > self.max_keys:
                self._prune(window)
        return None

    def _prune(self, window: int) -> None:
        for k in [k for k, (start, _) in self._hits.items() if start != window]:
            del self._hits[k]
        while len(self._hits) > self.max_keys:           # all in this window: drop the oldest inserted
            del self._hits[next(iter(self._hits))]

    def __len__(self) -> int:
        return len(self._hits)
