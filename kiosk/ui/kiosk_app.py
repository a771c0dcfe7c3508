"""The kiosk App: a ScreenManager of the screens in this package, fed from the core's snapshots.

Threading: the core thread publishes an immutable :class:`~kiosk.session.Snapshot`; a Kivy clock
callback (10 times a second, on Kivy's thread) reads it, turns it into texts with the pure
:func:`kiosk.ui.present.present`, and assigns them to the current screen only when they changed, so an
idle screen does no drawing work. Touches become events posted to the runtime's queue; nothing here
reads a sensor, the database or the network (the QR text comes from the sync link's in-memory state).
What the technician does (the PIN pad, calibration, flushes, the ledger's lists) lives with
:class:`~kiosk.ui.maintenance.MaintenanceScreen`.

Importing this module opens Kivy's window: :func:`kiosk.ui.app.configure_window` must have run first (and
kiosk.ui.app sets Kivy's environment), so only :func:`kiosk.ui.app.build_app` imports it.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from kivy.app import App
from kivy.clock import Clock
from kivy.core.window import Window
from kivy.lang import Builder
from kivy.properties import BooleanProperty, NumericProperty, StringProperty
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label
from kivy.uix.screenmanager import NoTransition, ScreenManager
from kivy.uix.scrollview import ScrollView

from kiosk.events import ReceiptDismissed, State, StopPressed
from kiosk.ui import fonts
from kiosk.ui.app import local_now, log
from kiosk.ui.dispensing import DispensingScreen
from kiosk.ui.i18n import tr
from kiosk.ui.idle import IdleScreen
from kiosk.ui.maintenance import MaintenanceScreen
from kiosk.ui.offline import OfflineScreen
from kiosk.ui.out_of_service import OutOfServiceScreen
from kiosk.ui.pin_pad import PinPadScreen
from kiosk.ui.present import present, screen_for
from kiosk.ui.qr import qr_texture
from kiosk.ui.receipt import ReceiptScreen
from kiosk.ui.updating import UpdatingScreen

HERE = Path(__file__).resolve().parent
SCREEN_MODULES = ("idle", "dispensing", "receipt", "offline", "out_of_service", "updating", "maintenance",
                  "pin_pad")
BUSY_FPS, IDLE_FPS = 30.0, 10.0     # Kivy's frame cap (Clock._max_fps: Kivy has no public setter after start)
TICK_S = 0.1
LONG_PRESS_S = 2.0
QR_CHECK_S = 1.0
DRAW_TIMES_KEPT = 100_000           # frame times kept for the benchmark (TAPSHARE_UI_STATS), the newest
UI_MAP_EVERY_S = 0.3                # how often the widget map is looked at, and how long a screen must be unchanged


def load_rules() -> None:
    """The shipped font and every screen's .kv rules; once, before the first screen is made."""
    fonts.register()
    Builder.load_file(str(HERE / "common.kv"))
    for name in SCREEN_MODULES:
        Builder.load_file(str(HERE / f"{name}.kv"))


class SimPanel(BoxLayout):
    """The simulation strip under the screen (the stop button, the phone link); drawn by common.kv."""


