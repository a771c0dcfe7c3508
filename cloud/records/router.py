"""The console's sessions (rental records): search with keyset paging and CSV, one session's whole record, and
an operator's close of a session stuck open. Refunds are ``POST /operator/sessions/{id}/refund`` (wallet)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from cloud.csvout import csv_response
from cloud.deps import IdPath, MoneyOperator, Now, Svc, TimeMs, Viewer
from cloud.errors import ERRORS
from cloud.records.schemas import CloseIn, CloseOut, RecordOut, SessionsOut
from cloud.records.service import CSV_HEADER, Search

router = APIRouter(prefix="/api/v1/operator", tags=["operator"], responses=ERRORS)
Fen = Annotated[int | None, Query(ge=0, le=100_000_000)]


@router.get("/sessions", response_model=SessionsOut, responses={200: {"content": {"text/csv": {}}}})
def search(op: Viewer, svc: Svc,
           machine_id: Annotated[str, Query(max_length=64)] = "",
           user: Annotated[str, Query(max_length=64, description="a user id, or a phone number (exact)")] = "",
           from_ms: TimeMs = 0, to_ms: TimeMs = 2**62,
           state: Literal["", "open", "starting", "active", "ended", "voided", "lost"] = "",
           end_reason: Annotated[str, Query(max_length=32, pattern=r"^[a-z_]*$")] = "",
           min_fen: Fen = None, max_fen: Fen = None,
           before: Annotated[str, Query(max_length=90)] = "",
           limit: Annotated[int, Query(ge=1, le=200)] = 50,
           format: Literal["json", "csv"] = "json") -> Any:
    """Sessions newest first, by machine, user, period (``from_ms`` inclusive, ``to_ms`` exclusive), state
    (``open``: starting or active), end reason and amount charged; ``before`` pages on. ``format=csv``
    downloads every match."""
    f = Search(machine_id, user, from_ms, to_ms, state, end_reason, min_fen, max_fen)
    if format == "csv":
        return csv_response("tapshare-sessions.csv", CSV_HEADER, svc.records.export(f))
    return svc.records.search(f, before, limit)


@router.get("/sessions/{session_id}", response_model=RecordOut)
def record(session_id: IdPath, op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    """One session: the row, the bill, the rental record with its flow series as volume and flow rate, the
    temperatures, valve times, the machine's events about it, and its money (hold, charge, refunds)."""
    return svc.records.record(session_id, now)


@router.post("/sessions/{session_id}/close", response_model=CloseOut)
def close(session_id: IdPath, body: CloseIn, op: MoneyOperator, svc: Svc, now: Now) -> dict[str, Any]:
    """End a session stuck starting or active (its machine never reported the end): the hold is released and
    nothing charged; a report arriving later still bills the water measured, once. 409 if it is over."""
    return svc.sessions.close_stuck(op["operator_id"], session_id, body.reason, now)
