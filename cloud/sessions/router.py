"""The phone's side of a session: scanning the machine's QR code (the presence check), the machine's status
while the person stands there, starting and stopping, the live view, and the bills."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

import contract as p
from cloud.cluster import SharedRateLimiter
from cloud.deps import IdPath, MachinePath, Now, Svc, User
from cloud.errors import ERRORS, Err, TooMany
from cloud.schemas import OkOut
from cloud.sessions.schemas import BillOut, BillsOut, MachineInfoOut, ScanOut, SessionOut, StartIn, StartOut

router = APIRouter(prefix="/api/v1", tags=["phone"], responses=ERRORS)


@router.get("/scan", response_model=ScanOut)
def scan(machine: Annotated[str, Query(min_length=1, max_length=64, pattern=p.MACHINE_ID_RE.pattern)],
         c: Annotated[str, Query(min_length=1, max_length=16)], request: Request, svc: Svc, now: Now) -> dict[str, Any]:
    """What opening the QR link does: checks the time-based code, consumes nothing. Limited per network and
    per machine (a code has 8 digits; guessing is made slow)."""
    ip = request.client.host if request.client else "?"
    refused = SharedRateLimiter.hit_in_turn(svc.database, [(svc.scans_by_network, ip),
                                                           (svc.scans_by_machine, machine)], now)
    if refused is not None:
        what, wait_s = ("network", "machine")[refused[0]], refused[1]
        raise TooMany("too_many_scans", f"too many scans from this {what}; try again in {wait_s} s",
                      retry_after_s=wait_s)
    token, info = svc.sessions.scan(machine, c, now)
    return {"presence_token": token, "machine": info}


@router.get("/machines/{machine_id}", response_model=MachineInfoOut)
def machine_status(machine_id: MachinePath, svc: Svc, now: Now) -> dict[str, Any]:
    """What the machine shows anyway (place, price, water, whether it can serve now): the phone polls it
    while a person stands at the machine, so "out of service" or "busy" reaches them within a second."""
    return svc.sessions.machine_info(machine_id, now)       # 404 unknown_machine from the row lookup


@router.post("/sessions", response_model=StartOut, responses={402: {"model": Err}, 503: {"model": Err}})
def start_session(body: StartIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.sessions.start(user_id, body.presence_token, body.expected_price_fen_per_l, now)


@router.get("/sessions/{session_id}", response_model=SessionOut)
def get_session(session_id: IdPath, user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.sessions.view(user_id, session_id)


@router.post("/sessions/{session_id}/stop", response_model=OkOut)
def stop_session(session_id: IdPath, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    svc.sessions.stop(user_id, session_id, now)
    return {"ok": True}


@router.get("/me/bills", response_model=BillsOut)
def bills(user_id: User, svc: Svc, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    return {"bills": svc.sessions.bills(user_id, limit)}


@router.get("/me/bills/{session_id}", response_model=BillOut)
def bill(session_id: IdPath, user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.sessions.bill(user_id, session_id)
