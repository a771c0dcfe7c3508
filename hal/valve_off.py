"""Drive the valve's pin to its inactive level and exit: systemd's ExecStopPost runs this after the
dispenser stops, however it stopped (SIGKILL, crash, watchdog).

    python -m hal.valve_off [--config /etc/tapshare/tapshare.toml]

It uses the same :class:`hal.gpio.GpioValve` close as the application, with the level from the
config (never a hard-coded low). The pin is left claimed at the inactive level until this process
exits; after that the relay board's pull resistor and the ``gpio=`` line in config.txt hold it
(deploy.sh writes both), and the valve itself is normally closed.
"""

from __future__ import annotations

import argparse
import sys

from gpiozero.pins import Factory

from hal.gpio import GpioValve
from hal.machine import HardwareError, make_pin_factory
from kiosk import config as config_mod


def drive_inactive(cfg: config_mod.Config, factory: Factory) -> GpioValve:
    valve = GpioValve(cfg.pins.valve, active_high=cfg.pins.valve_active_high, pin_factory=factory)
    valve.close()
    return valve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hal.valve_off", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="TOML configuration file (default: documented defaults)")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
        valve = drive_inactive(cfg, make_pin_factory(cfg.hardware.pin_factory, simulate=False, lg_wd=cfg.data_dir))
    except (config_mod.ConfigError, HardwareError) as e:
        print(f"valve_off: cannot drive the valve pin inactive: {e}", file=sys.stderr)
        return 1
    print(f"valve_off: BCM {cfg.pins.valve} at level {valve.inactive_level} (valve closed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
