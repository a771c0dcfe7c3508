"""The messages between dispenser and cloud: pydantic models for every message, used by the cloud's API (and
its OpenAPI document) and by the dispenser to build what it sends and validate what it receives. Unknown
fields are refused; golden vectors in ``tests/test_protocol.py`` keep the wire format fixed."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

from contract.billing import MAX_MPPL, MIN_MPPL
from contract.events import CommandKind, EventKind
from contract.limits import (
    MaxCreditFen,
    MaxDurationMs,
    MaxIdleMs,
    MaxVolumeMl,
    MinDispenseMl,
    PricePerLitre,
)
from contract.signing import MACHINE_ID_RE


class Msg(BaseModel):
    """Every message: unknown fields refused, no type coercion ("100" is not a number, true is not 1), no NaN
    or infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


EARLIEST_MS, LATEST_MS = 1_577_836_800_000, 4_102_444_800_000     # 2020-01-01 .. 2100-01-01 UTC


def _iso_time(text: str) -> str:
    """An ISO 8601 UTC time a bill can show: parsed, and within 2020-2099 (a device clock can be wrong, but
    not by centuries; a time outside cannot be stored and shown later)."""
    from datetime import datetime
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"not an ISO 8601 time: {text[:40]!r}") from e
    if at.tzinfo is None:
        raise ValueError("a time needs its UTC offset (Z)")
    if not EARLIEST_MS <= at.timestamp() * 1000 < LATEST_MS:
        raise ValueError(f"{text[:40]} is outside 2020-2099")
    return text


IsoTime = Annotated[str, Field(max_length=40), AfterValidator(_iso_time)]
MAX_JSON_DEPTH = 8
MAX_JSON_INT = 2 ** 53


def json_problem(value: Any, depth: int = 0) -> str | None:
    """Why a free-form JSON value cannot be stored and shown (NaN, infinity, a NUL character, a number past
    2^53, nesting deeper than 8), or None."""
    if depth > MAX_JSON_DEPTH:
        return "nested too deeply"
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) and abs(value) < MAX_JSON_INT else f"number {value!r} is not finite"
    if isinstance(value, int):
        return None if abs(value) <= MAX_JSON_INT else "a number past 2^53"
    if isinstance(value, str):
        return "a NUL character in a string" if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            why = json_problem(k, depth + 1) or json_problem(v, depth + 1)
            if why:
                return why
        return None
    if isinstance(value, list):
        for v in value:
            why = json_problem(v, depth + 1)
            if why:
                return why
        return None
    return f"unexpected {type(value).__name__}"


Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Fen = Annotated[int, Field(ge=0, le=100_000_000)]
MachineIdStr = Annotated[str, Field(min_length=1, max_length=64, pattern=MACHINE_ID_RE.pattern)]
Ms = Annotated[int, Field(ge=0, le=86_400_000)]
Pulses = Annotated[int, Field(ge=0, le=1_000_000_000)]


GRANT_DEADLINE_MS = 8_000       # a grant must be claimed by the machine within this long of the start
GRANT_SKEW_MS = 2_000           # the cloud voids an unclaimed start only this long after its deadline


class GrantMsg(Msg):
    """The cloud's authorization to pour, inside a ``start`` command.

    ``deadline_ms`` is absolute, in the server's time (Unix ms): the machine refuses a grant it receives
    after it (by its server-corrected clock), and claims it (:class:`AckMsg` ``ok``) before the valve
    opens; the cloud voids an unclaimed start only after ``deadline_ms + GRANT_SKEW_MS``, and a claim
    that arrives after the void is refused, so "not charged" on the phone is always true.
    ``min_dispense_ml``: a session that pours less is not charged, on the receipt and on the bill.
    ``balance_fen``: the person's available balance when granted (the receipt shows what is left after the pour;
    the credit limit may be capped lower than the balance).
    """

    session_id: Id
    machine_id: Id
    user_ref: Id
    price_fen_per_l: PricePerLitre
    credit_limit_fen: MaxCreditFen
    max_volume_ml: MaxVolumeMl
    max_duration_ms: MaxDurationMs
    max_idle_ms: MaxIdleMs
    deadline_ms: Annotated[int, Field(ge=0, le=10 ** 14)]
    min_dispense_ml: MinDispenseMl
    balance_fen: Fen | None = None


class CommandMsg(Msg):
    command_id: Id
    kind: Annotated[CommandKind, Strict(False)]      # its wire name ("start") is accepted
    grant: GrantMsg | None = None
    session_id: Id | None = None
    price_fen_per_l: PricePerLitre | None = None
    detail: Annotated[str, Field(max_length=500)] = ""
    reason: Annotated[str, Field(max_length=64)] = ""


