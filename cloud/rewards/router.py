"""Points and gifts (s6): a person's points, the gift catalogue and redemptions, and the operators' catalogue."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from cloud.deps import IdPath, Now, Operator, Svc, TimeMs, User, Viewer
from cloud.errors import ERRORS
from cloud.rewards.schemas import (
    GiftChangeIn,
    GiftIn,
    GiftOut,
    GiftsOut,
    OperatorRedemptionsOut,
    PointsOut,
    RedeemIn,
    RedemptionOut,
    RedemptionsOut,
)
from cloud.schemas import OkOut

router = APIRouter(prefix="/api/v1", tags=["points"], responses=ERRORS)


@router.get("/me/points", response_model=PointsOut)
def points(user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.rewards.history(user_id)


@router.get("/gifts", response_model=GiftsOut)
def gifts(svc: Svc) -> dict[str, Any]:
    return {"gifts": svc.rewards.catalog()}


@router.post("/gifts/{gift_id}/redeem", response_model=RedemptionOut)
def redeem(gift_id: IdPath, body: RedeemIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Redeem points for a gift, once per request id (a retried request returns the same redemption)."""
    return svc.rewards.redeem(user_id, gift_id, body.request_id, now)


@router.get("/me/redemptions", response_model=RedemptionsOut)
def redemptions(user_id: User, svc: Svc) -> dict[str, Any]:
    return {"redemptions": svc.rewards.redemptions(user_id)}


@router.get("/operator/gifts", response_model=GiftsOut, tags=["operator"])
def all_gifts(op: Viewer, svc: Svc) -> dict[str, Any]:
    return {"gifts": svc.rewards.catalog(include_inactive=True)}


@router.post("/operator/gifts", response_model=GiftOut, tags=["operator"])
def add_gift(body: GiftIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.rewards.add_gift(op["operator_id"], body.name_zh, body.name_en, body.points_cost, body.stock, now)


@router.patch("/operator/gifts/{gift_id}", response_model=GiftOut, tags=["operator"])
def change_gift(gift_id: IdPath, body: GiftChangeIn, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.rewards.change_gift(op["operator_id"], gift_id, body.model_dump(exclude_none=True), now)


@router.get("/operator/redemptions", response_model=OperatorRedemptionsOut, tags=["operator"])
def all_redemptions(op: Viewer, svc: Svc, state: Literal["waiting", "picked_up", "all"] = "all",
                    code: Annotated[str, Query(max_length=16, pattern=r"^[0-9]*$")] = "",
                    limit: Annotated[int, Query(ge=1, le=500)] = 100, before_ms: TimeMs = 2**62) -> dict[str, Any]:
    """Redemptions with their pickup codes, newest first (``before_ms`` pages on)."""
    return {"redemptions": svc.rewards.all_redemptions(state, code, limit, before_ms)}


@router.post("/operator/redemptions/{redemption_id}/picked-up", response_model=OkOut, tags=["operator"])
def picked_up(redemption_id: IdPath, op: Operator, svc: Svc, now: Now) -> dict[str, Any]:
    """Mark a gift handed over (once; audited)."""
    svc.rewards.picked_up(op["operator_id"], redemption_id, now)
    return {"ok": True}
