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
os.environ.setdefault("KIVY_CLIPBOARD", "sdl2")        # not xclip/xsel: a kiosk has neither

log = logging.getLogger("tapshare.ui")
LAYOUTS = {"landscape_800x480": (800, 480), "portrait_720x1280": (720, 1280)}
SIM_PANEL_PX = 48
BUSY_FPS, IDLE_FPS = 30.0, 10.0     # Kivy's frame cap (Clock._max_fps: Kivy has no public setter after start)
TICK_S = 0.1
HERE = Path(__file__).resolve().parent
SCREEN_MODULES = ("idle", "dispensing", "receipt", "offline", "out_of_service", "maintenance", "pin_pad")
PIN_PAD_TIMEOUT_S = 60
LONG_PRESS_S = 2.0
DATA_REFRESH_S = 2.0


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
                     touch_input: str = "auto") -> tuple[int, int]:
    """Kivy's window settings; must run before kivy.core.window is imported.

    Input: exactly one provider. Left to its defaults Kivy adds an mtdev/hidinput provider for every input
    device it finds *and* SDL turns touches into mouse events, so on a Pi's touchscreen each tap arrives twice
    (a PIN digit entered twice, a language toggle undone). No cursor on a dispenser.
    """
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
    """The App object (not yet running). ``qr_url`` returns the current QR payload or None while offline."""
    from kivy.app import App
    from kivy.clock import Clock
    from kivy.core.window import Window
    from kivy.lang import Builder
    from kivy.properties import BooleanProperty, NumericProperty, StringProperty
    from kivy.uix.boxlayout import BoxLayout
    from kivy.uix.screenmanager import NoTransition, ScreenManager

    from kiosk.events import ReceiptDismissed, State, StopPressed
    from kiosk.ui import fonts
    from kiosk.ui.dispensing import DispensingScreen
    from kiosk.ui.i18n import clear_refusal_text, lockout_text, tr
    from kiosk.ui.idle import IdleScreen
    from kiosk.ui.maintenance import MaintenanceScreen
    from kiosk.ui.offline import OfflineScreen
    from kiosk.ui.out_of_service import OutOfServiceScreen
    from kiosk.ui.pin_pad import PinPadScreen
    from kiosk.ui.present import event_line, present, screen_for
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
        # maintenance on the tall portrait screen uses its room: bigger type and touch targets
        mscale = NumericProperty(1.3 if layout.startswith("portrait") else 1.0)
        simulate = BooleanProperty(sim_world is not None)
        phone_link = StringProperty("")
        machine_label = StringProperty("")
        title = "Tapshare"

        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.runtime = runtime
            self.service = service
            self.no_transition = NoTransition()
            self.ticks = 0                          # counted for the systemd watchdog
            self._pin_pad_since: float | None = None
            self._pin_busy = False
            self._long_press = None
            self._data_loaded = 0.0
            self._chart_sampled = 0.0
            self._recorded_pour = None
            from concurrent.futures import ThreadPoolExecutor
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ui-worker")
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
            self._ui_map_path = os.environ.get("TAPSHARE_UI_MAP", "")
            self._ui_mapped = 0.0
            self._ui_shape: tuple = ()
            self._ui_shape_since = 0.0

        def tr(self, key: str, _lang: str, **fmt) -> str:
            return tr(key, self.lang, **fmt)

        def build(self):
            self.manager = ScreenManager(transition=NoTransition())
            for screen in (IdleScreen(), DispensingScreen(), ReceiptScreen(), OfflineScreen(),
                           OutOfServiceScreen(), MaintenanceScreen(), PinPadScreen()):
                self.manager.add_widget(screen)
            root = BoxLayout(orientation="vertical")
            root.add_widget(self.manager)
            if sim_world is not None:
                self.sim_panel = SimPanel()
                root.add_widget(self.sim_panel)
            Window.bind(on_key_down=self._on_key, on_touch_down=self._any_touch, on_touch_up=self._any_touch_up)
            if os.environ.get("TAPSHARE_UI_STATS"):
                Window.bind(on_draw=self._draw_started, on_flip=self._draw_done)
            Window.clearcolor = (0.957, 0.969, 0.980, 1)
            maint = self.manager.get_screen("maintenance")
            self.bind(lang=lambda *_a: maint.on_data())        # rows built in Python follow the language
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
            if snap.session_id != self._session_id:
                self._session_id = snap.session_id
                if snap.session_id:
                    self._started_text = local_now(snap.timezone).strftime("%Y-%m-%d %H:%M")
            if snap.state is State.RECEIPT:
                self._receipt_since = self._receipt_since or now
                left = max(0, int(receipt_display_ms / 1000 - (now - self._receipt_since) + 0.999))
                self.manager.get_screen("receipt").countdown = self.tr("touch_to_return", self.lang, s=left)
            else:
                self._receipt_since = None
            name = screen_for(snap)
            if self._pin_pad_since is not None:
                if snap.state in (State.IDLE, State.OFFLINE, State.OUT_OF_SERVICE) and \
                        now - self._pin_pad_since < PIN_PAD_TIMEOUT_S:
                    name = "pin_pad"
                else:
                    self._pin_pad_since = None           # a customer arrived, maintenance began, or it timed out
            if name == "maintenance":
                self._maintenance_tick(snap, now)
            if snap.state is State.IDLE and self._snap is not None and self._snap.state is not State.IDLE \
                    and self.lang != language:
                self.lang = language            # the next person is greeted in the machine's first language
            if snap != self._snap or self.lang != self._lang_shown or self.manager.current != name:
                self._snap, self._lang_shown = snap, self.lang
                self.machine_label = f"{self.tr('machine_no', self.lang)} {snap.machine_id}"
                self.manager.get_screen(name).show(present(snap, self.lang, started_hhmm=self._started_text,
                                                           maintenance_timeout_ms=maintenance_timeout_ms))
                if self.manager.current != name:
                    self.manager.current = name
                # 30 frames a second while water flows; 10 otherwise (touches still answer within 0.1 s)
                Clock._max_fps = BUSY_FPS if snap.state in (State.DISPENSING, State.SETTLING) else IDLE_FPS
            if name == "idle" and now - self._qr_checked >= 1.0:
                self._qr_checked = now
                self._refresh_qr()
            if self._ui_map_path and now - self._ui_mapped >= 0.3:
                self._ui_mapped = now
                shape = (self.manager.current, len(Window.children))
                if shape != self._ui_shape:              # a new screen or overlay: map it once laid out
                    self._ui_shape, self._ui_shape_since = shape, now
                elif now - self._ui_shape_since >= 0.3:
                    self._write_ui_map()

        def _write_ui_map(self) -> None:
            """For tests that touch the screen as a person would (TAPSHARE_UI_MAP): where every touchable widget
            of the current screen is, in window pixels from the top left, with its id and text."""
            import json

            from kivy.uix.behaviors import ButtonBehavior
            screen = self.manager.current_screen
            named = list(screen.ids.items())                # (name, weak proxy): a proxy equals its widget
            items = []
            panel = self.sim_panel.walk(restrict=True) if sim_world is not None else ()
            overlays = [w for top in Window.children if top is not self.root for w in top.walk(restrict=True)]
            for w in [*overlays, *screen.walk(restrict=True), *panel]:
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
            data = {"screen": screen.name, "lang": self.lang, "overlay": bool(overlays),
                    "state": self.runtime.snapshot.state.value,
                    "window": [Window.width, Window.height], "widgets": items,
                    # a modal overlay hides the rest: only its own texts count
                    "texts": self._visible_texts(overlays or list(screen.walk(restrict=True)))}
            tmp = self._ui_map_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False)
            os.replace(tmp, self._ui_map_path)

        @staticmethod
        def _visible_texts(widgets) -> list[dict]:
            """Every text on screen with its size and place (the contrast audit reads the pixels there)."""
            from kivy.uix.label import Label
            from kivy.uix.scrollview import ScrollView
            out = []
            for w in widgets:
                if not isinstance(w, Label) or not w.text.strip() or w.opacity == 0 or not w.get_root_window():
                    continue
                tw, th = w.texture_size
                if tw <= 0 or th <= 0 or w.width <= 0 or w.height <= 0:
                    continue
                x, y = w.to_window(*w.pos)
                left, bottom, right, top = x, y, x + w.width, y + w.height
                p = w.parent
                while p is not None and p is not p.parent:          # clipped by a scroll view: only if all shown
                    if isinstance(p, ScrollView):
                        sx, sy = p.to_window(*p.pos)
                        if left < sx or bottom < sy or right > sx + p.width or top > sy + p.height:
                            break
                    p = p.parent
                else:
                    if left >= 0 and bottom >= 0 and right <= Window.width and top <= Window.height:
                        out.append({"text": w.text[:40], "font_px": round(float(w.font_size), 1), "bold": bool(w.bold),
                                    "disabled": bool(w.disabled),
                                    "x": round(left), "y": round(Window.height - top), "w": round(w.width),
                                    "h": round(w.height)})
            return out

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
            self._data_loaded = 0.0            # the ledger's texts (event log, sync) are worded per language

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

        # ---------------------------------------------------------------- maintenance entry (PIN pad)
        def request_pin_pad(self) -> None:
            """From any thread (the stop button's long press): open the PIN pad if the machine is at rest."""
            Clock.schedule_once(lambda _dt: self.open_pin_pad(), 0)

        def open_pin_pad(self) -> None:
            if self.service is None or self.runtime.snapshot.state not in (State.IDLE, State.OFFLINE,
                                                                           State.OUT_OF_SERVICE):
                return
            pad = self.manager.get_screen("pin_pad")
            pad.reset()
            if not self.service.pin_known:
                pad.message = self.tr("pin_not_set", self.lang)
            self._pin_pad_since = time.monotonic()

        def close_pin_pad(self) -> None:
            self._pin_pad_since = None
            self.manager.get_screen("pin_pad").reset()

        def root_pin_key(self, key: str) -> None:
            self._pin_pad_since = time.monotonic()
            self.manager.get_screen("pin_pad").press(key)

        def submit_pin(self) -> None:
            pad = self.manager.get_screen("pin_pad")
            if self._pin_busy or not pad.entered:
                return
            self._pin_busy, entered = True, pad.entered
            pad.entered = ""

            def done(result) -> None:
                self._pin_busy = False
                if result.ok:
                    self._pin_pad_since = None
                    self.manager.get_screen("maintenance").section = "calibrate"
                    self._data_loaded = 0.0
                elif result.locked_for_ms:
                    pad.message = self.tr("pin_locked", self.lang, s=(result.locked_for_ms + 999) // 1000)
                else:
                    pad.message = self.tr("pin_wrong", self.lang, n=result.attempts_left)
            self._off_thread(self.service.try_pin, done, entered)

        def _off_thread(self, fn, done, *args) -> None:
            """Run fn on the worker thread; done(result) runs on Kivy's thread."""
            def run() -> None:
                try:
                    result = fn(*args)
                except Exception as e:             # shown, never raised into Kivy's loop
                    log.exception("maintenance action failed")
                    result = e
                Clock.schedule_once(lambda _dt: done(result) if not isinstance(result, Exception)
                                    else self._show_error(result), 0)
            self._worker.submit(run)

        def _show_error(self, e: Exception) -> None:
            self.manager.get_screen("maintenance").cal_message = str(e)

        def _any_touch(self, _window, touch) -> bool:
            snap = self.runtime.snapshot
            if snap.state is State.MAINTENANCE and self.service is not None:
                self.service.touch()
            elif snap.state is State.IDLE and self.service is not None and self.manager.current == "idle":
                label = self.manager.get_screen("idle").ids.get("machine")
                if label is not None and label.collide_point(*label.to_widget(*touch.pos)):
                    # a long press opens the PIN pad; the finger's lifting (anywhere) cancels it
                    self._cancel_long_press()
                    self._long_press = Clock.schedule_once(lambda _dt: self.open_pin_pad(), LONG_PRESS_S)
            return False

        def _any_touch_up(self, _window, _touch) -> bool:
            self._cancel_long_press()
            return False

        def _cancel_long_press(self) -> None:
            if self._long_press is not None:
                self._long_press.cancel()
                self._long_press = None

        # ---------------------------------------------------------------- maintenance screen
        def _maintenance_tick(self, snap, now: float) -> None:
            screen = self.manager.get_screen("maintenance")
            if now - self._chart_sampled >= 1.0:
                self._chart_sampled = now
                from kiosk.ui.present import tech_flow_ml_per_min
                screen.sample(snap.temp_c, tech_flow_ml_per_min(snap), snap.tds_ppm if snap.tds_measured else None)
            if now - self._data_loaded >= DATA_REFRESH_S and self.service is not None:
                self._data_loaded = now
                lockouts = [(r, lockout_text(r, self.lang)) for r in snap.lockouts]
                refusal = clear_refusal_text(snap.clear_refusal, self.lang) if snap.clear_refusal else ""
                self._off_thread(self._load_data, lambda d: screen.set_data({**d, "lockouts": lockouts,
                                                                             "clear_refusal": refusal}))

        def _load_data(self) -> dict:
            svc = self.service
            sync = svc.sync_status()
            info = svc.machine_info()
            due = svc.flush_due_days()
            events = svc.event_log()
            tz = self.runtime.snapshot.timezone
            return {
                "sync_online": self.tr("online_yes" if sync["online"] else "online_no", self.lang),
                "sync_last": "—" if sync["last_ok_s_ago"] is None else
                self.tr("seconds_ago", self.lang, s=sync["last_ok_s_ago"]),
                "sync_pending": str(sync["pending"]), "sync_dead": str(sync["dead"]),
                "dead_letters": svc.dead_letters(),
                "consumables": [c.__dict__ for c in svc.consumables()],
                "flush_due": self.tr("flush_ok", self.lang) if due is None else self.tr("flush_due", self.lang, d=due),
                "event_log": "\n".join(f"{local_now(tz, e['wall_ms'] / 1000):%m-%d %H:%M} "
                                       f"{event_line(e['kind'], e['detail'], self.lang)}" for e in events),
                "info_machine": info["machine_id"], "info_version": info["version"], "info_ip": info["ip"],
                "info_boot": str(info["boot_id"]), "info_disk": f"{info['disk_free_mb']} MB",
                "info_uptime": self.tr("uptime", self.lang, h=info["uptime_s"] // 3600,
                                       m=info["uptime_s"] % 3600 // 60),
            }

        def maintenance_section(self, key: str) -> None:
            screen = self.manager.get_screen("maintenance")
            screen.section, screen.confirm = key, ""
            self._data_loaded = 0.0

        def maintenance_exit(self) -> None:
            self.service.leave()

        def maintenance_pour(self, purpose: str, target_text: str, max_ms: int) -> None:
            target = int(target_text) if target_text.strip().isdigit() else None
            if purpose == "calibration" and not target:
                self.manager.get_screen("maintenance").cal_message = self.tr("cal_target", self.lang) + "?"
                return
            self.service.pour(purpose, target, max_ms)

        def maintenance_stop_pour(self) -> None:
            self.service.stop_pour()

        def maintenance_record_pour(self, measured_text: str) -> None:
            screen = self.manager.get_screen("maintenance")
            last = self.runtime.snapshot.tech_last
            if last is None or last.purpose != "calibration" or last is self._recorded_pour:
                screen.cal_message = self.tr("cal_pour", self.lang) + " …"
                return
            try:
                pour = self.service.pour_reading(last.pulses, int(measured_text or 0))
            except ValueError as e:
                screen.cal_message = str(e)
                return
            self._recorded_pour = last
            screen.cal_pours = [*screen.cal_pours, (pour.pulses, pour.measured_ml)]
            screen.cal_message = self._calibration_preview(screen.cal_pours)

        def _calibration_preview(self, pours) -> str:
            from kiosk.calibration import CalibrationError, Pour, acceptable, compute
            try:
                r = compute([Pour(p, ml) for p, ml in pours], self.runtime.snapshot.milli_pulses_per_litre)
            except CalibrationError:
                return ""
            text = self.tr("cal_result", self.lang, new=f"{r.milli_pulses_per_litre / 1000:.1f}",
                           old=f"{r.old_milli_pulses_per_litre / 1000:.1f}", spread=f"{r.spread_permille / 10:.1f}",
                           change=f"{r.change_permille / 10:+.1f}")
            problem = acceptable(r)
            return text + (f"\n{problem}" if problem else "")

        def maintenance_accept_calibration(self) -> None:
            from kiosk.calibration import Pour, acceptable, compute
            screen = self.manager.get_screen("maintenance")
            pours = [Pour(p, ml) for p, ml in screen.cal_pours]
            problem = acceptable(compute(pours, self.runtime.snapshot.milli_pulses_per_litre))
            if problem:
                screen.cal_message = problem
                return
            factor = self.service.accept_calibration(pours)
            screen.cal_pours, screen.cal_message = [], f"✓ {factor / 1000:.1f}"

        def maintenance_discard_calibration(self) -> None:
            screen = self.manager.get_screen("maintenance")
            screen.cal_pours, screen.cal_message = [], ""

        def maintenance_dead(self, event_id: str, action: str) -> None:
            screen = self.manager.get_screen("maintenance")
            if action == "discard" and screen.confirm != event_id:
                screen.confirm = event_id                 # a second tap confirms
                return
            screen.confirm = ""
            fn = self.service.retry_dead if action == "retry" else self.service.discard_dead
            self._off_thread(fn, lambda _ok: setattr(self, "_data_loaded", 0.0), event_id)

        def maintenance_replace(self, kind: str) -> None:
            screen = self.manager.get_screen("maintenance")
            if screen.confirm != kind:
                screen.confirm = kind
                return
            screen.confirm = ""
            self._off_thread(self.service.replace_consumable, lambda _r: setattr(self, "_data_loaded", 0.0), kind)

        def maintenance_clear(self, reason: str) -> None:
            self.service.clear_lockout(reason)
            self._data_loaded = 0.0

        def maintenance_service(self, out: bool) -> None:
            self.service.out_of_service(out)
            self._data_loaded = 0.0

        def on_stop(self) -> None:
            stats = os.environ.get("TAPSHARE_UI_STATS")
            if stats:
                Path(stats).write_text(json.dumps({"draw_ms": self.draw_ms}))
            if on_stop is not None:
                on_stop()

    return KioskApp()
