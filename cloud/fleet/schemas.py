"""Request and response models of the console's fleet and machine pages."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from cloud.schemas import In
from contract import MachineIdStr, PricePerLitre

MAX_BULK = 1000


class FleetRowOut(BaseModel):
    machine_id: str
    site: str
    location: str
    online: bool
    enrolled: bool
    last_seen_ms: int | None
    state: str | None                   # the heartbeat's; None: never heard from
    lockouts: list[str]
    open_alarms: int                    # operator alarms not resolved
    price_fen_per_l: int                # set in the cloud
    displayed_price_fen_per_l: int | None   # on the machine's screen, as its heartbeat says (None: not said)
    price_mismatch: bool
    software_version: str | None
    outbox_depth: int | None
    dead_letters: int | None
    temp_c: float | None
    tds_ppm: int | None
    filter_used_permille: int | None
    filter_due: bool
    uv_used_permille: int | None
    uv_due: bool


class FleetStatsOut(BaseModel):
    """The whole fleet's figures (not only the rows that match)."""

    machines: int
    online: int
    offline: int
    online_share_pct: float | None
    with_alarms: int
    with_lockouts: int
    price_mismatches: int


class FleetOut(BaseModel):
    machines: list[FleetRowOut]
    total: int                          # rows that match the filters
    offset: int
    limit: int
    stats: FleetStatsOut
    sites: list[str]                    # for the filters
    states: list[str]


class BulkPriceIn(In):
    machine_ids: Annotated[list[MachineIdStr], Field(min_length=1, max_length=MAX_BULK)]
    price_fen_per_l: PricePerLitre


class BulkPriceOut(BaseModel):
    machine_ids: list[str]
    price_fen_per_l: int


class MachineAlarmOut(BaseModel):
    alarm_id: int
    rule: str
    title_zh: str                       # the rule in words
    title_en: str
    severity: str
    state: str
    detail: dict[str, Any]
    opened_ms: int
    last_ms: int


class MachineDetailOut(FleetRowOut):
    timezone: str
    hotline: str
    created_ms: int
    open_session_id: str | None
    heartbeat: dict[str, Any] | None
    limits: dict[str, int]
    alarms: list[MachineAlarmOut]


class SamplesOut(BaseModel):
    at_ms: list[int]
    temp_c: list[float | None]
    tds_ppm: list[int | None]


class HoursOut(BaseModel):
    at_ms: list[int]                    # the start of each hour of the machine's clock
    litres: list[float]                 # poured in sessions that ended in it


class SeriesOut(BaseModel):
    machine_id: str
    range: str
    timezone: str
    from_ms: int
    to_ms: int
    sample_every_ms: int
    samples: SamplesOut
    hours: HoursOut


class MachineEventOut(BaseModel):
    id: int
    event_id: str
    kind: str
    payload: dict[str, Any]
    received_ms: int
    occurred_ms: int
    alarm: bool


class MachineEventsOut(BaseModel):
    events: list[MachineEventOut]
    next_offset: int | None             # more, older events: ask again with this offset


class MachineCommandOut(BaseModel):
    command_id: str
    kind: str
    body: dict[str, Any]
    created_ms: int
    expires_ms: int
    delivered_ms: int | None
    acked_ms: int | None
    ack_ok: bool | None
    ack_reason: str | None


class MachineCommandsOut(BaseModel):
    commands: list[MachineCommandOut]


class MachineSessionOut(BaseModel):
    session_id: str
    user_id: str
    state: str
    created_ms: int
    ended_ms: int | None
    end_reason: str | None
    volume_ml: int | None
    fee_fen: int | None
    price_fen_per_l: int


class MachineSessionsOut(BaseModel):
    sessions: list[MachineSessionOut]
