"""The parts of the configuration the dispensing core needs (:class:`CoreSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from contract.billing import Calibration
from kiosk.config import Config


@dataclass(frozen=True)
class CoreSettings:
    """The parts of the configuration the core needs, with units in every name."""

    machine_id: str
    calibration: Calibration
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    max_credit_fen: int
    min_dispense_ml: int
    overrun_window_ms: int
    checkpoint_interval_ms: int
    max_flow_ml_per_min: int
    ghost_volume_ml: int
    ghost_window_ms: int
    receipt_display_ms: int
    display_price_fen_per_l: int
    temp_band_min_c: float = 2.0
    temp_band_max_c: float = 35.0
    temp_alarm_after_ms: int = 600_000
    tds_limit_ppm: int = 500
    tds_alarm_after_ms: int = 60_000
    tech_max_ms: int = 120_000            # a technician's pour never lasts longer
    tech_max_ml: int = 10_000             # nor pours more
    maintenance_timeout_ms: int = 600_000  # maintenance ends by itself after this long untouched

    @classmethod
    def from_config(cls, cfg: Config, calibration: Calibration | None = None) -> CoreSettings:
        return cls(
            machine_id=cfg.machine.id,
            calibration=calibration or Calibration.from_pulses_per_litre(cfg.flow.pulses_per_litre),
            max_volume_ml=cfg.limits.max_volume_ml,
            max_duration_ms=cfg.limits.max_duration_ms,
            max_idle_ms=cfg.limits.max_idle_ms,
            max_credit_fen=cfg.limits.max_credit_fen,
            min_dispense_ml=cfg.limits.min_dispense_ml,
            overrun_window_ms=cfg.flow.overrun_window_ms,
            checkpoint_interval_ms=cfg.flow.checkpoint_interval_ms,
            max_flow_ml_per_min=cfg.flow.max_flow_ml_per_min,
            ghost_volume_ml=cfg.leak.ghost_volume_ml,
            ghost_window_ms=cfg.leak.ghost_window_ms,
            receipt_display_ms=cfg.screen.receipt_display_ms,
            display_price_fen_per_l=cfg.pricing.display_price_fen_per_l,
            temp_band_min_c=cfg.sensors.temp_band_min_c,
            temp_band_max_c=cfg.sensors.temp_band_max_c,
            temp_alarm_after_ms=cfg.sensors.temp_alarm_after_ms,
            tds_limit_ppm=cfg.sensors.tds_limit_ppm,
            tds_alarm_after_ms=cfg.sensors.tds_alarm_after_ms,
            tech_max_ms=cfg.maintenance.max_pour_ms,
            tech_max_ml=cfg.maintenance.max_pour_ml,
            maintenance_timeout_ms=cfg.maintenance.timeout_ms,
        )
