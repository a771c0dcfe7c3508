"""Request and response models of the console's sessions (rental records) API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from cloud.schemas import In


class SessionRowOut(BaseModel):
    session_id: str
    machine_id: str
    location: str
    user_id: str
    phone_masked: str
    state: str
    stuck: bool
    created_ms: int
    ended_ms: int | None
    end_reason: str | None
    void_reason: str | None
    fee_fen: int | None
    volume_ml: int | None
    price_fen_per_l: int
    credit_limit_fen: int


class SessionsOut(BaseModel):
    sessions: list[SessionRowOut]
    next_before: str | None = Field(description="the cursor of the next (older) page, if there may be one")
    scanned_to_ms: int | None = Field(description="set when the page stopped after looking at many sessions "
                                                  "without filling up: searched back to then")
    count: int | None = Field(description="how many sessions match, when that is cheap to count (first page, "
                                          "no state, end reason or amount filter)")
    count_capped: bool | None = Field(description="more match than count says")


class FlowOut(BaseModel):
    source: str = Field(description="record (the machine's flow series), progress (its last message while "
                                    "pouring) or none")
    samples: int = Field(description="how many samples the machine sent (the chart adds the valve opening)")
    t_ms: list[int]
    volume_ml: list[int]
    flow_ml_per_min: list[int | None]
    temp_c: list[float | None]


class TemperaturesOut(BaseModel):
    start_c: float | None
    end_c: float | None
    min_c: float | None
    max_c: float | None


class ValveOut(BaseModel):
    at_ms: int
    action: str
    reason: str


class EntryOut(BaseModel):
    entry_id: int
    kind: str
    amount_fen: int
    note: str
    created_ms: int


class ProviderRefundOut(BaseModel):
    refund_id: str
    provider: str
    amount_fen: int
    state: str
    reason: str
    requested_by: str
    created_ms: int
    done_ms: int | None
    last_error: str | None


class MoneyOut(BaseModel):
    held_fen: int
    released_fen: int
    charged_fen: int
    refunded_fen: int
    refundable_fen: int
    to_original_fen: int
    entries: list[EntryOut]
    provider_refunds: list[ProviderRefundOut]


class RecordUserOut(BaseModel):
    user_id: str
    phone_masked: str
    deleted: bool


class RecordOut(BaseModel):
    session: dict[str, Any]
    machine: dict[str, Any] | None
    user: RecordUserOut
    bill: dict[str, Any] | None
    record: dict[str, Any] | None = Field(description="the rental record the machine reported (s7), as it sent it")
    flow: FlowOut
    temperatures: TemperaturesOut
    valve: list[ValveOut]
    events: list[dict[str, Any]]
    money: MoneyOut
    stuck: bool


Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=2, max_length=200)]


class CloseIn(In):
    reason: Reason


class CloseOut(BaseModel):
    session_id: str
    state: str
    released_fen: int
    cancel_command_id: str | None
