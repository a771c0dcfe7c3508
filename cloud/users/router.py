"""The console's users: masked search and view (balance and points history, sessions, bills, top-ups,
refunds), the full phone and name on purpose with a reason (reviewers and admins, audited), and admins'
adjustments of a balance or points (audited)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from cloud.deps import Admin, IdPath, Now, Reviewer, Svc, Viewer
from cloud.errors import ERRORS
from cloud.users.schemas import AdjustIn, AdjustOut, UnmaskIn, UnmaskOut, UsersOut, UserViewOut

router = APIRouter(prefix="/api/v1/operator", tags=["operator"], responses=ERRORS)


@router.get("/users", response_model=UsersOut)
def search(op: Viewer, svc: Svc, q: Annotated[str, Query(max_length=64)] = "",
           before: Annotated[str, Query(max_length=90)] = "",
           limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    """People by phone number or user id (exactly), else the newest accounts; phones and names masked."""
    return svc.users.search(q, before, limit)


@router.get("/users/{user_id}", response_model=UserViewOut)
def view(user_id: IdPath, op: Viewer, svc: Svc, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    return svc.users.view(user_id, limit)


@router.post("/users/{user_id}/unmask", response_model=UnmaskOut)
def unmask(user_id: IdPath, body: UnmaskIn, op: Reviewer, svc: Svc, now: Now) -> dict[str, Any]:
    """The full phone number and real name (reviewers and admins), audit-logged with the reason."""
    return svc.users.unmask(op["operator_id"], user_id, body.reason, now)


@router.post("/users/{user_id}/adjustments", response_model=AdjustOut)
def adjust(user_id: IdPath, body: AdjustIn, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    """Correct a balance (fen) or points, signed, with a reason (admins; audited); never below zero."""
    return svc.users.adjust(op["operator_id"], user_id, body.kind, body.amount, body.reason, now)
