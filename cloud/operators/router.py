"""The operators' API: the fleet (provision, change, commands, keys), alarms and rental records, and operator
tokens. Each endpoint names the role it needs."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

import contract as p
from cloud.csvout import csv_response, iso_utc
from cloud.deps import MAX_ROW_ID, Admin, IdPath, Now, Operator, RowIdQuery, Svc, TimeMs, Viewer
from cloud.errors import ERRORS
from cloud.operators.schemas import (
    AlarmsOut,
    AuditOut,
    ClearLockoutIn,
    CommandOut,
    CommandQueuedOut,
    MachineSettingsIn,
    MachinesOut,
    ProvisionIn,
    ProvisionOut,
    RecordsOut,
    ServiceIn,
)
from cloud.schemas import OkOut

router = APIRouter(prefix="/api/v1/operator", tags=["operator"], responses=ERRORS)
TOKEN_NOTE = "single use: give it to the technician who enrols the machine"


@router.post("/machines", response_model=ProvisionOut)
def provision(body: ProvisionIn, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    limits = p.Limits(**body.model_dump(include=set(p.LIMIT_BOUNDS)))
    token = svc.machines.provision(op["operator_id"], body.machine_id, body.location, body.price_fen_per_l, limits,
                                   now)
    return {"machine_id": body.machine_id, "enrolment_token": token, "note": TOKEN_NOTE}


@router.get("/machines", response_model=MachinesOut)
def list_machines(op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    return {"machines": svc.operators.machines_view(now)}


@router.patch("/machines/{machine_id}", response_model=MachinesOut)
def change_machine(machine_id: IdPath, body: MachineSettingsIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    """Change a machine's price or limits (new grants use them); a new price is sent to the machine."""
    changes = body.model_dump(exclude_none=True)
    return {"machines": [svc.operators.change_machine(op["operator_id"], machine_id, changes, now)]}


@router.post("/machines/{machine_id}/clear-lockout", response_model=CommandQueuedOut)
def clear_lockout(machine_id: IdPath, body: ClearLockoutIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    """Ask the machine to clear a lockout remotely (ghost flow, operator); a wet leak sensor's lockout is
    refused by the machine itself: that needs a technician on site."""
    cid = svc.operators.send(op["operator_id"], machine_id, p.CommandKind.CLEAR_LOCKOUT,
                             {"reason": body.reason, "note": body.note}, now, reason=body.reason, detail=body.note)
    return {"machine_id": machine_id, "command": "clear_lockout", "command_id": cid}


@router.post("/machines/{machine_id}/service", response_model=CommandQueuedOut)
def set_service(machine_id: IdPath, body: ServiceIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    kind = p.CommandKind.IN_SERVICE if body.in_service else p.CommandKind.OUT_OF_SERVICE
    cid = svc.operators.send(op["operator_id"], machine_id, kind, {"detail": body.detail}, now, detail=body.detail)
    return {"machine_id": machine_id, "command": kind.value, "command_id": cid}


@router.post("/machines/{machine_id}/revoke-key", response_model=OkOut)
def revoke_machine_key(machine_id: IdPath, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    """Forget the machine's secret: it is refused at once (audited). Re-enrol it with a new enrolment token."""
    svc.machines.revoke_key(op["operator_id"], machine_id, now)
    return {"ok": True}


@router.post("/machines/{machine_id}/enrolment-token", response_model=ProvisionOut)
def enrolment_token(machine_id: IdPath, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    token = svc.machines.new_enrolment_token(op["operator_id"], machine_id, now)
    return {"machine_id": machine_id, "enrolment_token": token, "note": TOKEN_NOTE}


@router.get("/commands/{command_id}", response_model=CommandOut)
def command_status(command_id: IdPath, op: Viewer, svc: Svc) -> dict[str, Any]:
    """What became of a command sent to a machine: delivered, acknowledged, refused with the reason."""
    return svc.operators.command(command_id)


@router.get("/alarms", response_model=AlarmsOut)
def alarms(op: Viewer, svc: Svc, now: Now, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    return svc.operators.alarms(limit, now)


@router.get("/records", response_model=RecordsOut)
def records(op: Viewer, svc: Svc, machine_id: Annotated[str | None, Query(max_length=64)] = None,
            user_id: Annotated[str | None, Query(max_length=64)] = None, from_ms: TimeMs = 0, to_ms: TimeMs = 2**62,
            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """s7: rental records by machine, user and time range."""
    return {"records": svc.operators.records(machine_id, user_id, from_ms, to_ms, limit)}


@router.get("/audit", response_model=AuditOut, responses={200: {"content": {"text/csv": {}}}})
def audit_log(op: Admin, svc: Svc, operator_id: Annotated[str, Query(max_length=64)] = "",
              action: Annotated[str, Query(max_length=64)] = "", target: Annotated[str, Query(max_length=128)] = "",
              from_ms: TimeMs = 0, to_ms: TimeMs = 2**62, before_id: RowIdQuery = MAX_ROW_ID,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              format: Literal["json", "csv"] = "json") -> Any:
    """Who did what to what, when (admins): newest first, filtered by operator, action, target and time;
    ``format=csv`` downloads every matching entry."""
    if format == "csv":
        rows = svc.operators.audit_log(operator_id, action, target, from_ms, to_ms, before_id, None)
        return csv_response("tapshare-audit.csv", ["id", "at_utc", "operator_id", "action", "target", "detail"],
                            ([e["id"], iso_utc(e["at_ms"]), e["operator_id"], e["action"], e["target"],
                              json.dumps(e["detail"], ensure_ascii=False)] for e in rows))
    entries = list(svc.operators.audit_log(operator_id, action, target, from_ms, to_ms, before_id, limit + 1))
    more = len(entries) > limit
    entries = entries[:limit]
    return {"entries": entries, "actions": svc.operators.audit_actions(),
            "next_before_id": entries[-1]["id"] if more else None}


@router.post("/logout", response_model=OkOut)
def operator_logout(op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    """Revoke the token this request carries."""
    svc.operators.logout(op["operator_id"], now)
    return {"ok": True}


@router.post("/operators/{operator_id}/revoke", response_model=OkOut)
def revoke_operator(operator_id: IdPath, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    """An admin revokes another operator's token (audited); the next request with it is refused."""
    svc.operators.revoke(op["operator_id"], operator_id, now)
    return {"ok": True}
