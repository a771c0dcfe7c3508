"""Every kind of event a dispenser logs or the cloud raises, with its typed detail, whether the dispenser
reports it to the cloud and whether operators see it as an alarm: declared here once.

The dispenser builds an event's detail only through its kind (:meth:`EventKind.detail_of`), so a field
one side adds and the other does not know fails a test instead of vanishing; the cloud parses every reported
detail with the same model (:func:`contract.messages.report_payload`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _clipped(length: int) -> BeforeValidator:
    """Free text in a log detail is cut to its bound, never refused: recording what happened must not fail
    because an error message or an actor's name was long."""
    return BeforeValidator(lambda v: v[:length] if isinstance(v, str) else v)


Text = Annotated[str, _clipped(500), Field(max_length=500)]
Code = Annotated[str, _clipped(64), Field(max_length=64)]
Count = Annotated[int, Field(ge=0, le=2 ** 53)]


class Detail(BaseModel):
    """An event's detail: unknown fields refused, no coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False,
                              validate_by_name=True, validate_by_alias=True)

    def wire(self) -> dict[str, Any]:
        """The detail as stored and sent (JSON types, field aliases such as ``from``)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class NoDetail(Detail):
    pass


class Boot(Detail):
    version: Code
    boot_id: Count
    recovered_sessions: list[Code] = Field(default_factory=list, max_length=1_000)
    totalizer_pulses: Count


class Actor(Detail):
    actor: Code


class ActorRefused(Detail):
    actor: Code
    why: Text


class GrantRejected(Detail):
    session_id: Code
    reason: Code


class SessionRef(Detail):
    session_id: Code
    state: Code


class Condition(Detail):
    """A lockout or a cleared condition: its reason code and the words for people."""

    reason: Code
    detail: Text = ""


class LockoutClear(Detail):
    reason: Code
    source: Code
    actor: Code
    ref: Code | None = None
    why: Text | None = None


class TechPourRefused(Detail):
    purpose: Code
    actor: Code
    why: Text


class TechPourStarted(Detail):
    purpose: Code
    actor: Code
    target_ml: Count | None
    max_ms: Count


class TechPour(Detail):
    purpose: Code
    actor: Code
    pulses: Count
    overrun_pulses: Count
    volume_ml: Count
    duration_ms: Count
    reason: Code
    milli_pulses_per_litre: Count
    billed: bool


class CalibrationChanged(Detail):
    from_mppl: Count = Field(alias="from")
    to_mppl: Count = Field(alias="to")
    actor: Code
    pours: list[list[int]] = Field(max_length=1_000)


class PriceRefused(Detail):
    price_fen_per_l: int


class PriceChanged(Detail):
    from_fen_per_l: Count | None = Field(alias="from")
    to_fen_per_l: Count = Field(alias="to")


class GhostFlow(Detail):
    pulses: Count
    volume_ml: Count


class PinLocked(Detail):
    locked_for_ms: Count


class PinFailed(Detail):
    attempts_left: Count


class ConsumableReplaced(Detail):
    kind: Code
    actor: Code


class DeadLettered(Detail):
    event_id: Code
    kind: Code
    error: Text


class DeadLetterRetried(Detail):
    event_id: Code


class DeadLetterDiscarded(Detail):
    event_id: Code
    kind: Code
    payload: dict[str, Any]
    error: Text | None
    actor: Code


class SessionRecovered(Detail):
    session_id: Code
    reason: Code
    billed_pulses: Count
    cost_fen: Count


class StartFailed(Detail):
    session_id: Code
    detail: Text
    fault: Code | None = None          # the dispenser's fault kind (its own log; the cloud learns it from the ack)


class LeakSensorDry(Detail):
    locked_out: bool


class StorageRetry(Detail):
    ok: bool


class SessionLost(Detail):
    session_id: Code
    user_id: Code
    why: Text
    released_fen: Count


class ImplausibleReport(Detail):
    session_id: Code
    problems: list[Text]
    billed_pulses: Count
    milli_pulses_per_litre: Count
    billed_fen: Count


class UpdateHold(Detail):
    """The machine stopped taking starts so a software update can switch and restart it."""

    version: Code
    hold_ms: Count


class UpdateHoldRefused(Detail):
    version: Code
    why: Text


class UpdateHoldEnded(Detail):
    version: Code
    reason: Code


class SessionEnded(Detail):
    """Placeholder: a session's end is reported as :class:`contract.messages.SessionEndedPayload`."""