class KioskApp(App):
    lang = StringProperty("zh")
    portrait = BooleanProperty(False)
    # maintenance on the tall portrait screen uses its room: bigger type and touch targets
    mscale = NumericProperty(1.0)
    simulate = BooleanProperty(False)
    phone_link = StringProperty("")
    machine_label = StringProperty("")
    title = "Tapshare"

    def __init__(self, runtime, *, layout: str, language: str, receipt_display_ms: int,
                 qr_url: Callable[[], str | None], sim_world=None, phone_link: str = "",
                 on_stop: Callable[[], None] | None = None, service=None, maintenance_timeout_ms: int = 600_000,
                 **kw) -> None:
        super().__init__(**kw)
        self.runtime = runtime
        self.service = service                  # the maintenance service, None without a ledger
        self.layout = layout
        self.language = language                # the machine's first language: each new customer is greeted in it
        self.receipt_display_ms = receipt_display_ms
        self.qr_url = qr_url
        self.sim_world = sim_world
        self.after_stop = on_stop               # not self.on_stop: that is the App's own event handler
        self.maintenance_timeout_ms = maintenance_timeout_ms
        self.lang = language
        self.portrait = layout.startswith("portrait")
        self.mscale = 1.3 if self.portrait else 1.0
        self.simulate = sim_world is not None
        self.phone_link = phone_link
        self.maintenance: MaintenanceScreen | None = None       # made in build()
        self.no_transition = NoTransition()
        self.ticks = 0                          # counted for the systemd watchdog
        self._long_press = None
        self._snap = None
        self._lang_shown = None
        self._qr_payload: str | None = None
        self._qr_checked = 0.0
        self._session_id: str | None = None
        self._started_text = ""
        self._receipt_since: float | None = None
        self.draw_ms: deque[float] = deque(maxlen=DRAW_TIMES_KEPT)   # time to draw a frame while dispensing
        self._draw_t0 = 0.0
        self._first_qr = True
        self._ui_map_path = os.environ.get("TAPSHARE_UI_MAP", "")
        self._ui_mapped = 0.0
        self._ui_shape: tuple = ()
        self._ui_shape_since = 0.0

    def tr(self, key: str, _lang: str, **fmt) -> str:
        return tr(key, self.lang, **fmt)

    def build(self):
        self.manager = ScreenManager(transition=NoTransition())
        self.maintenance = MaintenanceScreen(runtime=self.runtime, service=self.service)
        for screen in (IdleScreen(), DispensingScreen(), ReceiptScreen(), OfflineScreen(),
                       OutOfServiceScreen(), UpdatingScreen(), self.maintenance, PinPadScreen()):
            self.manager.add_widget(screen)
        root = BoxLayout(orientation="vertical")
        root.add_widget(self.manager)
        if self.sim_world is not None:
            self.sim_panel = SimPanel()
            root.add_widget(self.sim_panel)
        Window.bind(on_key_down=self._on_key, on_touch_down=self._any_touch, on_touch_up=self._any_touch_up)
        if os.environ.get("TAPSHARE_UI_STATS"):
            Window.bind(on_draw=self._draw_started, on_flip=self._draw_done)
        Window.clearcolor = (0.957, 0.969, 0.980, 1)
        maintenance = self.maintenance
        self.bind(lang=lambda *_a: maintenance.on_data())       # rows built in Python follow the language
        self.tick(0)
        Clock.schedule_interval(self.tick, TICK_S)
        return root

    # ---------------------------------------------------------------- the tick (Kivy's thread)
    def tick(self, _dt: float) -> None:
        self.ticks += 1
        if self.runtime.wait_stopped(0):
            self.stop()
            return
        snap = self.runtime.snapshot
        now = time.monotonic()
        self._note_session_start(snap)
        self._count_down_receipt(snap, now)
        name = screen_for(snap)
        if self.maintenance.pin_pad_shown(snap.state, now):
            name = "pin_pad"
        if name == "maintenance":
            self.maintenance.tick(snap, now)
        if snap.state is State.IDLE and self._snap is not None and self._snap.state is not State.IDLE \
                and self.lang != self.language:
            self.lang = self.language           # the next person is greeted in the machine's first language
        self._show(snap, name)
        if name == "idle" and now - self._qr_checked >= QR_CHECK_S:
            self._qr_checked = now
            self._refresh_qr()
        if self._ui_map_path and now - self._ui_mapped >= UI_MAP_EVERY_S:
            self._ui_mapped = now
            self._map_when_laid_out(now)

    def _note_session_start(self, snap) -> None:
        """The wall time a session started, in the machine's time zone, for its receipt."""
        if snap.session_id != self._session_id:
            self._session_id = snap.session_id
            if snap.session_id:
                self._started_text = local_now(snap.timezone).strftime("%Y-%m-%d %H:%M")

    def _count_down_receipt(self, snap, now: float) -> None:
        if snap.state is State.RECEIPT:
            self._receipt_since = self._receipt_since or now
            left = max(0, int(self.receipt_display_ms / 1000 - (now - self._receipt_since) + 0.999))
            self.manager.get_screen("receipt").countdown = self.tr("touch_to_return", self.lang, s=left)
        else:
            self._receipt_since = None

    def _show(self, snap, name: str) -> None:
        """The screen ``name`` with this snapshot's texts, redrawn only when the snapshot, the language or the
        screen changed."""
        if snap == self._snap and self.lang == self._lang_shown and self.manager.current == name:
            return
        self._snap, self._lang_shown = snap, self.lang
        self.machine_label = f"{self.tr('machine_no', self.lang)} {snap.machine_id}"
        self.manager.get_screen(name).show(present(snap, self.lang, started_hhmm=self._started_text,
                                                   maintenance_timeout_ms=self.maintenance_timeout_ms))
        if self.manager.current != name:
            self.manager.current = name
        # 30 frames a second while water flows; 10 otherwise (touches still answer within 0.1 s)
        Clock._max_fps = BUSY_FPS if snap.state in (State.DISPENSING, State.SETTLING) else IDLE_FPS

    def _refresh_qr(self) -> None:
        payload = self.qr_url()
        if payload != self._qr_payload:
            self._qr_payload = payload
            screen = self.manager.get_screen("idle")
            screen.qr_texture = qr_texture(payload) if payload else None
            if payload and self._first_qr:
                self._first_qr = False
                log.info("QR code on screen")

    # ---------------------------------------------------------------- the widget map (TAPSHARE_UI_MAP)
    def _map_when_laid_out(self, now: float) -> None:
        shape = (self.manager.current, len(Window.children))
        if shape != self._ui_shape:              # a new screen or overlay: map it once laid out
            self._ui_shape, self._ui_shape_since = shape, now
        elif now - self._ui_shape_since >= UI_MAP_EVERY_S:
            self._write_ui_map()

    def _write_ui_map(self) -> None:
        """For tests that touch the screen as a person would (TAPSHARE_UI_MAP): where every touchable widget
        of the current screen is, in window pixels from the top left, with its id and text."""
        screen = self.manager.current_screen
        panel = self.sim_panel.walk(restrict=True) if self.sim_world is not None else ()
        overlays = [w for top in Window.children if top is not self.root for w in top.walk(restrict=True)]
        data = {"screen": screen.name, "lang": self.lang, "overlay": bool(overlays),
                "state": self.runtime.snapshot.state.value,
                "window": [Window.width, Window.height],
                "widgets": touchable_widgets(screen, [*overlays, *screen.walk(restrict=True), *panel]),
                # a modal overlay hides the rest: only its own texts count
                "texts": visible_texts(overlays or list(screen.walk(restrict=True)))}
        tmp = self._ui_map_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        os.replace(tmp, self._ui_map_path)

    # ---------------------------------------------------------------- frame times (TAPSHARE_UI_STATS)
    def _draw_started(self, *_a) -> None:
        self._draw_t0 = time.perf_counter()

    def _draw_done(self, *_a) -> None:
        if self._snap is not None and self._snap.state is State.DISPENSING and self._draw_t0:
            self.draw_ms.append((time.perf_counter() - self._draw_t0) * 1000)

    # ---------------------------------------------------------------- touches and keys
    def toggle_language(self) -> None:
        self.lang = "en" if self.lang == "zh" else "zh"
        self.maintenance.reload_data()          # the ledger's texts (event log, sync) are worded per language

    def screen_stop(self) -> None:
        self.runtime.post(StopPressed(source="screen"))

    def dismiss_receipt(self) -> None:
        self.runtime.post(ReceiptDismissed())

    def sim_press_stop(self) -> None:
        if self.sim_world is not None:
            self.sim_world.press_stop()

    def _on_key(self, _window, _key, _scancode, codepoint, _modifiers) -> bool:
        if codepoint == "s" and self.sim_world is not None:
            self.sim_press_stop()
            return True
        if codepoint == "l":
            self.toggle_language()
            return True
        return False

    def request_pin_pad(self) -> None:
        """From any thread (the stop button's long press): open the PIN pad if the machine is at rest."""
        Clock.schedule_once(lambda _dt: self.maintenance.open_pin_pad(), 0)

    def _any_touch(self, _window, touch) -> bool:
        snap = self.runtime.snapshot
        if snap.state is State.MAINTENANCE and self.service is not None:
            self.service.touch()
        elif snap.state is State.IDLE and self.service is not None and self.manager.current == "idle":
            label = self.manager.get_screen("idle").ids.get("machine")
            if label is not None and label.collide_point(*label.to_widget(*touch.pos)):
                # a long press opens the PIN pad; the finger's lifting (anywhere) cancels it
                self._cancel_long_press()
                self._long_press = Clock.schedule_once(lambda _dt: self.maintenance.open_pin_pad(), LONG_PRESS_S)
        return False

    def _any_touch_up(self, _window, _touch) -> bool:
        self._cancel_long_press()
        return False

    def _cancel_long_press(self) -> None:
        if self._long_press is not None:
            self._long_press.cancel()
            self._long_press = None

    def on_stop(self) -> None:
        stats = os.environ.get("TAPSHARE_UI_STATS")
        if stats:
            Path(stats).write_text(json.dumps({"draw_ms": list(self.draw_ms)}))
        if self.after_stop is not None:
            self.after_stop()


