"""The dispenser's one configuration file (TOML, read with :mod:`tomllib`).

Every key has a documented default, so the desktop simulation needs no file at all. Every value is
validated at start-up; a bad one raises :class:`ConfigError` whose message names the key, e.g.
``limits.max_duration_ms: must be at most 600000, got 900000``. Unknown keys are errors too (a typo
must not silently fall back to a default on a machine that pours water).

``python main.py --print-config`` prints the effective configuration as TOML.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.limits import LIMIT_BOUNDS, PRICE, Bound
from contract.signing import MACHINE_ID_RE


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range. The message names the key."""


def _opt(default: Any, doc: str, *, min: Any = None, max: Any = None, choices: tuple = ()) -> Any:
    return field(default=default, metadata={"doc": doc, "min": min, "max": max, "choices": choices})


@dataclass(frozen=True)
class MachineConfig:
    id: str = _opt("SIM-0001", "Machine id as provisioned by the cloud (letters, digits, '-', '_').")
    location: str = _opt("Desktop simulation", "Where the machine stands, shown on screen and phone.")


@dataclass(frozen=True)
class CloudConfig:
    url: str = _opt("http://127.0.0.1:8700", "Base URL of the Tapshare cloud service.")
    public_url: str = _opt("", "Base URL phones open from the QR code (empty: the same as url).")
    secret_file: str = _opt("", "The device secret (mode 0600); empty: device.secret in paths.data_dir. "
                            "Written by: main.py --provision ENROLMENT_TOKEN.")
    poll_wait_ms: int = _opt(55_000, "Long-poll length for commands.", min=1_000, max=60_000)
    heartbeat_interval_ms: int = _opt(30_000, "How often telemetry is sent.", min=1_000, max=3_600_000)
    request_timeout_ms: int = _opt(10_000, "Timeout of every other request.", min=500, max=120_000)
    link_lost_after_ms: int = _opt(15_000, "Show \"offline\" after this long without a successful poll.",
                                   min=1_000, max=600_000)


def _bound(bound: Bound, doc: str = "") -> Any:
    """A setting whose range and default the contract declares (the cloud validates the same values)."""
    return _opt(bound.default, doc or bound.doc, min=bound.min, max=bound.max)


@dataclass(frozen=True)
class PricingConfig:
    display_price_fen_per_l: int = _bound(
        PRICE, "Price shown before the cloud has answered (fen per litre). The grant's price is billed.")


@dataclass(frozen=True)
class LimitsConfig:
    """Hard limits of this machine. Every grant from the cloud is clamped to them."""

    max_volume_ml: int = _bound(LIMIT_BOUNDS["max_volume_ml"])
    max_duration_ms: int = _bound(LIMIT_BOUNDS["max_duration_ms"])
    max_idle_ms: int = _bound(LIMIT_BOUNDS["max_idle_ms"])
    max_credit_fen: int = _bound(LIMIT_BOUNDS["max_credit_fen"])
    min_dispense_ml: int = _bound(LIMIT_BOUNDS["min_dispense_ml"],
                                  LIMIT_BOUNDS["min_dispense_ml"].doc + " The cloud's value for this machine comes "
                                  "with every grant and wins, so receipt and bill agree; this one is used only "
                                  "without a cloud (simulations).")


@dataclass(frozen=True)
class FlowConfig:
    pulses_per_litre: float = _opt(450.0, "Flow meter calibration (YF-S201 class meters: about 450).",
                                   min=1.0, max=100_000.0)
    overrun_window_ms: int = _opt(1_000, "Pulses this soon after the valve closes are overrun: "
                                  "recorded, not billed, not a leak.", min=0, max=10_000)
    checkpoint_interval_ms: int = _opt(250, "How often a running session's pulse count is written "
                                       "to disk.", min=10, max=250)
    max_flow_ml_per_min: int = _opt(10_000, "Fastest flow the plumbing can deliver. A faster reading "
                                    "is a meter fault.", min=100, max=100_000)
    sample_interval_ms: int = _opt(20, "How often the core thread samples the pulse counter.",
                                   min=1, max=100)


