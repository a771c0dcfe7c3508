"""The kiosk UI's entry points, importable before Kivy's window exists: the window's settings
(:func:`configure_window`, which must run before Kivy opens it) and :func:`build_app`, which then makes the
App (:class:`kiosk.ui.kiosk_app.KioskApp`, whose module imports Kivy's window).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")
os.environ.setdefault("KIVY_CLIPBOARD", "sdl2")        # not xclip/xsel: a kiosk has neither

log = logging.getLogger("tapshare.ui")
LAYOUTS = {"landscape_800x480": (800, 480), "portrait_720x1280": (720, 1280)}
SIM_PANEL_PX = 48


def local_now(timezone: str, at_s: float | None = None):
    """Now (or ``at_s``, Unix seconds) in the machine's time zone (from the cloud, the same as its bills'); the
    Pi's own until known."""
    from datetime import datetime
    at = time.time() if at_s is None else at_s
    if timezone:
        try:
            from zoneinfo import ZoneInfo
            return datetime.fromtimestamp(at, ZoneInfo(timezone))
        except (KeyError, ValueError, OSError):
            log.warning("unknown time zone %r: showing the system's", timezone)
    return datetime.fromtimestamp(at)


def touch_provider(choice: str) -> str:
    """``auto``: a mouse where a display server runs (the desktop, Xvfb), mtdev on a bare console (the Pi)."""
    if choice != "auto":
        return choice
    return "mouse" if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") else "mtdev"


def configure_window(layout: str, *, fullscreen: bool, simulate: bool, scale: float = 1.0,
                     touch_input: str = "auto", rotation_deg: int = 0) -> tuple[int, int]:
    """Kivy's window settings; must run before kivy.core.window is imported.

    Input: exactly one provider. Left to its defaults Kivy adds an mtdev/hidinput provider for every input
    device it finds *and* SDL turns touches into mouse events, so on a Pi's touchscreen each tap arrives twice
    (a PIN digit entered twice, a language toggle undone). No cursor on a dispenser.

    Rotation: Kivy turns the picture and the touches together. For 90 and 270 the panel's own size is the
    layout's turned on its side, so the window asks for that and the screens still see the layout's size.
    """
    from kivy.config import Config
    w, h = LAYOUTS[layout]
    if simulate:
        h += SIM_PANEL_PX
    w, h = int(w * scale), int(h * scale)
    panel_w, panel_h = (h, w) if rotation_deg in (90, 270) else (w, h)
    Config.set("graphics", "width", str(panel_w))
    Config.set("graphics", "height", str(panel_h))
    Config.set("graphics", "rotation", str(rotation_deg))
    Config.set("graphics", "resizable", "0")
    Config.set("graphics", "fullscreen", "auto" if fullscreen else "0")
    Config.set("graphics", "maxfps", "30")
    Config.set("kivy", "exit_on_escape", "1" if simulate else "0")
    for name in list(Config.options("input")):
        Config.remove_option("input", name)
    provider = touch_provider(touch_input)
    if provider == "mouse":
        Config.set("input", "mouse", "mouse,disable_multitouch")
    else:
        Config.set("input", "touchscreen", "probesysfs,provider=mtdev")
        os.environ["SDL_TOUCH_MOUSE_EVENTS"] = "0"      # SDL must not turn the same touches into mouse clicks
        os.environ["SDL_MOUSE_TOUCH_EVENTS"] = "0"
    Config.set("graphics", "show_cursor", "1" if simulate else "0")
    return w, h


def build_app(runtime, *, layout: str, language: str, receipt_display_ms: int, qr_url: Callable[[], str | None],
              sim_world=None, phone_link: str = "", on_stop: Callable[[], None] | None = None, service=None,
              maintenance_timeout_ms: int = 600_000):
    """The App object (not yet running). ``qr_url`` returns the current QR payload or None while offline.
    Call after :func:`configure_window`: the App's module opens Kivy's window as it is imported."""
    from kiosk.ui.kiosk_app import KioskApp, load_rules
    load_rules()
    return KioskApp(runtime, layout=layout, language=language, receipt_display_ms=receipt_display_ms, qr_url=qr_url,
                    sim_world=sim_world, phone_link=phone_link, on_stop=on_stop, service=service,
                    maintenance_timeout_ms=maintenance_timeout_ms)


def ui_figures() -> dict[str, int]:
    """Kivy's long-lived objects, for diagnostics (``TAPSHARE_DIAG_FILE``): live textures and texture regions
    (found through the garbage collector, so a leaked one shows), and the items in each of Kivy's caches."""
    import gc

    from kivy.cache import Cache
    from kivy.graphics.texture import Texture, TextureRegion
    textures = regions = 0
    for o in gc.get_objects():
        if isinstance(o, Texture):
            if isinstance(o, TextureRegion):
                regions += 1
            else:
                textures += 1
    out = {"textures": textures, "texture_regions": regions}
    for category, objects in list(getattr(Cache, "_objects", {}).items()):
        out[f"cache:{category}"] = len(objects)
    return out
