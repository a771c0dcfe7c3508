"""The kiosk App: a ScreenManager of the screens in this package, fed from the core's snapshots.

Threading: the core thread publishes an immutable :class:`~kiosk.session.Snapshot`; a Kivy clock
callback (10 times a second, on Kivy's thread) reads it, turns it into texts with the pure
:func:`kiosk.ui.present.present`, and assigns them to the current screen only when they changed, so an
idle screen does no drawing work. Touches become events posted to the runtime's queue; nothing here
reads a sensor, the database or the network (the QR text comes from the sync link's in-memory state).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")

log = logging.getLogger("tapshare.ui")
LAYOUTS = {"landscape_800x480": (800, 480), "portrait_720x1280": (720, 1280)}
SIM_PANEL_PX = 48
BUSY_FPS, IDLE_FPS = 30.0, 10.0     # Kivy's frame cap (Clock._max_fps: Kivy has no public setter after start)
TICK_S = 0.1
HERE = Path(__file__).resolve().parent
SCREEN_MODULES = ("idle", "dispensing", "receipt", "offline", "out_of_service", "maintenance")


def configure_window(layout: str, *, fullscreen: bool, simulate: bool, scale: float = 1.0) -> tuple[int, int]:
    """Kivy's window settings; must run before kivy.core.window is imported."""
    from kivy.config import Config
    w, h = LAYOUTS[layout]
    if simulate:
        h += SIM_PANEL_PX
    w, h = int(w * scale), int(h * scale)
    Config.set("graphics", "width", str(w))
    Config.set("graphics", "height", str(h))
    Config.set("graphics", "resizable", "0")
    Config.set("graphics", "fullscreen", "auto" if fullscreen else "0")
    Config.set("graphics", "maxfps", "30")
    Config.set("kivy", "exit_on_escape", "1" if simulate else "0")
    Config.set("input", "mouse", "mouse,disable_multitouch")
    return w, h


