"""Maintenance: the technician's screen (issue 8) and what the technician does there. Left, the sections;
right, the section's panel. Live values (pours, sensors, valve) come from the core's snapshot on each tick; what
lives in the ledger (consumables, dead letters, the event log, machine information) is loaded on a worker thread
and handed in with :meth:`MaintenanceScreen.set_data`. The way in, the PIN pad, is handled here too: the PIN is
checked on the worker thread (scrypt is slow on purpose)."""

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from kivy.app import App
from kivy.clock import Clock
from kivy.graphics import Color, Line
from kivy.properties import DictProperty, ListProperty, StringProperty
from kivy.uix.widget import Widget

from kiosk.events import State
from kiosk.ui.app import local_now
from kiosk.ui.base import KioskScreen
from kiosk.ui.i18n import clear_refusal_text, lockout_text, tr
from kiosk.ui.present import event_line, tech_flow_ml_per_min

log = logging.getLogger("tapshare.ui")
SECTIONS = ("calibrate", "flush", "sensors", "sync", "consumables", "faults", "info")
CHART_POINTS = 300                       # five minutes at one sample a second
CHART_SAMPLE_S = 1.0
DATA_REFRESH_S = 2.0
PIN_PAD_TIMEOUT_S = 60
AT_REST = (State.IDLE, State.OFFLINE, State.OUT_OF_SERVICE)     # the states a technician may enter from


class Chart(Widget):
    """A line chart of the last minutes, drawn with Kivy's own graphics (no plotting library)."""

    series = ListProperty([])            # [(values, (r, g, b, a), lo, hi), ...]

    def on_series(self, *_a) -> None:
        self.redraw()

    def on_size(self, *_a) -> None:
        self.redraw()

    def redraw(self) -> None:
        self.canvas.clear()
        with self.canvas:
            Color(0.85, 0.88, 0.92, 1)
            Line(rectangle=(self.x, self.y, self.width, self.height), width=1)
            for q in (1, 2, 3):                 # quarter lines of each series' scale (the legend gives the range)
                y = self.y + self.height * q / 4
                Line(points=[self.x, y, self.x + self.width, y], width=1, dash_length=4, dash_offset=4)
            for m in range(1, 5):               # a line a minute
                x = self.x + self.width * m / 5
                Line(points=[x, self.y, x, self.y + self.height], width=1, dash_length=4, dash_offset=4)
            for values, rgba, lo, hi in self.series:
                pts = [v for v in values if v is not None]
                if len(pts) < 2 or hi <= lo:
                    continue
                Color(*rgba)
                step = self.width / max(1, CHART_POINTS - 1)
                start = CHART_POINTS - len(values)
                xy = []
                for i, v in enumerate(values):
                    if v is None:
                        continue
                    xy += [self.x + (start + i) * step, self.y + (min(hi, max(lo, v)) - lo) / (hi - lo) * self.height]
                Line(points=xy, width=1.4)


