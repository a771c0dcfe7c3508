"""Request and response models of the operator alarms API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, StringConstraints

from cloud.schemas import In

Note = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class NoteIn(In):
    """What was done or found, in words (required: the audit log keeps it with the operator's name)."""

    note: Note


class NotificationsOut(BaseModel):
    email: str                   # off, sent, sending, not_sent, gave_up
    webhook: str
    attempts: int
    error: str | None


class AlarmCaseOut(BaseModel):
    alarm_id: int
    rule: str
    title_zh: str
    title_en: str
    severity: str                # critical, warning, info
    system_resolves: bool        # resolved by the system when its condition ends (else only by an operator)
    state: str                   # open, acknowledged, resolved
    machine_id: str | None       # None: the service's own (payments, reconciliation, SMS)
    location: str | None
    detail: dict[str, Any]
    opened_ms: int
    last_ms: int                 # the last time the condition was seen
    acked_ms: int | None
    acked_by: str | None
    ack_note: str | None
    resolved_ms: int | None
    resolved_by: str | None      # an operator, or "system" when the condition cleared
    resolve_note: str | None
    emailed_ms: int | None
    webhooked_ms: int | None
    notify_attempts: int
    notify_error: str | None
    notifications: NotificationsOut


class StateCountsOut(BaseModel):
    open: int
    acknowledged: int
    resolved: int
    active: int                  # open + acknowledged


class RuleOut(BaseModel):
    rule: str
    title_zh: str
    title_en: str


class AlarmCasesOut(BaseModel):
    alarms: list[AlarmCaseOut]
    counts: StateCountsOut
    rules: list[RuleOut] = []
    next_before_id: int | None   # pass as before_id for the next page; None: no more
