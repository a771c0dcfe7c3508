"""Maintenance mode (:class:`MaintenanceMode`)."""

from __future__ import annotations

from contract.events import EventKind
from kiosk.core.settings import CoreSettings
from kiosk.events import Action, RecordEvent


class MaintenanceMode:
    """Whether a technician has the machine (no sales meanwhile), and when they last did something there.
    Maintenance is refused while a customer's session runs, and ends by itself after ``maintenance_timeout_ms``
    untouched (never during a technician's pour: the core does not ask then)."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.active = False
        self.last_activity_ms = 0

    def enter(self, actor: str, now_ms: int, *, session_running: bool) -> list[Action]:
        if session_running:
            return [RecordEvent.of(EventKind.MAINTENANCE_REFUSED, actor=actor, why="a session is running")]
        self.last_activity_ms = now_ms
        if self.active:
            return []
        self.active = True
        return [RecordEvent.of(EventKind.MAINTENANCE_ENTERED, actor=actor)]

    def exit(self, actor: str) -> list[Action]:
        self.active = False
        return [RecordEvent.of(EventKind.MAINTENANCE_EXITED, actor=actor)]

    def touch(self, now_ms: int) -> None:
        """The technician did something: the inactivity timeout starts again."""
        self.last_activity_ms = now_ms

    def on_activity(self, now_ms: int) -> list[Action]:
        if self.active:
            self.touch(now_ms)
        return []

    def on_tick(self, now_ms: int) -> list[Action]:
        if self.active and now_ms - self.last_activity_ms >= self.settings.maintenance_timeout_ms:
            return self.exit("inactivity")
        return []

    def idle_ms(self, now_ms: int) -> int:
        """How long the maintenance screen has been untouched (0 outside maintenance)."""
        return max(0, now_ms - self.last_activity_ms) if self.active else 0
