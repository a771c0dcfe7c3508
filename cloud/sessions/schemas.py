"""Request and response models of the sessions API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from cloud.schemas import In
from contract import PricePerLitre


class MachineInfoOut(BaseModel):
    machine_id: str
    location: str
    price_fen_per_l: int
    online: bool
    temp_c: float | None
    tds_ppm: int | None
    busy: bool
    state: str


class ScanOut(BaseModel):
    presence_token: str
    machine: MachineInfoOut


class StartIn(In):
    presence_token: Annotated[str, Field(min_length=10, max_length=200)]
    expected_price_fen_per_l: PricePerLitre


class StartOut(BaseModel):
    session_id: str
    state: str
    machine_id: str
    price_fen_per_l: int
    credit_limit_fen: int


class BillOut(BaseModel):
    session_id: str
    machine_id: str
    started_at: str
    ended_at: str
    duration_ms: int
    volume_ml: int
    avg_flow_ml_per_min: int
    amount_fen: int
    price_fen_per_l: int
    water_quality: dict[str, Any]
    points: int
    end_reason: str
    timezone: str = "Asia/Shanghai"
    started_local: str = ""
    ended_local: str = ""
    location: str = ""
    refunded_fen: int = 0


class SessionOut(BaseModel):
    session_id: str
    machine_id: str
    state: str
    price_fen_per_l: int
    credit_limit_fen: int
    progress: dict[str, Any] | None
    void_reason: str | None
    end_reason: str | None
    fee_fen: int | None
    volume_ml: int | None
    charged: bool
    bill: BillOut | None


class RunningSessionOut(BaseModel):
    """The session that holds part of the balance now: the phone shows it on every page."""
    session_id: str
    machine_id: str
    location: str
    state: str
    credit_limit_fen: int


class BillsOut(BaseModel):
    bills: list[BillOut]
