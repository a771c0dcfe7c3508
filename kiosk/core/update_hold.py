"""The hold a software update puts on the machine while it switches releases (:class:`UpdateHold`)."""

from __future__ import annotations

from contract.events import EventKind
from kiosk.events import Action, BeginUpdate, EndUpdate, RecordEvent


class UpdateHold:
    """While an update switches releases and restarts the service, no start may be taken: the restart would cut
    the pour. The hold is taken only when the core says the machine is idle (``busy_why`` is None), lasts until
    the restart (the new process starts without it), :meth:`end` or its deadline, and is never written to the
    ledger: whatever release runs after the restart (the new one, or the old one rolled back) boots serving."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.until_ms = 0
        self.refusal: str | None = None          # why the last request was refused (for the updater's report)

    @property
    def active(self) -> bool:
        return self.version is not None

    def begin(self, ev: BeginUpdate, now_ms: int, busy_why: str | None) -> list[Action]:
        why = ev.refused_why or busy_why
        if why is None and ev.hold_ms <= 0:
            why = f"a hold of {ev.hold_ms} ms cannot cover a restart"
        if why is not None:
            self.refusal = why
            return [RecordEvent.of(EventKind.UPDATE_HOLD_REFUSED, version=ev.version, why=why)]
        self.refusal = None
        self.version, self.until_ms = ev.version, now_ms + ev.hold_ms
        return [RecordEvent.of(EventKind.UPDATE_HOLD, version=ev.version, hold_ms=ev.hold_ms)]

    def end(self, ev: EndUpdate) -> list[Action]:
        if self.version is None or (ev.version and ev.version != self.version):
            return []
        return self._lift(ev.reason)

    def on_tick(self, now_ms: int) -> list[Action]:
        if self.version is not None and now_ms >= self.until_ms:
            return self._lift("timeout")
        return []

    def _lift(self, reason: str) -> list[Action]:
        version, self.version = self.version or "", None
        return [RecordEvent.of(EventKind.UPDATE_HOLD_ENDED, version=version, reason=reason)]