def build_app(runtime, *, layout: str, language: str, receipt_display_ms: int, qr_url: Callable[[], str | None],
              sim_world=None, phone_link: str = "", on_stop: Callable[[], None] | None = None):
    """The App object (not yet running). ``qr_url`` returns the current QR payload or None while offline."""
    from kivy.app import App
    from kivy.clock import Clock
    from kivy.core.window import Window
    from kivy.lang import Builder
    from kivy.properties import BooleanProperty, StringProperty
    from kivy.uix.boxlayout import BoxLayout
    from kivy.uix.screenmanager import NoTransition, ScreenManager

    from kiosk.events import ReceiptDismissed, State, StopPressed
    from kiosk.ui import fonts
    from kiosk.ui.dispensing import DispensingScreen
    from kiosk.ui.i18n import tr
    from kiosk.ui.idle import IdleScreen
    from kiosk.ui.maintenance import MaintenanceScreen
    from kiosk.ui.offline import OfflineScreen
    from kiosk.ui.out_of_service import OutOfServiceScreen
    from kiosk.ui.present import present, screen_for
    from kiosk.ui.qr import qr_texture
    from kiosk.ui.receipt import ReceiptScreen

    class SimPanel(BoxLayout):
        pass

    fonts.register()
    Builder.load_file(str(HERE / "common.kv"))
    for name in SCREEN_MODULES:
        Builder.load_file(str(HERE / f"{name}.kv"))

    class KioskApp(App):
        lang = StringProperty(language)
        portrait = BooleanProperty(layout.startswith("portrait"))
        simulate = BooleanProperty(sim_world is not None)
        phone_link = StringProperty("")
        machine_label = StringProperty("")
        title = "Tapshare"

        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.runtime = runtime
            self._snap = None
            self._lang_shown = None
            self._qr_payload: str | None = None
            self._qr_checked = 0.0
            self._session_id: str | None = None
            self._started_text = ""
            self._receipt_since: float | None = None
            self.draw_ms: list[float] = []         # time to draw a frame while dispensing (benchmark)
            self._draw_t0 = 0.0
            self._first_qr = True
            self.phone_link = phone_link

        def tr(self, key: str, _lang: str, **fmt) -> str:
            return tr(key, self.lang, **fmt)

        def build(self):
            self.manager = ScreenManager(transition=NoTransition())
            for screen in (IdleScreen(), DispensingScreen(), ReceiptScreen(), OfflineScreen(),
                           OutOfServiceScreen(), MaintenanceScreen()):
                self.manager.add_widget(screen)
            root = BoxLayout(orientation="vertical")
            root.add_widget(self.manager)
            if sim_world is not None:
                self.sim_panel = SimPanel()
                root.add_widget(self.sim_panel)
            Window.bind(on_key_down=self._on_key)
            if os.environ.get("TAPSHARE_UI_STATS"):
                Window.bind(on_draw=self._draw_started, on_flip=self._draw_done)
            Window.clearcolor = (0.957, 0.969, 0.980, 1)
            self.tick(0)
            Clock.schedule_interval(self.tick, TICK_S)
            return root

        # ---------------------------------------------------------------- the tick (Kivy's thread)
        def tick(self, _dt: float) -> None:
            if self.runtime.wait_stopped(0):
                self.stop()
                return
            snap = self.runtime.snapshot
            now = time.monotonic()
            if snap.session_id != self._session_id:
                self._session_id = snap.session_id
                if snap.session_id:
                    self._started_text = time.strftime("%Y-%m-%d %H:%M")
            if snap.state is State.RECEIPT:
                self._receipt_since = self._receipt_since or now
                left = max(0, int(receipt_display_ms / 1000 - (now - self._receipt_since) + 0.999))
                self.manager.get_screen("receipt").countdown = self.tr("touch_to_return", self.lang, s=left)
            else:
                self._receipt_since = None
            name = screen_for(snap)
            if snap != self._snap or self.lang != self._lang_shown:       # equal snapshots: nothing to redo
                self._snap, self._lang_shown = snap, self.lang
                self.machine_label = f"{self.tr('machine_no', self.lang)} {snap.machine_id}"
                self.manager.get_screen(name).show(present(snap, self.lang, started_hhmm=self._started_text))
                if self.manager.current != name:
                    self.manager.current = name
                # 30 frames a second while water flows; 10 otherwise (touches still answer within 0.1 s)
                Clock._max_fps = BUSY_FPS if snap.state in (State.DISPENSING, State.SETTLING) else IDLE_FPS
            if name == "idle" and now - self._qr_checked >= 1.0:
                self._qr_checked = now
                self._refresh_qr()

        def _draw_started(self, *_a) -> None:
            self._draw_t0 = time.perf_counter()

        def _draw_done(self, *_a) -> None:
            if self._snap is not None and self._snap.state is State.DISPENSING and self._draw_t0:
                self.draw_ms.append((time.perf_counter() - self._draw_t0) * 1000)

        def _refresh_qr(self) -> None:
            payload = qr_url()
            if payload != self._qr_payload:
                self._qr_payload = payload
                screen = self.manager.get_screen("idle")
                screen.qr_texture = qr_texture(payload) if payload else None
                if payload and self._first_qr:
                    self._first_qr = False
                    log.info("QR code on screen")

        # ---------------------------------------------------------------- touches and keys
        def toggle_language(self) -> None:
            self.lang = "en" if self.lang == "zh" else "zh"

        def screen_stop(self) -> None:
            self.runtime.post(StopPressed(source="screen"))

        def dismiss_receipt(self) -> None:
            self.runtime.post(ReceiptDismissed())

        def sim_press_stop(self) -> None:
            if sim_world is not None:
                sim_world.press_stop()

        def _on_key(self, _window, _key, _scancode, codepoint, _modifiers) -> bool:
            if codepoint == "s" and sim_world is not None:
                self.sim_press_stop()
                return True
            if codepoint == "l":
                self.toggle_language()
                return True
            return False

        def on_stop(self) -> None:
            stats = os.environ.get("TAPSHARE_UI_STATS")
            if stats:
                Path(stats).write_text(json.dumps({"draw_ms": self.draw_ms}))
            if on_stop is not None:
                on_stop()

    return KioskApp()
