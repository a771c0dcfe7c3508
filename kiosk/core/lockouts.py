"""The lockouts that hold the machine out of service (:class:`Lockouts`)."""

from __future__ import annotations

from contract.events import EventKind
from kiosk.events import SITE_ONLY_LOCKOUTS, Action, ClearLockout, ClearSource, RecordEvent, SetLockout


class Lockouts:
    """Why the machine is out of service: each active lockout's reason with its detail (the words shown and
    logged). Any part may add one; a condition alarm lifts its own when the condition ends; a person clears
    the others (:meth:`clear`), on site only for those in ``SITE_ONLY_LOCKOUTS``. Also remembers why the last
    on-site attempt to clear one was refused, for the screen."""

    def __init__(self, active: dict[str, str] | None = None) -> None:
        self.active: dict[str, str] = dict(active or {})
        self.clear_refusal: str | None = None

    def add(self, reason: str, detail: str) -> list[Action]:
        """Lock out for ``reason``. Nothing new if that lockout already holds (its first detail stays)."""
        if reason in self.active:
            return []
        self.active[reason] = detail
        return [SetLockout(reason, active=True, detail=detail),
                RecordEvent.of(EventKind.LOCKOUT, reason=reason, detail=detail)]

    def condition_ended(self, reason: str, detail: str) -> list[Action]:
        """The condition behind a condition alarm's lockout has gone: the lockout lifts by itself."""
        if reason not in self.active:
            return []
        del self.active[reason]
        return [SetLockout(reason, active=False),
                RecordEvent.of(EventKind.ALARM_CLEARED, reason=reason, detail=detail)]

    def clear(self, ev: ClearLockout) -> list[Action]:
        """A person's request to clear a lockout: refused with the caller's reason (``refused_why``), ignored if
        the machine is not locked out for that reason, refused if it may be cleared on site only; else cleared."""
        info = {"reason": ev.reason, "source": ev.source.value, "actor": ev.actor}
        if ev.ref:
            info["ref"] = ev.ref
        if ev.source is ClearSource.SITE:
            self.clear_refusal = None
        if ev.reason in self.active and ev.refused_why:
            if ev.source is ClearSource.SITE:
                self.clear_refusal = ev.refused_why
            return [RecordEvent.of(EventKind.LOCKOUT_CLEAR_REFUSED, **info, why=ev.refused_why)]
        if ev.reason not in self.active:
            return [RecordEvent.of(EventKind.LOCKOUT_CLEAR_IGNORED, **info, why="not locked out for this reason")]
        if ev.reason in SITE_ONLY_LOCKOUTS and ev.source is not ClearSource.SITE:
            return [RecordEvent.of(EventKind.LOCKOUT_CLEAR_REFUSED, **info,
                                   why="must be cleared on site after inspection")]
        del self.active[ev.reason]
        return [SetLockout(ev.reason, active=False), RecordEvent.of(EventKind.LOCKOUT_CLEARED, **info)]
