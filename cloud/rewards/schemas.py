"""Request and response models of the rewards API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from cloud.schemas import In


class PointsEntryOut(BaseModel):
    delta: int
    kind: str
    ref: str | None
    note: str
    created_ms: int


class PointsOut(BaseModel):
    points: int
    rule: str
    history: list[PointsEntryOut]


class GiftOut(BaseModel):
    gift_id: str
    name_zh: str
    name_en: str
    points_cost: int
    stock: int
    active: bool


class GiftsOut(BaseModel):
    gifts: list[GiftOut]


class GiftIn(In):
    name_zh: Annotated[str, Field(min_length=1, max_length=100)]
    name_en: Annotated[str, Field(min_length=1, max_length=100)]
    points_cost: Annotated[int, Field(ge=1, le=1_000_000)]
    stock: Annotated[int, Field(ge=0, le=1_000_000)]


class GiftChangeIn(In):
    name_zh: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    name_en: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    points_cost: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    stock: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    stock_add: Annotated[int, Field(ge=-1_000_000, le=1_000_000)] | None = None   # restock relative to now
    active: bool | None = None

    @model_validator(mode="after")
    def at_least_one(self) -> GiftChangeIn:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one field to change")
        return self


class RedeemIn(In):
    request_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class RedemptionOut(BaseModel):
    redemption_id: str
    gift_id: str
    points: int
    pickup_code: str
    created_ms: int
    name_zh: str
    name_en: str
    repeated: bool


class RedemptionsOut(BaseModel):
    redemptions: list[RedemptionOut]


class OperatorRedemptionOut(BaseModel):
    redemption_id: str
    user_id: str
    phone_masked: str
    gift_id: str
    name_zh: str
    name_en: str
    points: int
    pickup_code: str
    created_ms: int
    picked_up_ms: int | None
    picked_up_by: str | None


class OperatorRedemptionsOut(BaseModel):
    redemptions: list[OperatorRedemptionOut]
