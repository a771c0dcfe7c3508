"""Request and response models of the operators API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from cloud.schemas import In
from contract import (
    LIMIT_BOUNDS,
    MachineIdStr,
    MaxCreditFen,
    MaxDurationMs,
    MaxIdleMs,
    MaxVolumeMl,
    MinDispenseMl,
    PricePerLitre,
)


class ProvisionIn(In):
    machine_id: MachineIdStr
    location: Annotated[str, Field(max_length=200)] = ""
    price_fen_per_l: PricePerLitre
    max_volume_ml: MaxVolumeMl = LIMIT_BOUNDS["max_volume_ml"].default
    max_duration_ms: MaxDurationMs = LIMIT_BOUNDS["max_duration_ms"].default
    max_idle_ms: MaxIdleMs = LIMIT_BOUNDS["max_idle_ms"].default
    max_credit_fen: MaxCreditFen = LIMIT_BOUNDS["max_credit_fen"].default
    min_dispense_ml: MinDispenseMl = LIMIT_BOUNDS["min_dispense_ml"].default


class MachineSettingsIn(In):
    """Any of a machine's price and limits, place (location, site), time zone and hotline; a price change is also
    sent to the machine."""

    location: Annotated[str, Field(max_length=200)] | None = None
    site: Annotated[str, Field(max_length=100)] | None = None       # a group of machines, for the console and reports
    price_fen_per_l: PricePerLitre | None = None
    max_volume_ml: MaxVolumeMl | None = None
    max_duration_ms: MaxDurationMs | None = None
    max_idle_ms: MaxIdleMs | None = None
    max_credit_fen: MaxCreditFen | None = None
    min_dispense_ml: MinDispenseMl | None = None
    timezone: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    hotline: Annotated[str, Field(max_length=40)] | None = None

    @model_validator(mode="after")
    def at_least_one(self) -> MachineSettingsIn:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one setting to change")
        if self.timezone is not None:
            from zoneinfo import ZoneInfo
            try:
                ZoneInfo(self.timezone)
            except (ValueError, KeyError, OSError) as e:
                raise ValueError(f"unknown time zone {self.timezone!r} (an IANA name such as Asia/Shanghai)") from e
        return self


class ProvisionOut(BaseModel):
    machine_id: str
    enrolment_token: str
    note: str


class MachineOut(BaseModel):
    machine_id: str
    location: str
    price_fen_per_l: int
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    max_credit_fen: int
    min_dispense_ml: int
    timezone: str
    hotline: str
    site: str = ""
    created_ms: int
    last_seen_ms: int | None
    heartbeat: dict[str, Any] | None
    open_session_id: str | None
    enrolled: bool
    online: bool


class CommandOut(BaseModel):
    command_id: str
    machine_id: str
    kind: str
    created_ms: int
    expires_ms: int
    delivered_ms: int | None
    acked_ms: int | None
    ack_ok: bool | None
    ack_reason: str | None


class MachinesOut(BaseModel):
    machines: list[MachineOut]


class ServiceIn(In):
    in_service: bool
    detail: Annotated[str, Field(max_length=500)] = ""


class ClearLockoutIn(In):
    reason: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z_:]+$")]    # the lockout to clear
    note: Annotated[str, Field(max_length=500)] = ""                # why the operator clears it (audited)


class CommandQueuedOut(BaseModel):
    machine_id: str
    command: str
    command_id: str


class AlarmOut(BaseModel):
    id: int
    machine_id: str
    event_id: str
    kind: str
    payload: dict[str, Any]
    received_ms: int
    occurred_ms: int


class SilentMachineOut(BaseModel):
    machine_id: str
    last_seen_ms: int | None


class ServiceAlarmOut(BaseModel):
    """An alarm that is not a machine's: payments (a refund that failed, an amount that did not match), SMS
    (the provider refused), reconciliation (the day's bill does not match our books)."""

    id: int
    source: str
    kind: str
    detail: dict[str, Any]
    created_ms: int


class AlarmsOut(BaseModel):
    alarms: list[AlarmOut]
    service_alarms: list[ServiceAlarmOut]
    silent_machines: list[SilentMachineOut]


class RecordOut(BaseModel):
    session_id: str
    machine_id: str
    user_id: str
    started_at: str
    ended_at: str
    started_ms: int
    record: dict[str, Any]


class RecordsOut(BaseModel):
    records: list[RecordOut]


class AuditEntryOut(BaseModel):
    id: int
    operator_id: str
    action: str
    target: str
    detail: dict[str, Any]
    at_ms: int


class AuditOut(BaseModel):
    entries: list[AuditEntryOut]
    actions: list[str]                  # every action ever logged, for the filter
    next_before_id: int | None          # more, older entries: ask again with before_id
