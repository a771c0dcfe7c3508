"""Request and response models of the dev API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from cloud.schemas import In


class DevSmsOut(BaseModel):
    note: str
    messages: list[dict[str, Any]]


class DevUserIn(In):
    phone: Annotated[str, Field(pattern=r"^1[3-9][0-9]{9}$")]
    balance_fen: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    registered: bool = True


class DevUserOut(BaseModel):
    user_id: str
    token: str