class CommandsResponse(Msg):
    commands: list[CommandMsg]
    server_time_ms: int


class AckMsg(Msg):
    """The device's answer to a command: ``ok`` or refused with a reason (a code) and a detail for people.

    For a ``start``: ``ok`` claims the session before the valve opens (the cloud answers whether it is
    still valid, :class:`AckResult`); ``ok = false`` refuses it, or, after a claim, says the valve never
    opened (``reason = "session_start_failed"``): the cloud then voids the session and raises an alarm.
    """

    ok: bool
    reason: Annotated[str, Field(max_length=200)] = ""
    detail: Annotated[str, Field(max_length=500)] = ""


class AckResult(Msg):
    """The cloud's answer to an acknowledgement. For a start: ``session_state`` is ``active`` when the claim
    holds (pour), anything else when it does not (``voided``, ``ended``, ``lost``: do not pour)."""

    ok: bool = True
    session_state: str | None = None


EVENT_ID_RE = r"^(?:[0-9a-f]{16}-)?[0-9]+-[0-9]+$"


class DeviceEvent(Msg):
    """One outbox row: ``event_id`` is ``<ledger_id>-<boot_id>-<seq>``, the idempotency key (unique per
    ledger file: a replaced ledger gets a new random ``ledger_id``). Older ledgers sent ``<boot_id>-<seq>``."""

    event_id: Annotated[str, Field(min_length=3, max_length=40, pattern=EVENT_ID_RE)]
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    payload: dict[str, Any]
    # how long ago it happened, by the device's own clock at sending: the server dates the event
    # "received minus age", right even when the device's wall clock is wrong
    age_ms: Annotated[int, Field(ge=0, le=10 * 365 * 86_400_000)] = 0


class EventBatch(Msg):
    events: Annotated[list[DeviceEvent], Field(min_length=1, max_length=200)]


class EventResult(Msg):
    event_id: str
    status: Literal["accepted", "duplicate", "rejected"]
    detail: str = ""


class EventBatchResult(Msg):
    results: list[EventResult]
    server_time_ms: int


class ReportEnvelope(Msg):
    """What every outbox payload carries (added by the ledger when it queues the report)."""

    event_id: Annotated[str, Field(min_length=3, max_length=40, pattern=EVENT_ID_RE)]
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    machine_id: Id
    boot_id: Annotated[int, Field(ge=0, le=MAX_JSON_INT)]
    created_at: IsoTime


class EventReportPayload(ReportEnvelope):
    """Any report but a session's end: the event log's detail."""

    detail: dict[str, Any] = Field(default_factory=dict)


FLOW_SERIES_COLUMNS = ("t_ms", "billed_pulses", "overrun_pulses", "temp_c", "valve_open")


class SessionEndedPayload(ReportEnvelope):
    """The rental record a dispenser reports when a session ends (``kind = "session_ended"``). Unknown fields
    are refused: a field one side adds and the other drops fails a test instead of vanishing."""

    session_id: Id
    user_ref: Id
    reason: Annotated[str, Field(min_length=1, max_length=32)]
    recovered: bool = False
    started_at: IsoTime
    closed_at: IsoTime
    ended_at: IsoTime
    duration_ms: Annotated[int, Field(ge=0, le=86_400_000)]
    price_fen_per_l: PricePerLitre
    credit_limit_fen: Fen
    min_dispense_ml: MinDispenseMl
    milli_pulses_per_litre: Annotated[int, Field(ge=1_000, le=100_000_000)]
    billed_pulses: Pulses
    overrun_pulses: Pulses = 0
    volume_ml: Annotated[int, Field(ge=0, le=1_000_000)]
    cost_fen: Fen
    below_minimum: bool = False
    avg_flow_ml_per_min: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    temp_start_c: float | None = None
    temp_end_c: float | None = None
    water_quality: dict[str, Any] = Field(default_factory=dict)
    flow_series_columns: list[str] = Field(default_factory=lambda: list(FLOW_SERIES_COLUMNS))
    flow_series: Annotated[list[list[Any]], Field(max_length=1_000)] = Field(default_factory=list)
    valve_events: Annotated[list[list[Any]], Field(max_length=100)] = Field(default_factory=list)


def report_payload(kind: str, payload: dict[str, Any]) -> ReportEnvelope:
    """Parse an outbox payload with the model for its kind (raises ValueError, or pydantic's ValidationError,
    which is one)."""
    why = json_problem(payload)
    if why:
        raise ValueError(f"the payload cannot be stored: {why}")
    try:
        kind = EventKind(kind)
    except ValueError:
        raise ValueError(f"unknown event kind {kind[:64]!r}") from None
    if not kind.reported:
        raise ValueError(f"{kind.value} events are not reported")
    if kind is EventKind.SESSION_ENDED:
        return SessionEndedPayload.model_validate(payload)
    report = EventReportPayload.model_validate(payload)
    kind.detail_model.model_validate(report.detail)
    return report


