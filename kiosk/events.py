"""What goes into the dispensing core (events) and what comes out (actions).

Events carry no time: the core thread stamps each with its monotonic ``now_ms`` when it hands it
to :meth:`kiosk.session.DispenserCore.handle`. Actions are plain data; :mod:`kiosk.runtime` carries
them out in order, and stops a batch at the first one that fails (so a session whose row could not be
written never gets its valve opened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from contract.billing import points_for_fee
from contract.events import EventKind


class State(StrEnum):
    IDLE = "idle"                    # ready: QR on screen
    DISPENSING = "dispensing"        # a grant is live and the valve is open
    SETTLING = "settling"            # valve closed, counting overrun before the bill is final
    RECEIPT = "receipt"              # showing the bill
    OFFLINE = "offline"              # no link to the cloud: no new sessions
    OUT_OF_SERVICE = "out_of_service"  # a lockout (leak, fault, operator) holds the machine
    MAINTENANCE = "maintenance"      # a technician is at the machine
    UPDATING = "updating"            # a software update is switching releases: no new sessions until it restarts


class EndReason(StrEnum):
    STOP_BUTTON = "stop_button"
    CREDIT_EXHAUSTED = "credit_exhausted"
    MAX_VOLUME = "max_volume"
    MAX_DURATION = "max_duration"
    IDLE = "idle"
    CANCELLED = "cancelled"
    FAULT = "fault"
    LEAK = "leak"
    SHUTDOWN = "shutdown"
    POWER_LOSS = "power_loss"


class ClearSource(StrEnum):
    SITE = "site"        # a technician at the machine (maintenance mode or the local CLI)
    REMOTE = "remote"    # an operator through the cloud
    AUTO = "auto"        # the software itself, when the cause has gone (a sync thread that works again)


# Lockouts: reason -> who may clear it. A leak sensor's lockout is cleared on site only.
LOCKOUT_LEAK_SENSOR = "leak_sensor"
LOCKOUT_GHOST_FLOW = "ghost_flow"
LOCKOUT_REMOTE = "operator"
# Condition alarms: set while a condition lasts, cleared by the core when it ends.
LOCKOUT_TEMPERATURE = "temperature"
LOCKOUT_TDS = "tds"
LOCKOUT_LOW_WATER = "low_water"
CONDITION_LOCKOUTS = frozenset({LOCKOUT_TEMPERATURE, LOCKOUT_TDS, LOCKOUT_LOW_WATER})
SITE_ONLY_LOCKOUTS = frozenset({LOCKOUT_LEAK_SENSOR})


def fault_lockout(kind: str) -> str:
    return f"fault:{kind}"


@dataclass(frozen=True)
class Grant:
    """An authorization from the cloud to pour water for one session.

    ``expires_at_ms`` is on the core's monotonic clock: the sync layer converts the grant's absolute
    deadline (server time) with its measured clock offset, so a device with a wrong wall clock still
    expires it right. ``min_dispense_ml`` comes with the grant (the cloud's value for this machine), so
    the receipt and the bill waive the same small pours; ``None`` (local simulations and tests) takes the
    machine's configured value.
    """

    session_id: str
    machine_id: str
    user_ref: str
    price_fen_per_l: int
    credit_limit_fen: int
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    expires_at_ms: int
    min_dispense_ml: int | None = None
    balance_fen: int | None = None      # the person's balance when granted (None: unknown), for the receipt


# ---------------------------------------------------------------- events (inputs)

@dataclass(frozen=True)
class GrantReceived:
    grant: Grant


@dataclass(frozen=True)
class PulseCount:
    """The flow meter's cumulative pulse count since it started (monotonic, never reset)."""

    total_pulses: int


@dataclass(frozen=True)
class StopPressed:
    source: str = "button"   # "button" (the machine's) or "screen" (on-screen stop)


@dataclass(frozen=True)
class CancelReceived:
    session_id: str
    reason: str = ""


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class TemperatureReading:
    """Tank temperature in degrees C, or ``None`` when the sensor's reading is unknown."""

    temp_c: float | None


@dataclass(frozen=True)
class WaterQualityReading:
    """Total dissolved solids in mg/L (ppm); ``None`` when unknown; ``measured=False`` when no probe is
    fitted (shown as "not measured", never as a number)."""

    tds_ppm: int | None
    measured: bool = True


@dataclass(frozen=True)
class LowWater:
    """The tank's low-water switch: no sales while the tank is (nearly) empty."""

    low: bool


@dataclass(frozen=True)
class Fault:
    """A fault that makes pouring unsafe (flow meter, valve, storage, internal): closes the valve and
    locks the machine out of service until cleared."""

    kind: str
    detail: str = ""


@dataclass(frozen=True)
class SessionStartFailed:
    """The session row (or a technician's log row) could not be written, so the valve was not opened: drop
    the session or pour (nothing was poured, nothing is billed, there is no receipt) and lock out with a
    fault of ``kind`` (storage unless said otherwise)."""

    session_id: str
    detail: str = ""
    kind: str = "storage"


@dataclass(frozen=True)
class LeakSensor:
    wet: bool


@dataclass(frozen=True)
class LinkChanged:
    online: bool


@dataclass(frozen=True)
class SetOutOfService:
    """An operator takes the machine out of service. A running session finishes first."""

    detail: str = ""


@dataclass(frozen=True)
class ClearLockout:
    """Clear a lockout. ``refused_why`` is set by the runtime when a precondition it checked failed (a storage
    fault whose ledger still cannot be written): the core then refuses with that reason. ``ref`` is echoed in
    the records (the cloud command it answers)."""

    reason: str
    source: ClearSource = ClearSource.SITE
    actor: str = ""
    refused_why: str = ""
    ref: str = ""


@dataclass(frozen=True)
class EnterMaintenance:
    actor: str = ""


@dataclass(frozen=True)
class ExitMaintenance:
    actor: str = ""


@dataclass(frozen=True)
class PriceChanged:
    """The operator's new price, shown before the next grant (grants carry their own price)."""

    price_fen_per_l: int


@dataclass(frozen=True)
class MachineSettings:
    """The operator's settings from the cloud (at start and after every change): the price shown, which grants
    must match; the receipts' time zone; the hotline shown when the machine cannot serve."""

    price_fen_per_l: int
    timezone: str = ""
    hotline: str = ""


UPDATE_HOLD_MS = 180_000   # how long an update may hold the machine before it serves again by itself


@dataclass(frozen=True)
class BeginUpdate:
    """The updater asks to switch to release ``version``, which restarts the service. Accepted only when the
    machine is idle (no session, valve closed, no technician, no receipt on screen); from then on every start is
    refused until the restart, :class:`EndUpdate` or ``hold_ms`` later (so a switch that never happens never
    leaves the machine unusable). Checking idleness and refusing starts is one step on the core thread, so no
    pour can begin between the check and the restart. ``refused_why`` is set by the runtime when a precondition
    it checked failed (the valve is physically open)."""

    version: str
    hold_ms: int = UPDATE_HOLD_MS
    refused_why: str = ""


@dataclass(frozen=True)
class EndUpdate:
    """The switch did not happen (the applier refused or failed, or it never came): serve again."""

    version: str
    reason: str = "ended"


@dataclass(frozen=True)
class ReceiptDismissed:
    pass


@dataclass(frozen=True)
class Shutdown:
    """The process is stopping (SIGTERM, normal exit): end any session and close the valve now."""

    reason: str = "shutdown"


TECH_PURPOSES = ("calibration", "flush", "valve_test")


@dataclass(frozen=True)
class TechPour:
    """A technician opens the valve in maintenance mode: metered and logged, never billed, closed at the
    target volume or after ``max_ms`` (both clamped to the machine's hard maximum)."""

    purpose: str                        # one of TECH_PURPOSES
    target_ml: int | None = None        # None: until stopped or the time limit
    max_ms: int = 60_000
    actor: str = ""


@dataclass(frozen=True)
class TechStop:
    actor: str = ""


@dataclass(frozen=True)
class SetCalibration:
    """Accept a new flow-meter factor (from the calibration wizard). Only in maintenance, with no pour."""

    milli_pulses_per_litre: int
    actor: str = ""
    pours: tuple = ()                   # (pulses, measured_ml) pairs behind it, for the record


@dataclass(frozen=True)
class MaintenanceActivity:
    """The technician touched the maintenance screen: the inactivity timer starts again."""


Event = (GrantReceived | PulseCount | StopPressed | CancelReceived | Tick | TemperatureReading
         | WaterQualityReading | LowWater | Fault | SessionStartFailed | LeakSensor | LinkChanged
         | SetOutOfService | ClearLockout | EnterMaintenance | ExitMaintenance | ReceiptDismissed | Shutdown
         | PriceChanged | TechPour | TechStop | SetCalibration | MaintenanceActivity | MachineSettings
         | BeginUpdate | EndUpdate)


# ---------------------------------------------------------------- actions (outputs)

@dataclass(frozen=True)
class OpenValve:
    """Open the valve. ``close_at_total_pulses`` is armed in the hardware layer so the valve closes in
    the edge callback on the pulse that reaches the session's limit, without waiting for the core."""

    session_id: str
    close_at_total_pulses: int


@dataclass(frozen=True)
class CloseValve:
    reason: str


@dataclass(frozen=True)
class SessionStarted:
    """Write the session row. Must succeed before :class:`OpenValve` runs (it comes first in the batch)."""

    session_id: str
    user_ref: str
    price_fen_per_l: int
    credit_limit_fen: int
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    limit_pulses: int
    milli_pulses_per_litre: int
    min_dispense_ml: int
    started_mono_ms: int
    temp_c: float | None


@dataclass(frozen=True)
class Checkpoint:
    """Append a checkpoint of a running session (and add to the lifetime totalizer)."""

    session_id: str
    mono_ms: int
    billed_pulses: int
    overrun_pulses: int
    temp_c: float | None
    valve_open: bool
    totalizer_pulses: int = 0
    closing_reason: str | None = None   # set on the checkpoint written when the valve closes


@dataclass(frozen=True)
class SessionRecord:
    """A finished session: the bill and the rental record's summary."""

    session_id: str
    user_ref: str
    reason: str
    started_mono_ms: int
    closed_mono_ms: int
    ended_mono_ms: int
    price_fen_per_l: int
    credit_limit_fen: int
    milli_pulses_per_litre: int
    billed_pulses: int
    overrun_pulses: int
    volume_ml: int
    cost_fen: int
    below_minimum: bool
    temp_start_c: float | None
    temp_end_c: float | None
    tds_ppm: int | None = None          # water quality at the end of the session (None: unknown)
    tds_measured: bool = False
    tds_limit_ppm: int = 500

    @property
    def duration_ms(self) -> int:
        return self.closed_mono_ms - self.started_mono_ms

    @property
    def avg_flow_ml_per_min(self) -> int:
        return self.volume_ml * 60_000 // self.duration_ms if self.duration_ms > 0 else 0

    @property
    def points(self) -> int:
        """The growth points this bill earns, by the contract's rule (the cloud awards the same number)."""
        return points_for_fee(self.cost_fen)


@dataclass(frozen=True)
class SessionEnded:
    """Write the session's end and its outgoing report in one transaction."""

    record: SessionRecord
    totalizer_pulses: int = 0


@dataclass(frozen=True)
class AddToTotalizer:
    """Pulses seen outside any session (ghost flow, overrun after the bill was final)."""

    pulses: int


@dataclass(frozen=True)
class RecordEvent:
    """Append to the event log; a kind the contract marks reported is also queued for the cloud in the same
    transaction. ``required``: what follows in the batch (a valve opening) must not happen unless this is on
    disk. Build it with :meth:`of`, which checks the detail against the kind's model."""

    kind: EventKind
    detail: dict[str, Any] = field(default_factory=dict)
    required: bool = False

    @classmethod
    def of(cls, kind: EventKind, *, required: bool = False, **detail: Any) -> RecordEvent:
        return cls(kind, kind.detail_of(**detail), required)

    @property
    def report(self) -> bool:
        return self.kind.reported


@dataclass(frozen=True)
class SetLockout:
    reason: str
    active: bool
    detail: str = ""


@dataclass(frozen=True)
class SaveCalibration:
    """Persist the flow-meter factor (it outlives the configuration file's default)."""

    milli_pulses_per_litre: int


@dataclass(frozen=True)
class TechPourResult:
    purpose: str
    pulses: int                         # everything the meter counted, overrun included
    volume_ml: int                      # by the calibration in force during the pour
    duration_ms: int
    reason: str                         # target, max_time, max_volume, stopped, exit, fault, shutdown


Action = (OpenValve | CloseValve | SessionStarted | Checkpoint | SessionEnded | AddToTotalizer
          | RecordEvent | SetLockout | SaveCalibration)
