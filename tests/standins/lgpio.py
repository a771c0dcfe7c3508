"""Stand-in for the Raspberry Pi archive's python3-lgpio, for the boot test's container (which has no GPIO).

It keeps one in-memory gpiochip per process with the calls gpiozero's LGPIOFactory makes, and appends every
claim and write to ``$LG_WD/lgpio-standin.log`` (``<unix time> <pid> <call> <gpio> <level>``), so that the test
can see which level the dispenser (and ExecStopPost's valve_off) drove the valve pin to. Inputs read their
pull level and never change, as on a machine with nothing wired.
"""

import os
import threading
import time

__version__ = "0.2.2.0-standin"

SET_ACTIVE_LOW = 4
SET_OPEN_DRAIN = 8
SET_OPEN_SOURCE = 16
SET_PULL_UP = SET_BIAS_PULL_UP = 32
SET_PULL_DOWN = SET_BIAS_PULL_DOWN = 64
SET_PULL_NONE = SET_BIAS_DISABLE = 128
RISING_EDGE, FALLING_EDGE, BOTH_EDGES = 1, 2, 3

_KERNEL, _OUT, _INPUT, _OUTPUT, _ALERT = 1, 2, 1 << 8, 1 << 9, 1 << 10
_LINE_FLAGS = SET_ACTIVE_LOW | SET_OPEN_DRAIN | SET_OPEN_SOURCE | SET_PULL_UP | SET_PULL_DOWN | SET_PULL_NONE
_lock = threading.Lock()
_chips: dict[int, dict[int, list[int]]] = {}      # handle -> gpio -> [mode bits, level]


class error(Exception):
    pass


def _log(call: str, gpio: int, level: int | str = "") -> None:
    try:
        path = os.path.join(os.environ.get("LG_WD", "/tmp"), "lgpio-standin.log")
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {os.getpid()} {call} {gpio} {level}\n")
    except (NameError, OSError):        # at interpreter exit, or no writable LG_WD: the pin still works
        pass


def error_text(code: int) -> str:
    return f"lgpio stand-in error {code}"


def gpiochip_open(gpiochip: int) -> int:
    with _lock:
        handle = len(_chips) + 1
        _chips[handle] = {}
    _log("gpiochip_open", gpiochip)
    return handle


def gpiochip_close(handle: int) -> int:
    with _lock:
        _chips.pop(handle, None)
    return 0


def _line(handle: int, gpio: int) -> list[int]:
    if handle not in _chips:
        raise error("unknown handle")
    if not 0 <= gpio <= 53:
        raise error("bad gpio")
    return _chips[handle].setdefault(gpio, [_KERNEL, 0])


def gpio_get_mode(handle: int, gpio: int) -> int:
    with _lock:
        return _line(handle, gpio)[0]


def gpio_claim_input(handle: int, gpio: int, lFlags: int = 0) -> int:
    with _lock:
        line = _line(handle, gpio)
        line[0] = _INPUT | (lFlags & _LINE_FLAGS)
        line[1] = 1 if lFlags & SET_PULL_UP else 0
    _log("claim_input", gpio, line[1])
    return 0


def gpio_claim_output(handle: int, gpio: int, level: int = 0, lFlags: int = 0) -> int:
    with _lock:
        line = _line(handle, gpio)
        line[0] = _OUTPUT | _OUT | (lFlags & _LINE_FLAGS)
        line[1] = 1 if level else 0
    _log("claim_output", gpio, line[1])
    return 0


def gpio_claim_alert(handle: int, gpio: int, eFlags: int, lFlags: int = 0, notify_handle: int = -1) -> int:
    with _lock:
        line = _line(handle, gpio)
        line[0] = _ALERT | _INPUT | (lFlags & _LINE_FLAGS)
    return 0


def gpio_free(handle: int, gpio: int) -> int:
    with _lock:
        _line(handle, gpio)[0] = _KERNEL
    return 0


def gpio_read(handle: int, gpio: int) -> int:
    with _lock:
        return _line(handle, gpio)[1]


def gpio_write(handle: int, gpio: int, level: int) -> int:
    with _lock:
        line = _line(handle, gpio)
        if not line[0] & _OUT:
            raise error("gpio not claimed for output")
        line[1] = 1 if level else 0
    _log("write", gpio, line[1])
    return 0


def gpio_set_debounce_micros(handle: int, gpio: int, debounce_micros: int) -> int:
    return 0


def tx_pwm(handle: int, gpio: int, pwm_frequency: float, pwm_duty_cycle: float, *args: int) -> int:
    raise error("PWM is not emulated")


class _Callback:
    def cancel(self) -> None:
        pass


def callback(handle: int, gpio: int, edge: int = RISING_EDGE, func=None) -> _Callback:
    return _Callback()


def spi_open(spi_device: int, spi_channel: int, baud: int, spi_flags: int = 0) -> int:
    raise error("SPI is not emulated")