@dataclass(frozen=True)
class LeakConfig:
    ghost_volume_ml: int = _opt(50, "Flow with the valve closed beyond this volume ...", min=1, max=10_000)
    ghost_window_ms: int = _opt(600_000, "... within this window raises the leak alarm.",
                                min=1_000, max=86_400_000)


@dataclass(frozen=True)
class SensorsConfig:
    read_interval_ms: int = _opt(5_000, "How often the thermometer and TDS probe are read (a DS18B20 read "
                                 "takes up to 750 ms).", min=1_000, max=600_000)
    thermometer_id: str = _opt("", "DS18B20 id (e.g. 0316a2795fff); empty: the first one found.")
    temp_sane_min_c: float = _opt(-5.0, "Readings below this are a sensor fault (unknown).", min=-55.0, max=50.0)
    temp_sane_max_c: float = _opt(70.0, "Readings above this are a sensor fault (unknown).", min=0.0, max=125.0)
    temp_band_min_c: float = _opt(2.0, "Safe tank temperature band, low end.", min=-10.0, max=50.0)
    temp_band_max_c: float = _opt(35.0, "Safe tank temperature band, high end.", min=0.0, max=100.0)
    temp_alarm_after_ms: int = _opt(600_000, "Stop sales when the tank stays outside the band this long.",
                                    min=0, max=86_400_000)
    tds_fitted: bool = _opt(False, "A TDS probe is wired to the MCP3008 (pins.tds_adc_channel).")
    tds_limit_ppm: int = _opt(500, "TDS limit in mg/L: 500 for purified direct-drinking water (CJ 94), "
                              "1000 for tap water (GB 5749-2022).", min=1, max=5_000)
    tds_alarm_after_ms: int = _opt(60_000, "Stop sales when TDS stays above the limit this long.",
                                   min=0, max=86_400_000)
    tds_k_value: float = _opt(1.0, "TDS probe calibration factor.", min=0.1, max=10.0)
    adc_vref: float = _opt(3.3, "MCP3008 reference voltage.", min=1.0, max=5.5)


@dataclass(frozen=True)
class ScreenConfig:
    layout: str = _opt("landscape_800x480", "Screen layout.",
                       choices=("landscape_800x480", "portrait_720x1280"))
    fullscreen: bool = _opt(False, "Fill the screen (true on a dispenser).")
    receipt_display_ms: int = _opt(15_000, "How long the bill stays on screen.", min=1_000, max=300_000)
    language: str = _opt("zh", "Language shown first.", choices=("zh", "en"))
    touch_input: str = _opt("auto", "The one input provider: mtdev (a touchscreen read by Kivy; SDL's touch-as-mouse "
                            "is turned off so a tap arrives once), mouse (a desktop), or auto: mouse with a "
                            "display server (X11/Wayland), mtdev without one (the Pi's KMSDRM console).",
                            choices=("auto", "mtdev", "mouse"))
    rotation_deg: int = _opt(0, "Turn the picture and the touches by this many degrees: 180 for the official 7-inch "
                             "display mounted upside down, 90 or 270 for a portrait panel used in landscape "
                             "(Touch Display 2). Kivy rotates both, so taps land where they are drawn.",
                             choices=(0, 90, 180, 270))
    display_overlay: str = _opt("", "A dtoverlay line deploy.sh writes to config.txt for the display, empty for "
                                "none: e.g. vc4-kms-dsi-ili9881-7inch for Touch Display 2 (7-inch), "
                                "vc4-kms-dsi-7inch,invx,invy for the first 7-inch display's touch upside down.")