def touchable_widgets(screen, widgets) -> list[dict]:
    """Every widget a finger can act on among ``widgets`` (a button, or one the screen's rules name), with its
    rectangle in window pixels from the top left."""
    named = list(screen.ids.items())                # (name, weak proxy): a proxy equals its widget
    items = []
    for w in widgets:
        name = next((n for n, proxy in named if proxy == w), None)
        if not (name or isinstance(w, ButtonBehavior)) or not w.get_root_window():
            continue
        if w.width <= 0 or w.height <= 0 or getattr(w, "disabled", False) or w.opacity == 0:
            continue
        x, y = w.to_window(*w.pos)
        items.append({"id": name or "", "type": type(w).__name__, "key": str(getattr(w, "key", "")),
                      "text": str(getattr(w, "text", ""))[:60],
                      "button": isinstance(w, ButtonBehavior), "x": round(x),
                      "y": round(Window.height - y - w.height), "w": round(w.width), "h": round(w.height)})
    return items


def visible_texts(widgets) -> list[dict]:
    """Every text on screen with its size and place (the contrast audit reads the pixels there)."""
    out = []
    for w in widgets:
        if not isinstance(w, Label) or not w.text.strip() or w.opacity == 0 or not w.get_root_window():
            continue
        tw, th = w.texture_size
        if tw <= 0 or th <= 0 or w.width <= 0 or w.height <= 0:
            continue
        x, y = w.to_window(*w.pos)
        left, bottom, right, top = x, y, x + w.width, y + w.height
        if not _inside_scroll_views(w, left, bottom, right, top):
            continue
        if left >= 0 and bottom >= 0 and right <= Window.width and top <= Window.height:
            out.append({"text": w.text[:40], "font_px": round(float(w.font_size), 1), "bold": bool(w.bold),
                        "disabled": bool(w.disabled),
                        "x": round(left), "y": round(Window.height - top), "w": round(w.width),
                        "h": round(w.height)})
    return out


def _inside_scroll_views(w, left: float, bottom: float, right: float, top: float) -> bool:
    """Whether no scroll view around ``w`` clips the rectangle (window pixels): only whole texts count."""
    p = w.parent
    while p is not None and p is not p.parent:
        if isinstance(p, ScrollView):
            sx, sy = p.to_window(*p.pos)
            if left < sx or bottom < sy or right > sx + p.width or top > sy + p.height:
                return False
        p = p.parent
    return True