class MaintenanceScreen(KioskScreen):
    """The screen, and the technician's actions on it (the .kv file's buttons call its methods). ``runtime``
    gives the snapshot; ``service`` (:class:`kiosk.maintenance.MaintenanceService`, None without a ledger) does
    the work, slow calls on a worker thread whose results come back on Kivy's thread."""

    section = StringProperty("calibrate")
    data = DictProperty({})              # from the ledger (worker thread), see set_data
    cal_pours = ListProperty([])         # [(pulses, measured_ml), ...] recorded in this wizard run
    cal_message = StringProperty("")
    confirm = StringProperty("")         # the id waiting for a second tap (discard, replace)

    def __init__(self, runtime=None, service=None, **kw) -> None:
        super().__init__(**kw)
        self.runtime = runtime
        self.service = service
        self.temps: deque = deque(maxlen=CHART_POINTS)
        self.flows: deque = deque(maxlen=CHART_POINTS)
        self.tds: deque = deque(maxlen=CHART_POINTS)
        self.pin_busy = False                        # a PIN is being checked
        self.recorded_pour = None                    # the calibration pour whose jug reading is recorded
        self._pin_pad_since: float | None = None     # monotonic seconds of the pad's opening or last key
        self._data_loaded = 0.0
        self._chart_sampled = 0.0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ui-worker")

    def on_section(self, _inst, value: str) -> None:
        if "panels" in self.ids and value in self.ids.panels.screen_names:
            self.ids.panels.current = value

    def set_data(self, data: dict) -> None:
        self.data = data

    def sample(self, temp_c, flow_ml_per_min, tds_ppm) -> None:
        """One point a second for the chart."""
        self.temps.append(temp_c)
        self.flows.append(flow_ml_per_min)
        self.tds.append(tds_ppm)
        if self.section == "sensors" and "chart" in self.ids:
            self.ids.chart.series = [(list(self.temps), (0.78, 0.16, 0.16, 1), 0, 40),
                                     (list(self.flows), (0.04, 0.4, 0.76, 1), 0, 10_000),
                                     (list(self.tds), (0.1, 0.5, 0.22, 1), 0, 1_000)]

    @staticmethod
    def _lang() -> str:
        app = App.get_running_app()
        return getattr(app, "lang", "zh")

    def _tr(self, key: str, **fmt) -> str:
        return tr(key, self._lang(), **fmt)

    # ---------------------------------------------------------------- the way in: the PIN pad
    def open_pin_pad(self) -> None:
        """The PIN pad, if maintenance can be entered (a service, the machine at rest)."""
        if self.service is None or self.runtime.snapshot.state not in AT_REST:
            return
        pad = self.manager.get_screen("pin_pad")
        pad.reset()
        if not self.service.pin_known:
            pad.message = self._tr("pin_not_set")
        self._pin_pad_since = time.monotonic()

    def close_pin_pad(self) -> None:
        self._pin_pad_since = None
        self.manager.get_screen("pin_pad").reset()

    def pin_pad_shown(self, state: State, now: float) -> bool:
        """Whether the PIN pad stays on screen; it closes for good when a customer arrives, maintenance begins,
        or no key was pressed for PIN_PAD_TIMEOUT_S."""
        if self._pin_pad_since is None:
            return False
        if state in AT_REST and now - self._pin_pad_since < PIN_PAD_TIMEOUT_S:
            return True
        self._pin_pad_since = None
        return False

    def pin_key(self, key: str) -> None:
        self._pin_pad_since = time.monotonic()
        self.manager.get_screen("pin_pad").press(key)

    def submit_pin(self) -> None:
        pad = self.manager.get_screen("pin_pad")
        if self.pin_busy or not pad.entered:
            return
        self.pin_busy, entered = True, pad.entered
        pad.entered = ""

        def done(result) -> None:
            self.pin_busy = False
            if result.ok:
                self._pin_pad_since = None
                self.section = "calibrate"
                self.reload_data()
            elif result.locked_for_ms:
                pad.message = self._tr("pin_locked", s=(result.locked_for_ms + 999) // 1000)
            else:
                pad.message = self._tr("pin_wrong", n=result.attempts_left)
        self._off_thread(self.service.try_pin, done, entered)

    # ---------------------------------------------------------------- live values and the ledger's data
    def tick(self, snap, now: float) -> None:
        """On the app's tick while this screen shows: a chart point a second, the ledger's data every
        DATA_REFRESH_S (sooner after an action, see :meth:`reload_data`)."""
        if now - self._chart_sampled >= CHART_SAMPLE_S:
            self._chart_sampled = now
            self.sample(snap.temp_c, tech_flow_ml_per_min(snap), snap.tds_ppm if snap.tds_measured else None)
        if now - self._data_loaded >= DATA_REFRESH_S and self.service is not None:
            self._data_loaded = now
            lang = self._lang()
            lockouts = [(r, lockout_text(r, lang)) for r in snap.lockouts]
            refusal = clear_refusal_text(snap.clear_refusal, lang) if snap.clear_refusal else ""
            self._off_thread(self._load_data, lambda d: self.set_data({**d, "lockouts": lockouts,
                                                                       "clear_refusal": refusal}))

    def reload_data(self) -> None:
        """The ledger's data again on the next tick (after an action, or in another language)."""
        self._data_loaded = 0.0

    def _load_data(self) -> dict:
        """On the worker thread: the ledger's side of every section, in words."""
        svc, lang = self.service, self._lang()
        sync = svc.sync_status()
        info = svc.machine_info()
        due = svc.flush_due_days()
        events = svc.event_log()
        tz = self.runtime.snapshot.timezone
        return {
            "sync_online": tr("online_yes" if sync["online"] else "online_no", lang),
            "sync_last": "—" if sync["last_ok_s_ago"] is None else tr("seconds_ago", lang, s=sync["last_ok_s_ago"]),
            "sync_pending": str(sync["pending"]), "sync_dead": str(sync["dead"]),
            "dead_letters": svc.dead_letters(),
            "consumables": [c.__dict__ for c in svc.consumables()],
            "flush_due": tr("flush_ok", lang) if due is None else tr("flush_due", lang, d=due),
            "event_log": "\n".join(f"{local_now(tz, e['wall_ms'] / 1000):%m-%d %H:%M} "
                                   f"{event_line(e['kind'], e['detail'], lang)}" for e in events),
            "info_machine": info["machine_id"], "info_version": info["version"], "info_ip": info["ip"],
            "info_boot": str(info["boot_id"]), "info_disk": f"{info['disk_free_mb']} MB",
            "info_uptime": tr("uptime", lang, h=info["uptime_s"] // 3600, m=info["uptime_s"] % 3600 // 60),
        }

    def _off_thread(self, fn, done, *args) -> None:
        """Run fn on the worker thread; done(result) runs on Kivy's thread (an error is shown instead)."""
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
        self.cal_message = str(e)

    # ---------------------------------------------------------------- the technician's actions
    def show_section(self, key: str) -> None:
        self.section, self.confirm = key, ""
        self.reload_data()

    def leave(self) -> None:
        self.service.leave()

    def pour(self, purpose: str, target_text: str, max_ms: int) -> None:
        target = int(target_text) if target_text.strip().isdigit() else None
        if purpose == "calibration" and not target:
            self.cal_message = self._tr("cal_target") + "?"
            return
        self.service.pour(purpose, target, max_ms)

    def stop_pour(self) -> None:
        self.service.stop_pour()

    def record_pour(self, measured_text: str) -> None:
        """The jug's reading for the last calibration pour (once per pour), and the factor it would give."""
        last = self.runtime.snapshot.tech_last
        if last is None or last.purpose != "calibration" or last is self.recorded_pour:
            self.cal_message = self._tr("cal_pour") + " …"
            return
        try:
            pour = self.service.pour_reading(last.pulses, int(measured_text or 0))
        except ValueError as e:
            self.cal_message = str(e)
            return
        self.recorded_pour = last
        self.cal_pours = [*self.cal_pours, (pour.pulses, pour.measured_ml)]
        self.cal_message = self._calibration_preview(self.cal_pours)

    def _calibration_preview(self, pours) -> str:
        from kiosk.calibration import CalibrationError, Pour, acceptable, compute
        try:
            r = compute([Pour(p, ml) for p, ml in pours], self.runtime.snapshot.milli_pulses_per_litre)
        except CalibrationError:
            return ""
        text = self._tr("cal_result", new=f"{r.milli_pulses_per_litre / 1000:.1f}",
                        old=f"{r.old_milli_pulses_per_litre / 1000:.1f}", spread=f"{r.spread_permille / 10:.1f}",
                        change=f"{r.change_permille / 10:+.1f}")
        problem = acceptable(r)
        return text + (f"\n{problem}" if problem else "")

    def accept_calibration(self) -> None:
        from kiosk.calibration import Pour, acceptable, compute
        pours = [Pour(p, ml) for p, ml in self.cal_pours]
        problem = acceptable(compute(pours, self.runtime.snapshot.milli_pulses_per_litre))
        if problem:
            self.cal_message = problem
            return
        factor = self.service.accept_calibration(pours)
        self.cal_pours, self.cal_message = [], f"✓ {factor / 1000:.1f}"

    def discard_calibration(self) -> None:
        self.cal_pours, self.cal_message = [], ""

    def dead_letter(self, event_id: str, action: str) -> None:
        """``retry`` sends a dead letter again; ``discard`` drops it on a second tap."""
        if action == "discard" and self.confirm != event_id:
            self.confirm = event_id                 # a second tap confirms
            return
        self.confirm = ""
        fn = self.service.retry_dead if action == "retry" else self.service.discard_dead
        self._off_thread(fn, lambda _ok: self.reload_data(), event_id)

    def replace_consumable(self, kind: str) -> None:
        """On a second tap: a consumable was replaced, its usage counts again from now."""
        if self.confirm != kind:
            self.confirm = kind
            return
        self.confirm = ""
        self._off_thread(self.service.replace_consumable, lambda _r: self.reload_data(), kind)

    def clear_lockout(self, reason: str) -> None:
        self.service.clear_lockout(reason)
        self.reload_data()

    def out_of_service(self, out: bool) -> None:
        self.service.out_of_service(out)
        self.reload_data()

    # ---------------------------------------------------------------- lists built from the data
    def on_data(self, *_a) -> None:
        app = App.get_running_app()
        if app is None or not self.ids:
            return
        tr = app.tr
        rows = self.ids.dead_list
        rows.clear_widgets()
        for d in self.data.get("dead_letters", []):
            eid = d["event_id"]
            rows.add_widget(_row(f"{d['kind']} {eid}\n{(d.get('last_error') or '')[:80]}", [
                (tr("retry", ""), lambda eid=eid: self.dead_letter(eid, "retry"), (0.039, 0.4, 0.761, 1)),
                (tr("confirm_discard", "") if self.confirm == eid else tr("discard", ""),
                 lambda eid=eid: self.dead_letter(eid, "discard"), (0.776, 0.157, 0.157, 1))]))
        rows = self.ids.consumable_list
        rows.clear_widgets()
        for c in self.data.get("consumables", []):
            text = f"{tr('c_' + c['kind'], '')}: " + tr("c_usage", "", l=c["used_l"], d=c["used_days"],
                                                        pct=c["used_permille"] // 10)
            if c["warn"]:
                text += "\n" + tr("c_warn", "")
            rows.add_widget(_row(text, [(tr("confirm_replace", "") if self.confirm == c["kind"] else tr("replace", ""),
                                         lambda k=c["kind"]: self.replace_consumable(k), (0.102, 0.498, 0.216, 1))]))
        rows = self.ids.lockout_list
        rows.clear_widgets()
        lockouts = self.data.get("lockouts", [])
        if self.data.get("clear_refusal"):
            rows.add_widget(_row(self.data["clear_refusal"], []))
        if not lockouts:
            rows.add_widget(_row(tr("no_lockouts", ""), []))
        for reason, text in lockouts:
            rows.add_widget(_row(text, [(tr("clear", ""), lambda r=reason: self.clear_lockout(r),
                                         (0.039, 0.4, 0.761, 1))]))

    def on_confirm(self, *_a) -> None:
        self.on_data()


def _row(text: str, buttons: list):
    from kivy.metrics import dp, sp
    from kivy.uix.boxlayout import BoxLayout
    from kivy.uix.button import Button
    from kivy.uix.label import Label
    k = getattr(App.get_running_app(), "mscale", 1.0)
    row = BoxLayout(size_hint_y=None, height=dp(52) * k, spacing=dp(6))
    label = Label(text=text, font_size=sp(16) * k, color=(0.09, 0.125, 0.165, 1), halign="left", valign="middle",
                  shorten=True, shorten_from="right")
    label.bind(size=lambda w, s: setattr(w, "text_size", s))
    row.add_widget(label)
    for caption, action, rgba in buttons:
        b = Button(text=caption, font_name="Tapshare", font_size=sp(20) * k, size_hint_x=None, width=dp(140) * k,
                   background_normal="", background_color=rgba, color=(1, 1, 1, 1))
        b.bind(on_release=lambda _b, a=action: a())
        row.add_widget(b)
    return row