@dataclass(frozen=True)
class PinsConfig:
    """BCM pin numbers. -1 means "not fitted"."""

    valve: int = _opt(17, "Output driving the normally-closed solenoid valve's relay.", min=0, max=27)
    valve_active_high: bool = _opt(True, "False for relay boards that switch on a low level.")
    flow_meter: int = _opt(27, "Input from the hall-effect flow meter.", min=0, max=27)
    stop_button: int = _opt(22, "Input from the machine's stop button (to ground, pull-up).", min=0, max=27)
    leak_sensor: int = _opt(-1, "Input from a leak/flood sensor, -1 if none.", min=-1, max=27)
    low_water: int = _opt(-1, "Input from the tank's low-water float switch, -1 if none.", min=-1, max=27)
    sensors_active_high: bool = _opt(False, "Leak and low-water sensors drive the line high when they trigger "
                                     "(false: they pull it low).")
    onewire: int = _opt(4, "1-Wire data pin of the DS18B20 tank thermometer.", min=0, max=27)
    tds_adc_channel: int = _opt(0, "MCP3008 channel of the TDS probe (SPI0: BCM 8-11).", min=0, max=7)
    stop_debounce_ms: int = _opt(30, "Stop button debounce.", min=1, max=500)
    stop_long_press_ms: int = _opt(3_000, "Holding the stop button this long is a technician's long press.",
                                   min=500, max=30_000)


@dataclass(frozen=True)
class HardwareConfig:
    pin_factory: str = _opt("lgpio", "gpiozero pin factory on the Pi: lgpio (every Pi, the only one on a "
                            "Pi 5) or rpigpio (Pi 4 and older).", choices=("lgpio", "rpigpio"))


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = _opt("~/.local/share/tapshare", "Where the ledger database lives (must survive "
                         "reboots and power loss).")


@dataclass(frozen=True)
class LedgerConfig:
    event_log_max_rows: int = _opt(200_000, "Event log rows kept; older ones are pruned.",
                                   min=1_000, max=10_000_000)
    retention_days: int = _opt(90, "Reported sessions, checkpoints and sent reports older than this "
                               "are pruned.", min=1, max=3_650)


@dataclass(frozen=True)
class MaintenanceConfig:
    timeout_ms: int = _opt(600_000, "Maintenance mode ends by itself after this long without a touch.",
                           min=60_000, max=3_600_000)
    max_pour_ms: int = _opt(120_000, "Hard maximum of a technician's pour (flush, valve test, calibration).",
                            min=1_000, max=600_000)
    max_pour_ml: int = _opt(10_000, "Hard maximum volume of a technician's pour.", min=100, max=50_000)
    filter_life_l: int = _opt(3_000, "Litres a filter cartridge lasts (0: no filter fitted).", min=0, max=1_000_000)
    filter_life_days: int = _opt(180, "Days a filter cartridge lasts (0: no limit by time).", min=0, max=3_650)
    uv_life_days: int = _opt(365, "Days a UV lamp lasts (0: no UV lamp fitted).", min=0, max=3_650)
    flush_reminder_days: int = _opt(7, "Remind the technician to flush the line after this many days.",
                                    min=0, max=365)


