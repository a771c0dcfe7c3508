"""Maintenance: the technician's screen (issue 8). Left, the sections; right, the section's panel. Live
values (pours, sensors, valve) come from the core's snapshot on each tick; what lives in the ledger
(consumables, dead letters, the event log, machine information) is loaded on a worker thread by the app
and handed in with :meth:`MaintenanceScreen.set_data`."""

from collections import deque

from kivy.graphics import Color, Line
from kivy.properties import DictProperty, ListProperty, StringProperty
from kivy.uix.widget import Widget

from kiosk.ui.base import KioskScreen

SECTIONS = ("calibrate", "flush", "sensors", "sync", "consumables", "faults", "info")
CHART_POINTS = 300                       # five minutes at one sample a second


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
    section = StringProperty("calibrate")
    data = DictProperty({})              # from the ledger (worker thread), see set_data
    cal_pours = ListProperty([])         # [(pulses, measured_ml), ...] recorded in this wizard run
    cal_message = StringProperty("")
    confirm = StringProperty("")         # the id waiting for a second tap (discard, replace)

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.temps: deque = deque(maxlen=CHART_POINTS)
        self.flows: deque = deque(maxlen=CHART_POINTS)
        self.tds: deque = deque(maxlen=CHART_POINTS)

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

    # ---------------------------------------------------------------- lists built from the data
    def on_data(self, *_a) -> None:
        from kivy.app import App
        app = App.get_running_app()
        if app is None or not self.ids:
            return
        tr = app.tr
        rows = self.ids.dead_list
        rows.clear_widgets()
        for d in self.data.get("dead_letters", []):
            eid = d["event_id"]
            rows.add_widget(_row(f"{d['kind']} {eid}\n{(d.get('last_error') or '')[:80]}", [
                (tr("retry", ""), lambda eid=eid: app.maintenance_dead(eid, "retry"), (0.039, 0.4, 0.761, 1)),
                (tr("confirm_discard", "") if self.confirm == eid else tr("discard", ""),
                 lambda eid=eid: app.maintenance_dead(eid, "discard"), (0.776, 0.157, 0.157, 1))]))
        rows = self.ids.consumable_list
        rows.clear_widgets()
        for c in self.data.get("consumables", []):
            text = f"{tr('c_' + c['kind'], '')}: " + tr("c_usage", "", l=c["used_l"], d=c["used_days"],
                                                        pct=c["used_permille"] // 10)
            if c["warn"]:
                text += "\n" + tr("c_warn", "")
            rows.add_widget(_row(text, [(tr("confirm_replace", "") if self.confirm == c["kind"] else tr("replace", ""),
                                         lambda k=c["kind"]: app.maintenance_replace(k), (0.102, 0.498, 0.216, 1))]))
        rows = self.ids.lockout_list
        rows.clear_widgets()
        lockouts = self.data.get("lockouts", [])
        if self.data.get("clear_refusal"):
            rows.add_widget(_row(self.data["clear_refusal"], []))
        if not lockouts:
            rows.add_widget(_row(tr("no_lockouts", ""), []))
        for reason, text in lockouts:
            rows.add_widget(_row(text, [(tr("clear", ""), lambda r=reason: app.maintenance_clear(r),
                                         (0.039, 0.4, 0.761, 1))]))

    def on_confirm(self, *_a) -> None:
        self.on_data()


def _row(text: str, buttons: list):
    from kivy.app import App
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
