"""Flow with the valve closed (:class:`GhostFlowDetector`)."""

from __future__ import annotations

from collections import deque

from contract.events import EventKind
from kiosk.core.lockouts import Lockouts
from kiosk.core.settings import CoreSettings
from kiosk.events import LOCKOUT_GHOST_FLOW, Action, RecordEvent

GHOST_LOG_INTERVAL_MS = 60_000  # ghost pulses are logged and reported in batches at most this often (a slow
                                # drip below the lockout threshold still reaches the operators, once a minute)


class GhostFlowDetector:
    """Pulses that arrive with the valve closed, outside any session's or technician's pour: never billed. More
    than ``ghost_volume_ml`` within ``ghost_window_ms`` locks the machine out (a leak or a stuck valve). Every
    ghost pulse is logged, in batches: at the lockout, at most every ``GHOST_LOG_INTERVAL_MS`` otherwise, and
    at shutdown."""

    def __init__(self, settings: CoreSettings, lockouts: Lockouts) -> None:
        self.settings = settings
        self.window: deque[tuple[int, int]] = deque()   # (ms, pulses) within the last ghost_window_ms
        self._lockouts = lockouts
        self._unlogged_pulses = 0
        self._logged_ms = 0

    def on_pulses(self, pulses: int, now_ms: int) -> list[Action]:
        st = self.settings
        self.window.append((now_ms, pulses))
        self._unlogged_pulses += pulses
        while self.window and now_ms - self.window[0][0] > st.ghost_window_ms:
            self.window.popleft()
        ghost_ml = st.calibration.volume_ml(sum(p for _, p in self.window))
        if ghost_ml > st.ghost_volume_ml and LOCKOUT_GHOST_FLOW not in self._lockouts.active:
            detail = (f"{ghost_ml} ml flowed with the valve closed within "
                      f"{st.ghost_window_ms // 1000} s (leak or stuck valve)")
            return [self._log(now_ms), *self._lockouts.add(LOCKOUT_GHOST_FLOW, detail)]
        return []

    def on_tick(self, now_ms: int) -> list[Action]:
        if self._unlogged_pulses and now_ms - self._logged_ms >= GHOST_LOG_INTERVAL_MS:
            return [self._log(now_ms)]
        return []

    def flush(self, now_ms: int) -> list[Action]:
        """Log the ghost pulses not logged yet (at shutdown)."""
        return [self._log(now_ms)] if self._unlogged_pulses else []

    def forget(self) -> None:
        """Start counting afresh (the ghost-flow lockout was cleared)."""
        self.window.clear()

    def _log(self, now_ms: int) -> RecordEvent:
        pulses, self._unlogged_pulses, self._logged_ms = self._unlogged_pulses, 0, now_ms
        return RecordEvent.of(EventKind.GHOST_FLOW, pulses=pulses,
                              volume_ml=self.settings.calibration.volume_ml(pulses))