CALIBRATION_RANGE_MPPL = (MIN_MPPL, MAX_MPPL)   # a factor outside it is no real meter's


class ProgressMsg(Msg):
    session_id: Id
    volume_ml: Annotated[int, Field(ge=0, le=1_000_000)]
    cost_fen: Fen
    flow_ml_per_min: Annotated[int, Field(ge=0, le=1_000_000)]
    elapsed_ms: Ms


class ConsumableMsg(Msg):
    """A consumable's use as the machine counts it (its maintenance screen shows the same): litres poured and days
    since it was replaced, against its life (0: not limited that way). ``used_permille`` is the larger share;
    ``due`` says the machine asks for a replacement (it warns from 90 % of either life)."""

    kind: Literal["filter", "uv_lamp"]
    used_l: Annotated[int, Field(ge=0, le=MAX_JSON_INT)]
    life_l: Annotated[int, Field(ge=0, le=1_000_000)]
    used_days: Annotated[int, Field(ge=0, le=100_000)]
    life_days: Annotated[int, Field(ge=0, le=100_000)]
    used_permille: Annotated[int, Field(ge=0, le=MAX_JSON_INT)]
    due: bool


class HeartbeatMsg(Msg):
    """A machine's telemetry. ``consumables`` and ``price_fen_per_l`` (the price its screen shows now) are newer
    than the rest: a machine with older software leaves them out (``None``: not known), and is still accepted."""

    state: Annotated[str, Field(max_length=32)]
    session_id: Id | None = None
    valve_open: bool
    temp_c: float | None = None
    tds_ppm: int | None = None
    outbox_depth: Annotated[int, Field(ge=0)] = 0
    totalizer_pulses: Annotated[int, Field(ge=0)] = 0
    lockouts: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=20)
    software_version: Annotated[str, Field(max_length=40)] = ""
    boot_id: Annotated[int, Field(ge=0)] = 0
    dead_letters: Annotated[int, Field(ge=0)] = 0
    uptime_s: Annotated[int, Field(ge=0)] = 0
    consumables: Annotated[list[ConsumableMsg], Field(max_length=4)] | None = None
    price_fen_per_l: PricePerLitre | None = None


class TimeResponse(Msg):
    server_time_ms: int


class MachineSettingsMsg(Msg):
    """What the machine shows that the operator sets in the cloud: the price (shown = charged, by China's
    price-marking rules), the time zone of its receipts and bills, and the operator's hotline."""

    price_fen_per_l: PricePerLitre
    timezone: Annotated[str, Field(min_length=1, max_length=64)]
    hotline: Annotated[str, Field(max_length=40)] = ""


UPDATE_STEPS = ("downloading", "downloaded", "verified", "installed", "deferred", "switched", "healthy",
                "rolled_back", "refused", "failed")
ReleaseVersion = Annotated[str, Field(pattern=r"^\d{1,6}(?:\.\d{1,6}){1,3}$")]


class UpdateOfferMsg(Msg):
    """A release the cloud asks the machine to install, in the heartbeat's answer while a rollout includes the
    machine (left out otherwise: a machine whose software predates updates never sees the field). ``url`` is a
    signed device request's path; ``sha256`` and ``size_bytes`` are the whole bundle file's, checked before it is
    opened (the bundle's own signature is checked after)."""

    rollout_id: Annotated[int, Field(ge=1, le=2**31 - 1)]
    version: ReleaseVersion
    url: Annotated[str, Field(pattern=r"^/device/v1/releases/[0-9.]{3,30}/bundle$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size_bytes: Annotated[int, Field(ge=1, le=400 * 1024 * 1024)]


class UpdateReportMsg(Msg):
    """Each step of a machine's update (``POST /device/v1/update-report``): downloading, downloaded, verified,
    installed, deferred (busy: water flowing or maintenance), switched, healthy (the new release reached the
    cloud), rolled_back, refused (``reason``: the bundle's refusal code) or failed."""

    rollout_id: Annotated[int, Field(ge=1, le=2**31 - 1)]
    version: ReleaseVersion
    step: Literal[UPDATE_STEPS]  # type: ignore[valid-type]
    reason: Annotated[str, Field(max_length=40, pattern=r"^[a-z0-9_]*$")] = ""
    detail: Annotated[str, Field(max_length=500)] = ""
    running_version: Annotated[str, Field(max_length=40)] = ""


class HeartbeatResponse(Msg):
    server_time_ms: int
    settings: MachineSettingsMsg
    update: UpdateOfferMsg | None = None
