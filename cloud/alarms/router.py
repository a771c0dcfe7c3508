"""The operators' alarms with a life: list them by state (with the counts for each), see one, acknowledge it, resolve
it. Viewers read; operators act, each action audit-logged with its note. (``GET /api/v1/operator/alarms`` in
:mod:`cloud.operators` still lists the raw alarm events.)"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from cloud.alarms.rules import RULES
from cloud.alarms.schemas import AlarmCaseOut, AlarmCasesOut, NoteIn
from cloud.deps import Now, Operator, RowIdPath, RowIdQuery, Svc, Viewer
from cloud.errors import ERRORS

router = APIRouter(prefix="/api/v1/operator", tags=["alarms"], responses=ERRORS)
AlarmId = RowIdPath


@router.get("/alarm-cases", response_model=AlarmCasesOut)
def alarm_cases(op: Viewer, svc: Svc,
                state: Literal["open", "acknowledged", "resolved", "active"] | None = None,
                machine_id: Annotated[str | None, Query(max_length=64)] = None,
                rule: Annotated[str | None, Query(max_length=32)] = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 100,
                before_id: RowIdQuery | None = None) -> dict[str, Any]:
    """Newest first; ``active`` is open and acknowledged together. ``counts`` are for the same machine and rule;
    ``rules`` names every rule (for a filter)."""
    return {**svc.alarms.cases(state, machine_id, rule, limit, before_id),
            "rules": [{"rule": r.name, "title_zh": r.zh, "title_en": r.en} for r in RULES.values()]}


@router.get("/alarm-cases/{alarm_id}", response_model=AlarmCaseOut)
def alarm_case(alarm_id: AlarmId, op: Viewer, svc: Svc) -> dict[str, Any]:
    return svc.alarms.case(alarm_id)


@router.post("/alarm-cases/{alarm_id}/acknowledge", response_model=AlarmCaseOut)
def acknowledge(alarm_id: AlarmId, body: NoteIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    """Someone is on it (once: a second acknowledgement is 409 ``already_acknowledged``)."""
    return svc.alarms.acknowledge(op["operator_id"], alarm_id, body.note, now)


@router.post("/alarm-cases/{alarm_id}/resolve", response_model=AlarmCaseOut)
def resolve(alarm_id: AlarmId, body: NoteIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    """Dealt with (409 ``already_resolved`` if it was). A condition that still holds opens a new alarm at the
    next check."""
    return svc.alarms.resolve(op["operator_id"], alarm_id, body.note, now)
