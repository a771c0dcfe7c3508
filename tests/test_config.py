import tomllib

import pytest

from kiosk import config
from kiosk.config import Config, ConfigError


def test_defaults_need_no_file():
    cfg = config.load(None)
    assert cfg.limits.max_duration_ms == 300_000
    assert cfg.flow.pulses_per_litre == 450.0
    assert cfg.db_path.name == "ledger.db"


def test_printed_config_parses_back_to_the_same_values():
    cfg = Config().replace(machine={"id": "A-7"}, limits={"max_volume_ml": 900})
    text = config.to_toml(cfg)
    assert config.from_dict(tomllib.loads(text)) == cfg
    assert "no-pulse timeout" in text   # every key carries its documentation


def test_load_reads_a_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[machine]\nid = "B-12"\n[flow]\npulses_per_litre = 451\n')
    cfg = config.load(p)
    assert cfg.machine.id == "B-12"
    assert cfg.flow.pulses_per_litre == 451.0          # an int is accepted for a float key
    assert cfg.limits == Config().limits                # untouched sections keep their defaults


@pytest.mark.parametrize("data, message", [
    ({"limits": {"max_duration_ms": 900_000}}, "limits.max_duration_ms: must be at most 600000, got 900000"),
    ({"limits": {"max_idle_ms": 0}}, "limits.max_idle_ms: must be at least 500"),
    ({"limits": {"max_volume_ml": "5000"}}, "limits.max_volume_ml: must be int, got str"),
    ({"limits": {"max_volume_ml": True}}, "limits.max_volume_ml: must be int, got bool"),
    ({"pins": {"valve_active_high": 1}}, "pins.valve_active_high: must be bool, got int"),
    ({"flow": {"pulses_per_litre": float("nan")}}, "flow.pulses_per_litre"),
    ({"screen": {"layout": "square"}}, "screen.layout: must be one of landscape_800x480, portrait_720x1280"),
    ({"limits": {"max_volum_ml": 1}}, "limits.max_volum_ml: unknown key"),
    ({"limit": {}}, "limit: unknown section"),
    ({"limits": 5}, "limits: must be a table"),
    ({"pins": {"valve": 4}}, "pins.onewire: pin 4 is already used by pins.valve"),
    ({"pins": {"valve": 9}, "sensors": {"tds_fitted": True}}, "pins.valve: pin 9 is already used by the MCP3008"),
    ({"sensors": {"temp_band_min_c": 30.0, "temp_band_max_c": 20.0}}, "sensors.temp_band_min_c: must be below"),
    ({"hardware": {"pin_factory": "pigpio"}}, "hardware.pin_factory: must be one of lgpio, rpigpio"),
    ({"machine": {"id": "has space"}}, "machine.id: 1-64 letters"),
    ({"machine": {"id": ""}}, "machine.id"),
    ({"cloud": {"url": "ftp://x"}}, "cloud.url: must start with http"),
    ({"limits": {"min_dispense_ml": 100, "max_volume_ml": 100}}, "limits.min_dispense_ml: must be below"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert message in str(e.value)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits\nmax = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


@pytest.mark.parametrize(("screen", "message"), [
    ({"rotation_deg": 45}, "screen.rotation_deg: must be one of 0, 90, 180, 270, got 45"),
    ({"rotation_deg": "180"}, "screen.rotation_deg: must be int"),
    ({"display_overlay": "vc4-kms-dsi-7inch\ndtparam=watchdog=off"}, "screen.display_overlay: an overlay name"),
])
def test_screen_rotation_and_overlay_are_checked(screen, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict({"screen": screen})
    ok = config.from_dict({"screen": {"rotation_deg": 180, "display_overlay": "vc4-kms-dsi-7inch,invx,invy"}})
    assert ok.screen.rotation_deg == 180