@dataclass(frozen=True)
class Config:
    machine: MachineConfig = field(default_factory=MachineConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    leak: LeakConfig = field(default_factory=LeakConfig)
    sensors: SensorsConfig = field(default_factory=SensorsConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    pins: PinsConfig = field(default_factory=PinsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)

    @property
    def data_dir(self) -> Path:
        return Path(os.path.expanduser(self.paths.data_dir))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "ledger.db"

    @property
    def secret_path(self) -> Path:
        return Path(os.path.expanduser(self.cloud.secret_file)) if self.cloud.secret_file else \
            self.data_dir / "device.secret"

    @property
    def public_url(self) -> str:
        return self.cloud.public_url or self.cloud.url

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys changed, validated like a file: ``cfg.replace(flow={"sample_interval_ms": 5})``."""
        data = to_dict(self)
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return from_dict(data)


def _check_value(key: str, f: dataclasses.Field, value: Any) -> Any:
    want = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                       "bool": bool}[f.type]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (want is int and isinstance(value, bool)) or not isinstance(value, want):
        raise ConfigError(f"{key}: must be {want.__name__}, got {type(value).__name__} {value!r}")
    meta = f.metadata
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: must be at least {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: must be at most {meta['max']}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if want is float and value != value:  # NaN
        raise ConfigError(f"{key}: must be a number, got nan")
    return value


def from_dict(data: dict[str, Any]) -> Config:
    """Validate parsed TOML. Raises :class:`ConfigError` naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError("configuration must be a table")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name in data:
        if name not in sections:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(sections)})")
    built = {}
    for name, sf in sections.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: must be a table, got {type(raw).__name__}")
        cls = sf.default_factory  # type: ignore[misc]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
        values = {k: _check_value(f"{name}.{k}", fields[k], v) for k, v in raw.items()}
        built[name] = cls(**values)
    cfg = Config(**built)
    _check_cross_field(cfg)
    return cfg


def _check_cross_field(cfg: Config) -> None:
    mid = cfg.machine.id
    if not MACHINE_ID_RE.fullmatch(mid):
        raise ConfigError(f"machine.id: 1-64 letters, digits, '-' or '_', got {mid!r}")
    if not cfg.cloud.url.startswith(("http://", "https://")):
        raise ConfigError(f"cloud.url: must start with http:// or https://, got {cfg.cloud.url!r}")
    if cfg.limits.min_dispense_ml >= cfg.limits.max_volume_ml:
        raise ConfigError("limits.min_dispense_ml: must be below limits.max_volume_ml")
    used: dict[int, str] = {}
    if cfg.sensors.tds_fitted:   # the MCP3008 on SPI0 takes BCM 8 (CE0), 9 (MISO), 10 (MOSI), 11 (SCLK)
        used.update({8: "the MCP3008 on SPI0 (CE0)", 9: "the MCP3008 on SPI0 (MISO)",
                     10: "the MCP3008 on SPI0 (MOSI)", 11: "the MCP3008 on SPI0 (SCLK)"})
    for name in ("valve", "flow_meter", "stop_button", "leak_sensor", "low_water", "onewire"):
        pin = getattr(cfg.pins, name)
        if pin < 0:
            continue
        if pin in used:
            raise ConfigError(f"pins.{name}: pin {pin} is already used by {used[pin]}")
        used[pin] = f"pins.{name}"
    s = cfg.sensors
    if s.temp_band_min_c >= s.temp_band_max_c:
        raise ConfigError("sensors.temp_band_min_c: must be below sensors.temp_band_max_c")
    if s.temp_sane_min_c >= s.temp_sane_max_c:
        raise ConfigError("sensors.temp_sane_min_c: must be below sensors.temp_sane_max_c")
    if not cfg.paths.data_dir:
        raise ConfigError("paths.data_dir: must not be empty")
    if not re.fullmatch(r"[A-Za-z0-9_.,=-]{0,120}", cfg.screen.display_overlay):
        raise ConfigError("screen.display_overlay: an overlay name and its parameters (letters, digits, _ . , = -), "
                          f"got {cfg.screen.display_overlay!r}")


def load(path: str | os.PathLike | None) -> Config:
    """Read and validate a TOML file; ``None`` gives the documented defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return from_dict(data)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The configuration as commented TOML (also the documentation of every key)."""
    out = []
    for sf in dataclasses.fields(Config):
        section = getattr(cfg, sf.name)
        out.append(f"[{sf.name}]")
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            text = ("true" if v else "false") if isinstance(v, bool) else (
                '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(v, str) else repr(v))
            out.append(f"{f.name} = {text}  # {f.metadata['doc']}")
        out.append("")
    return "\n".join(out)
