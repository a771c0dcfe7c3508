"""Request and response models of the console's users API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from cloud.schemas import In
from cloud.users.service import MAX_BALANCE_ADJUST_FEN, MAX_POINTS_ADJUST

Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=2, max_length=200)]


class UserRowOut(BaseModel):
    user_id: str
    phone_masked: str
    name_masked: str
    registered: bool
    identity_state: str
    points: int
    created_ms: int
    deleted_ms: int | None
    available_fen: int


class UsersOut(BaseModel):
    users: list[UserRowOut]
    next_before: str | None


class UserOut(UserRowOut):
    held_fen: int


class UserViewOut(BaseModel):
    user: UserOut
    identity: dict[str, Any] | None
    balance_entries: list[dict[str, Any]] = Field(description="newest first, each with the balance after it")
    points_entries: list[dict[str, Any]] = Field(description="newest first, each with the points after it")
    sessions: list[dict[str, Any]]
    bills: list[dict[str, Any]]
    topups: list[dict[str, Any]]
    provider_refunds: list[dict[str, Any]]
    balance_refunds: list[dict[str, Any]]
    limit: int


class UnmaskIn(In):
    reason: Reason


class UnmaskOut(BaseModel):
    user_id: str
    phone: str
    name: str | None


class AdjustIn(In):
    kind: Literal["balance", "points"]
    amount: Annotated[int, Field(description="fen (balance) or points, signed, not zero")]
    reason: Reason

    @model_validator(mode="after")
    def bounded(self) -> AdjustIn:
        most = MAX_BALANCE_ADJUST_FEN if self.kind == "balance" else MAX_POINTS_ADJUST
        if self.amount == 0 or abs(self.amount) > most:
            raise ValueError(f"amount: not zero, and at most {most} either way")
        return self


class AdjustOut(BaseModel):
    user_id: str
    kind: str
    amount: int
    after: int