class EventKind(StrEnum):
    """An event kind: its wire name, its detail model, whether the dispenser reports it to the cloud, whether
    it is an operator alarm, and who raises it (the dispenser, or the cloud itself)."""

    def __new__(cls, value: str, detail: type[Detail], reported: bool = False, alarm: bool = False,
                by_cloud: bool = False) -> EventKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.detail_model = detail
        member.reported = reported
        member.alarm = alarm
        member.by_cloud = by_cloud
        return member

    # the machine's life
    BOOT = "boot", Boot, True
    STORAGE_RETRY = "storage_retry", StorageRetry
    LINK_UP = "link_up", NoDetail
    LINK_DOWN = "link_down", NoDetail
    # sessions
    SESSION_ENDED = "session_ended", SessionEnded, True
    SESSION_RECOVERED = "session_recovered", SessionRecovered
    GRANT_REJECTED = "grant_rejected", GrantRejected, True
    CANCEL_IGNORED = "cancel_ignored", SessionRef
    # arrives with the refused start's acknowledgement: a machine whose ledger cannot be written cannot queue it
    SESSION_START_FAILED = "session_start_failed", StartFailed, False, True
    PRICE_CHANGED = "price_changed", PriceChanged
    PRICE_REFUSED = "price_refused", PriceRefused
    # conditions and lockouts
    LOCKOUT = "lockout", Condition, True, True
    ALARM_CLEARED = "alarm_cleared", Condition, True
    GHOST_FLOW = "ghost_flow", GhostFlow, True, True
    LEAK_SENSOR_DRY = "leak_sensor_dry", LeakSensorDry
    LOCKOUT_CLEARED = "lockout_cleared", LockoutClear, True
    LOCKOUT_CLEAR_REFUSED = "lockout_clear_refused", LockoutClear, True, True
    LOCKOUT_CLEAR_IGNORED = "lockout_clear_ignored", LockoutClear
    # maintenance
    MAINTENANCE_ENTERED = "maintenance_entered", Actor, True
    MAINTENANCE_EXITED = "maintenance_exited", Actor, True
    MAINTENANCE_REFUSED = "maintenance_refused", ActorRefused, True
    MAINTENANCE_PIN_OK = "maintenance_pin_ok", NoDetail, True
    MAINTENANCE_PIN_FAILED = "maintenance_pin_failed", PinFailed, True
    MAINTENANCE_PIN_LOCKED = "maintenance_pin_locked", PinLocked, True
    MAINTENANCE_PIN_SET = "maintenance_pin_set", Actor, True
    TECH_POUR_STARTED = "tech_pour_started", TechPourStarted
    TECH_POUR = "tech_pour", TechPour, True
    TECH_POUR_REFUSED = "tech_pour_refused", TechPourRefused, True
    CALIBRATION_CHANGED = "calibration_changed", CalibrationChanged, True
    CALIBRATION_REFUSED = "calibration_refused", ActorRefused, True
    CONSUMABLE_REPLACED = "consumable_replaced", ConsumableReplaced, True
    # software updates (the machine's own log: the cloud hears of updates through update reports)
    UPDATE_HOLD = "update_hold", UpdateHold
    UPDATE_HOLD_REFUSED = "update_hold_refused", UpdateHoldRefused
    UPDATE_HOLD_ENDED = "update_hold_ended", UpdateHoldEnded
    # the outbox
    REPORT_DEAD_LETTERED = "report_dead_lettered", DeadLettered, True, True
    DEAD_LETTER_RETRIED = "dead_letter_retried", DeadLetterRetried
    DEAD_LETTER_DISCARDED = "dead_letter_discarded", DeadLetterDiscarded
    # raised by the cloud itself
    SESSION_LOST = "session_lost", SessionLost, False, True, True
    IMPLAUSIBLE_REPORT = "implausible_report", ImplausibleReport, False, True, True

    def detail_of(self, **fields: Any) -> dict[str, Any]:
        """This kind's detail, validated, as stored and sent (raises pydantic's ValidationError)."""
        return self.detail_model.model_validate(fields).wire()


# Device events the cloud shows operators as alarms (a test makes each happen and finds it among the cloud's
# alarms), and the alarms the cloud raises itself.
ALARM_EVENT_KINDS = frozenset(k.value for k in EventKind if k.alarm and not k.by_cloud)
CLOUD_ALARM_KINDS = frozenset(k.value for k in EventKind if k.alarm and k.by_cloud)
REPORTED_EVENT_KINDS = frozenset(k.value for k in EventKind if k.reported)
START_FAILED = EventKind.SESSION_START_FAILED.value


class CommandKind(StrEnum):
    """What the cloud may ask a dispenser to do."""

    START = "start"
    CANCEL = "cancel"
    PRICE = "price"
    OUT_OF_SERVICE = "out_of_service"
    IN_SERVICE = "in_service"
    CLEAR_LOCKOUT = "clear_lockout"


__all__ = [
    "ALARM_EVENT_KINDS",
    "CLOUD_ALARM_KINDS",
    "REPORTED_EVENT_KINDS",
    "START_FAILED",
    "CommandKind",
    "Detail",
    "EventKind",
]
