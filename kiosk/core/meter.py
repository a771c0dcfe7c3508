"""The flow meter as the core sees it (:class:`PulseMeter`)."""

from __future__ import annotations

from collections import deque

from kiosk.core.settings import CoreSettings
from kiosk.events import Action, AddToTotalizer

METER_SLACK_PULSES = 5          # tolerance of the plausibility check for jitter on short intervals
# The plausibility check judges the flow over at least this long. Edges reach the counter from a callback thread:
# when it is held up (a busy CPU, the window drawing its first frame, a slow SD card), pulses that came at a
# normal rate arrive in one burst between two readings a few ms apart; over the last second they are plausible.
# A meter that really counts too fast (noise on the line, a wrong meter) does so for longer and is still caught.
METER_WINDOW_MS = 1_000
READINGS_KEPT = 1_000           # bound of the window's readings (one a core step: 100 ms at rest, 5-20 ms pouring)


class PulseMeter:
    """The flow meter's cumulative counter: the last total read and when, the check that a new reading is
    physically possible (a counter never goes backwards, nor counts faster than the plumbing can flow), and
    the pulses counted but not yet added to the machine's totalizer. Those go out with a session's next
    checkpoint or bill, or by themselves (:meth:`flush`) at most every ``checkpoint_interval_ms``."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.last_total_pulses: int | None = None     # None until the first reading
        # (ms, total) readings of the window: the oldest is the newest one at least METER_WINDOW_MS old
        self._readings: deque[tuple[int, int]] = deque(maxlen=READINGS_KEPT)
        self._unsaved_pulses = 0
        self._flushed_ms = 0

    def read(self, total_pulses: int, now_ms: int) -> tuple[int, str | None]:
        """Take a reading of the counter: the new pulses since the last one, or 0 with a meter fault's detail.
        The first reading only sets the baseline."""
        if self.last_total_pulses is None:
            self.last_total_pulses = total_pulses
            self._restart(now_ms, total_pulses)
            return 0, None
        new_pulses = total_pulses - self.last_total_pulses
        self.last_total_pulses = total_pulses
        if new_pulses < 0:
            self._restart(now_ms, total_pulses)
            return 0, f"pulse counter went backwards by {-new_pulses}"
        self._keep(now_ms, total_pulses)
        if new_pulses == 0:
            return 0, None
        since_ms, since_total = self._readings[0]
        span_ms, span_pulses = now_ms - since_ms, total_pulses - since_total
        cal, max_flow = self.settings.calibration, self.settings.max_flow_ml_per_min
        plausible = cal.pulses_for_volume_ml(max_flow * max(span_ms, 1) / 60_000) * 1.5
        if span_pulses > plausible + METER_SLACK_PULSES:
            self._restart(now_ms, total_pulses)     # the next pulses are judged on their own, not with these
            return 0, (f"{span_pulses} pulses in {span_ms} ms is faster than the plumbing "
                       f"can flow ({max_flow} ml/min)")
        self._unsaved_pulses += new_pulses
        return new_pulses, None

    def still(self, now_ms: int) -> None:
        """The core's step with no new reading: the count is unchanged at ``now_ms``. Readings come only when the
        count changes, so without this the reading before a burst after a long pause would be minutes old, and the
        burst judged over minutes; a step that never came (the core itself held up) leaves the span as long as it
        really was."""
        if self.last_total_pulses is not None:
            self._keep(now_ms, self.last_total_pulses)

    def _restart(self, now_ms: int, total_pulses: int) -> None:
        self._readings.clear()
        self._readings.append((now_ms, total_pulses))

    def _keep(self, now_ms: int, total_pulses: int) -> None:
        readings = self._readings
        if readings and readings[-1][0] == now_ms and readings[-1][1] == total_pulses:
            return
        readings.append((now_ms, total_pulses))
        while len(readings) > 2 and now_ms - readings[1][0] >= METER_WINDOW_MS:
            readings.popleft()

    def close_at(self, more_pulses: int) -> int:
        """The counter's total at which the valve closes by itself, ``more_pulses`` from now."""
        return (self.last_total_pulses or 0) + more_pulses

    def take_for_checkpoint(self) -> int:
        """The pulses not yet in the totalizer, handed to a checkpoint that carries them."""
        pulses, self._unsaved_pulses = self._unsaved_pulses, 0
        return pulses

    def take_for_bill(self, now_ms: int) -> int:
        """The pulses not yet in the totalizer, handed to a session's end that carries them."""
        self._flushed_ms = now_ms
        return self.take_for_checkpoint()

    def flush(self, now_ms: int, force: bool = False) -> list[Action]:
        """Add the pending pulses to the totalizer: now if ``force``, else at most every checkpoint interval."""
        if not self._unsaved_pulses:
            return []
        if not force and now_ms - self._flushed_ms < self.settings.checkpoint_interval_ms:
            return []
        return [AddToTotalizer(self.take_for_bill(now_ms))]
