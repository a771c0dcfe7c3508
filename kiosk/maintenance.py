"""What the maintenance screens do, outside the pure core: the PIN (hash and lockout kept in the ledger),
consumable counters, dead letters, the event log and machine information. Every method may touch the
ledger or the disk, so the UI calls them on a worker thread, never on Kivy's thread; what changes the
valve or the machine's state goes to the core as an event."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any

from contract.events import EventKind as K
from kiosk import pin as pins
from kiosk.calibration import Pour, check_pour, compute
from kiosk.config import Config, MaintenanceConfig
from kiosk.events import (
    LOCKOUT_REMOTE,
    ClearLockout,
    ClearSource,
    EnterMaintenance,
    ExitMaintenance,
    MaintenanceActivity,
    SetCalibration,
    SetOutOfService,
    TechPour,
    TechStop,
)
from kiosk.version import running_version

log = logging.getLogger("tapshare.maintenance")
PIN_KEY, PIN_STATE_KEY = "maintenance_pin", "maintenance_pin_state"
CONSUMABLES = ("filter", "uv_lamp")
WARN_AT_PERMILLE = 900          # warn when 90 % of a life is used
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Consumable:
    kind: str
    used_l: int
    life_l: int
    used_days: int
    life_days: int
    used_permille: int           # the larger of the two uses
    warn: bool


class MaintenanceService:
    def __init__(self, cfg: Config, runtime, link=None) -> None:
        self.cfg, self.rt, self.link = cfg, runtime, link
        self.ledger = runtime.ledger
        self.actor = "technician"
        self._started_wall = time.time()
        self.pin_known = self.pin_configured()         # read once here, not from the UI thread

    # ---------------------------------------------------------------- PIN
    def pin_configured(self) -> bool:
        return self.ledger is not None and bool(self.ledger.setting(PIN_KEY))

    def set_pin(self, pin: str, actor: str = "cli") -> None:
        store_pin(self.ledger, pin, actor)
        self.pin_known = True

    def try_pin(self, pin: str) -> pins.PinResult:
        """One try at the PIN pad; the right PIN puts the machine into maintenance (if no session runs)."""
        if self.ledger is None:
            return pins.PinResult(False, pins.PinState(), attempts_left=0)
        stored = self.ledger.setting(PIN_KEY)
        state = pins.PinState(**(self.ledger.setting(PIN_STATE_KEY) or {}))
        now = self.rt.clock.wall_ms()
        result = pins.attempt(stored, pin, state, now)
        self.ledger.set_setting(PIN_STATE_KEY, {"failures": result.state.failures, "lockouts": result.state.lockouts,
                                                "locked_until_ms": result.state.locked_until_ms})
        if result.ok:
            self.ledger.record(K.MAINTENANCE_PIN_OK)
            self.rt.post(EnterMaintenance(actor=self.actor))
        elif result.locked_for_ms and state.locked_until_ms <= now:
            self.ledger.record(K.MAINTENANCE_PIN_LOCKED, locked_for_ms=result.locked_for_ms)
        elif not result.locked_for_ms:
            self.ledger.record(K.MAINTENANCE_PIN_FAILED, attempts_left=result.attempts_left)
        if not stored:
            log.error("no maintenance PIN is set: set one with main.py --set-maintenance-pin (deploy.sh does)")
        return result

    # ---------------------------------------------------------------- the core's side
    def touch(self) -> None:
        self.rt.post(MaintenanceActivity())

    def leave(self) -> None:
        self.rt.post(ExitMaintenance(actor=self.actor))

    def pour(self, purpose: str, target_ml: int | None, max_ms: int) -> None:
        self.rt.post(TechPour(purpose, target_ml=target_ml, max_ms=max_ms, actor=self.actor))

    def stop_pour(self) -> None:
        self.rt.post(TechStop(actor=self.actor))

    def accept_calibration(self, pours: list[Pour]) -> int:
        result = compute(pours, self.rt.snapshot.milli_pulses_per_litre)
        self.rt.post(SetCalibration(result.milli_pulses_per_litre, actor=self.actor,
                                    pours=tuple((p.pulses, p.measured_ml) for p in pours)))
        return result.milli_pulses_per_litre

    @staticmethod
    def pour_reading(pulses: int, measured_ml: int) -> Pour:
        return check_pour(pulses, measured_ml)

    def clear_lockout(self, reason: str) -> None:
        self.rt.post(ClearLockout(reason, ClearSource.SITE, actor=self.actor))

    def out_of_service(self, out: bool) -> None:
        self.rt.post(SetOutOfService("taken out of service by a technician") if out else
                     ClearLockout(LOCKOUT_REMOTE, ClearSource.SITE, actor=self.actor))

    # ---------------------------------------------------------------- consumables and flushing
    def consumables(self) -> list[Consumable]:
        return consumables(self.cfg.maintenance, self.ledger, self.rt.snapshot.milli_pulses_per_litre,
                           self.rt.clock.wall_ms())

    def _first_boot_ms(self) -> int:
        return first_boot_ms(self.ledger, self.rt.clock.wall_ms())

    def replace_consumable(self, kind: str) -> None:
        if kind not in CONSUMABLES:
            raise ValueError(f"unknown consumable {kind}")
        self.ledger.set_setting(f"consumable_{kind}", {"pulses": self.ledger.totalizer_pulses(),
                                                       "wall_ms": self.rt.clock.wall_ms()})
        self.ledger.record(K.CONSUMABLE_REPLACED, kind=kind, actor=self.actor)

    def flush_due_days(self) -> int | None:
        """Days past the flush reminder (0 or more: due), or None while not due."""
        every = self.cfg.maintenance.flush_reminder_days
        if not every:
            return None
        flushes = [e for e in self.ledger.events("tech_pour", limit=500) if e["detail"].get("purpose") == "flush"]
        last = flushes[-1]["wall_ms"] if flushes else self._first_boot_ms()
        days = (self.rt.clock.wall_ms() - last) // DAY_MS
        return days - every if days >= every else None

    # ---------------------------------------------------------------- sync
    def sync_status(self) -> dict[str, Any]:
        link = self.link
        return {"online": bool(link is not None and self.rt.snapshot.online),
                "configured": link is not None,
                "last_ok_s_ago": None if link is None or link.last_ok_mono is None else
                (self.rt.clock.monotonic_ms() - link.last_ok_mono) // 1000,
                "pending": self.ledger.outbox_depth(), "dead": self.ledger.outbox_depth("dead")}

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.ledger.outbox("dead", limit=50)

    def retry_dead(self, event_id: str) -> bool:
        ok = self.ledger.retry_dead(event_id)
        if ok and self.link is not None:
            self.link.wake_outbox()
        return ok

    def discard_dead(self, event_id: str) -> bool:
        return self.ledger.discard_dead(event_id, self.actor)

    def event_log(self, limit: int = 40) -> list[dict[str, Any]]:
        return list(reversed(self.ledger.events(limit=limit)))

    # ---------------------------------------------------------------- machine information
    def machine_info(self) -> dict[str, Any]:
        usage = shutil.disk_usage(self.cfg.data_dir)
        return {"machine_id": self.cfg.machine.id, "version": running_version(), "ip": local_ip(),
                "boot_id": self.ledger.boot_id if self.ledger else None,
                "uptime_s": int(time.time() - self._started_wall), "disk_free_mb": usage.free // 2**20,
                "data_dir": str(self.cfg.data_dir), "pid": os.getpid()}


def consumables(m: MaintenanceConfig, ledger, milli_pulses_per_litre: int, now_wall_ms: int) -> list[Consumable]:
    """Each fitted consumable's use since it was last replaced (or since the first boot), in litres through the
    meter and in days, against its life. Shared by the maintenance screen and the heartbeat, so the cloud sees
    what the technician sees. Reads the ledger (may raise :class:`~kiosk.ledger.LedgerError`)."""
    total, mppl = ledger.totalizer_pulses(), milli_pulses_per_litre or 450_000
    out = []
    for kind, life_l, life_days in (("filter", m.filter_life_l, m.filter_life_days), ("uv_lamp", 0, m.uv_life_days)):
        if not life_l and not life_days:
            continue
        since = ledger.setting(f"consumable_{kind}") or {"pulses": 0, "wall_ms": first_boot_ms(ledger, now_wall_ms)}
        used_l = max(0, total - since["pulses"]) * 1000 // mppl
        used_days = max(0, now_wall_ms - since["wall_ms"]) // DAY_MS
        permille = max(used_l * 1000 // life_l if life_l else 0, used_days * 1000 // life_days if life_days else 0)
        out.append(Consumable(kind, used_l, life_l, used_days, life_days, permille, permille >= WARN_AT_PERMILLE))
    return out


def first_boot_ms(ledger, now_wall_ms: int) -> int:
    rows = ledger.events("boot", limit=100_000)
    return rows[0]["wall_ms"] if rows else now_wall_ms


def store_pin(ledger, pin: str, actor: str) -> None:
    """Set the maintenance PIN (deploy, provisioning, the CLI): only its scrypt hash is stored."""
    pins.check_new_pin(pin)
    ledger.set_setting(PIN_KEY, pins.hash_pin(pin))
    ledger.set_setting(PIN_STATE_KEY, {})
    # an administrative handle (the CLI beside the running kiosk) logs it; only the running boot reports it
    ledger.record(K.MAINTENANCE_PIN_SET, actor=actor)


def local_ip() -> str:
    """The address other machines reach this one by (a UDP "connect" sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
