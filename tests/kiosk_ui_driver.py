"""Runs the real kiosk App (one process = one Kivy window) on a simulated dispenser and drives it through
every screen in both languages, saving a screenshot of each and checking every label for overflow.
Writes a JSON report. Used by tests/test_kiosk_ui.py under Xvfb:

    python tests/kiosk_ui_driver.py --layout landscape_800x480 --out DIR
"""

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hal.base import SystemClock
from hal.machine import simulated_config, simulated_dispenser
from kiosk.config import Config
from kiosk.events import (
    EnterMaintenance,
    ExitMaintenance,
    Grant,
    GrantReceived,
    LinkChanged,
    State,
)
from kiosk.ui.app import configure_window


def overflow_problems(root) -> list[str]:
    """Labels whose text does not fit: bigger than their box, wrapped past their box's height (measured
    again without the clipping), or pushed outside their parent's box by their siblings."""
    from kivy.core.text import Label as CoreLabel
    from kivy.uix.label import Label
    out = []
    for w in root.walk(restrict=True):
        if not isinstance(w, Label) or not w.text or w.shorten or w.width <= 1 or w.height <= 1:
            continue
        name = f"{type(w).__name__} {w.text[:30]!r}"
        tw, th = w.texture_size
        if tw > w.width + 2 or th > w.height + 2:
            out.append(f"{name}: text {tw:.0f}x{th:.0f} in box {w.width:.0f}x{w.height:.0f}")
            continue
        wrap_w = w.text_size[0] if w.text_size and w.text_size[0] else None
        if wrap_w:
            core = CoreLabel(text=w.text, font_name=w.font_name, font_size=w.font_size, bold=w.bold,
                             text_size=(wrap_w, None), padding=w.padding)
            core.refresh()
            full_h = core.texture.height if core.texture else 0
            if full_h > w.height + 2:
                out.append(f"{name}: wrapped text needs {full_h:.0f} px, box is {w.height:.0f}")
                continue
        p = w.parent
        from kivy.uix.scrollview import ScrollView
        inside = p is None or p is root or not hasattr(p, "pos") or hasattr(p, "manager") or p.height <= 1 or \
            isinstance(p, ScrollView) or (
            p.y - 2 <= w.y and w.top <= p.top + 2 and p.x - 2 <= w.x and w.right <= p.right + 2)
        if not inside:
            out.append(f"{name}: outside its container ({w.x:.0f},{w.y:.0f},{w.width:.0f}x{w.height:.0f} "
                       f"in {p.x:.0f},{p.y:.0f},{p.width:.0f}x{p.height:.0f})")
    return out


def wait(pred, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def on_kivy(fn):
    """Run fn on Kivy's thread and wait for it."""
    from kivy.clock import Clock
    done = threading.Event()
    box = {}

    def call(_dt):
        try:
            box["v"] = fn()
        finally:
            done.set()
    Clock.schedule_once(call, 0)
    done.wait(10)
    return box.get("v")


class Drive:
    """The scripts, run on their own thread while Kivy's loop runs the App; what they find goes in ``report``."""

    def __init__(self, app, rt, hw, service, cfg, clock, out: Path) -> None:
        self.app, self.rt, self.hw, self.service, self.cfg, self.clock, self.out = app, rt, hw, service, cfg, clock, out
        self.report: dict = {"shots": [], "problems": [], "states": []}

    def shoot(self, name: str) -> None:
        """A screenshot of the current screen in each language, and its labels checked for overflow."""
        from kivy.core.window import Window
        app, out = self.app, self.out
        time.sleep(0.35)                                   # three ticks: the screen shows the newest snapshot
        for lang in ("zh", "en"):
            on_kivy(lambda lang=lang: setattr(app, "lang", lang))
            time.sleep(0.3)
            path = out / f"{name}-{lang}.png"
            on_kivy(lambda path=path: Window.screenshot(name=str(path)))
            # Window.screenshot appends a counter to the name: find the file it wrote
            written = sorted(out.glob(f"{name}-{lang}*.png"), key=lambda p: p.stat().st_mtime)[-1]
            if written != path:
                written.replace(path)
            problems = on_kivy(lambda: overflow_problems(app.root))
            self.report["shots"].append(str(path))
            self.report["problems"] += [f"{name}-{lang}: {p}" for p in problems]
            self.report["states"].append([name, lang, self.rt.snapshot.state.value, app.manager.current])
        on_kivy(lambda: setattr(app, "lang", "zh"))

    def run(self, scenario: str) -> None:
        """One scenario; any failure is reported, and the window closes either way."""
        try:
            assert wait(lambda: self.app.root is not None and self.rt.snapshot.state is State.IDLE)
            if scenario == "maintenance":
                self.maintenance_script()
            else:
                self.screens_script()
            self.report["ok"] = True
        except Exception as e:
            import traceback
            self.report["error"] = f"{e!r}\n{traceback.format_exc()}"
            if scenario == "maintenance":
                self.report["debug"] = {
                    "lockouts": self.rt.snapshot.lockouts, "message": getattr(self.app.maintenance, "cal_message", ""),
                    "events": [(e["kind"], e["detail"]) for e in self.service.ledger.events(limit=30)]}
        finally:
            on_kivy(self.app.stop)

    # ---------------------------------------------------------------- every screen a customer sees
    def screens_script(self) -> None:
        app, rt, hw, clock = self.app, self.rt, self.hw, self.clock
        t0 = time.monotonic()
        assert wait(lambda: on_kivy(lambda: app.manager.get_screen("idle").qr_texture is not None))
        self.report["first_qr_s"] = time.monotonic() - t0
        self.shoot("idle")
        hw.world.water.set_flow(5_000)
        rt.post(GrantReceived(Grant(session_id="ui-1", machine_id="SIM-001", user_ref="u", price_fen_per_l=200,
                                    credit_limit_fen=500, max_volume_ml=5_000, max_duration_ms=120_000,
                                    max_idle_ms=15_000, expires_at_ms=clock.monotonic_ms() + 30_000)))
        assert wait(lambda: rt.snapshot.state is State.DISPENSING and rt.snapshot.volume_ml > 150)
        self.shoot("dispensing")
        hw.world.press_stop()
        assert wait(lambda: rt.snapshot.state is State.RECEIPT)
        self.shoot("receipt")
        on_kivy(app.dismiss_receipt)
        assert wait(lambda: rt.snapshot.state is State.IDLE)
        rt.post(LinkChanged(False))
        assert wait(lambda: rt.snapshot.state is State.OFFLINE)
        self.shoot("offline")
        rt.post(LinkChanged(True))
        assert wait(lambda: rt.snapshot.state is State.IDLE)
        rt.post(EnterMaintenance(actor="test"))
        assert wait(lambda: rt.snapshot.state is State.MAINTENANCE)
        self.shoot("maintenance")
        rt.post(ExitMaintenance(actor="test"))
        assert wait(lambda: rt.snapshot.state is State.IDLE)
        assert rt.begin_update("0.3.0", hold_ms=600_000) is None          # an update holds the machine
        assert wait(lambda: rt.snapshot.state is State.UPDATING)
        self.shoot("updating")
        rt.end_update("0.3.0")
        assert wait(lambda: rt.snapshot.state is State.IDLE)
        hw.world.set_leak(True)
        assert wait(lambda: rt.snapshot.state is State.OUT_OF_SERVICE)
        self.shoot("out_of_service")

    # ---------------------------------------------------------------- a technician's visit
    def maintenance_script(self) -> None:
        self.enter_by_pin()
        self.calibrate()
        self.flush()
        self.sensors_and_dead_letter()
        m = self.app.maintenance
        for section in ("consumables", "faults", "info"):
            on_kivy(lambda section=section: m.show_section(section))
            assert wait(lambda: bool(m.data), 10)
            time.sleep(0.5)
            self.shoot(f"maintenance-{section}")
        on_kivy(m.leave)
        assert wait(lambda: self.rt.snapshot.state is State.IDLE)
        events = [e["kind"] for e in self.service.ledger.events(limit=500)]
        self.report["events"] = [k for k in events if k.startswith(("maintenance", "tech_pour", "calibration"))]

    def type_pin(self, pin: str) -> None:
        m = self.app.maintenance
        for d in pin:
            on_kivy(lambda d=d: m.pin_key(d))
        on_kivy(m.submit_pin)
        assert wait(lambda: not m.pin_busy)

    def enter_by_pin(self) -> None:
        """Five wrong PINs lock entry (the right one is refused then too); once the lock ran out, it opens."""
        app, rt, service = self.app, self.rt, self.service
        pad = app.manager.get_screen("pin_pad")
        on_kivy(app.maintenance.open_pin_pad)
        assert wait(lambda: app.manager.current == "pin_pad")
        self.shoot("pin_pad")
        for _ in range(5):
            self.type_pin("111222")
        assert wait(lambda: "30" in pad.message or "60" in pad.message or "秒" in pad.message)
        self.report["pin_locked_message"] = pad.message
        self.shoot("pin_locked")
        self.type_pin("482913")                                  # right PIN, but still locked
        assert rt.snapshot.state is State.IDLE
        self.report["pin_state"] = service.ledger.setting("maintenance_pin_state")
        service.ledger.set_setting("maintenance_pin_state", {})        # the lock has run out
        self.type_pin("482913")
        assert wait(lambda: rt.snapshot.state is State.MAINTENANCE and app.manager.current == "maintenance")

    def calibrate(self) -> None:
        """The meter really gives 8 % more pulses than the configured factor says: three pours into a jug."""
        rt, m = self.rt, self.app.maintenance
        true_ppl = self.cfg.flow.pulses_per_litre * 1.08
        self.hw.world.water.pulses_per_litre = true_ppl
        self.hw.world.water.set_flow(6_000)
        for _ in range(3):
            on_kivy(lambda: setattr(m.ids.cal_target, "text", "300"))
            on_kivy(lambda: m.pour("calibration", m.ids.cal_target.text, 60_000))
            assert wait(lambda: rt.snapshot.tech_active)
            assert wait(lambda: not rt.snapshot.tech_active and rt.snapshot.tech_last is not None
                        and rt.snapshot.tech_last is not m.recorded_pour, 20)
            measured = round(rt.snapshot.tech_last.pulses * 1000 / true_ppl)      # what the jug shows
            on_kivy(lambda measured=measured: setattr(m.ids.cal_measured, "text", str(measured)))
            on_kivy(lambda: m.record_pour(m.ids.cal_measured.text))
        assert wait(lambda: len(m.cal_pours) == 3)
        self.shoot("maintenance-calibrate")
        on_kivy(m.accept_calibration)
        assert wait(lambda: rt.snapshot.milli_pulses_per_litre != 450_000)
        self.report["calibration"] = {"true_mppl": round(true_ppl * 1000),
                                      "new_mppl": rt.snapshot.milli_pulses_per_litre,
                                      "saved": self.service.ledger.setting("milli_pulses_per_litre")}

    def flush(self) -> None:
        """A flush asks for 30 s; the machine's hard maximum (3 s here) ends it."""
        rt, m = self.rt, self.app.maintenance
        on_kivy(lambda: m.show_section("flush"))
        on_kivy(lambda: m.pour("flush", "", 30_000))
        assert wait(lambda: rt.snapshot.tech_active)
        self.shoot("maintenance-flush-running")
        assert wait(lambda: rt.snapshot.tech_last is not None and rt.snapshot.tech_last.purpose == "flush", 10)
        self.report["flush"] = {"reason": rt.snapshot.tech_last.reason,
                                "duration_ms": rt.snapshot.tech_last.duration_ms,
                                "lockouts": list(rt.snapshot.lockouts),
                                "events": [(e["kind"], e["detail"]) for e in self.service.ledger.events(limit=12)]}

    def sensors_and_dead_letter(self) -> None:
        """The sensors' chart; a dead letter, retried from the sync section."""
        m, ledger = self.app.maintenance, self.service.ledger
        on_kivy(lambda: m.show_section("sensors"))
        time.sleep(2.5)
        self.shoot("maintenance-sensors")
        eid = ledger.record_event("test_report", {"n": 1}, report=True)
        ledger.mark_dead(eid, "422 rejected by the cloud (test)")
        on_kivy(lambda: m.show_section("sync"))
        assert wait(lambda: any(d["event_id"] == eid for d in m.data.get("dead_letters", [])), 10)
        self.shoot("maintenance-sync")
        on_kivy(lambda: m.dead_letter(eid, "retry"))
        assert wait(lambda: any(r["event_id"] == eid for r in ledger.outbox("pending")), 10)
        self.report["dead_letter_retried"] = True


def start_kiosk(layout: str, tmp: Path):
    """The simulated dispenser running, its maintenance PIN set, and the App (not yet running) on it."""
    cfg = simulated_config(Config().replace(paths={"data_dir": str(tmp / "data")}, machine={"id": "SIM-001"},
                                            screen={"layout": layout, "receipt_display_ms": 60_000},
                                            maintenance={"max_pour_ms": 3_000}))
    configure_window(cfg.screen.layout, fullscreen=False, simulate=True)
    clock = SystemClock()
    hw, rt, _ = simulated_dispenser(cfg, clock, tmp / "sim")
    threading.Thread(target=rt.run, daemon=True).start()
    hw.start()
    rt.post(LinkChanged(True))
    from kiosk.maintenance import MaintenanceService
    from kiosk.ui.app import build_app
    service = MaintenanceService(cfg, rt)
    service.set_pin("482913", actor="test")
    app = build_app(rt, layout=cfg.screen.layout, language="zh", receipt_display_ms=60_000,
                    qr_url=lambda: "http://127.0.0.1:8700/m/SIM-001?c=123456", sim_world=hw.world,
                    phone_link="http://127.0.0.1:8700/dev/qr/SIM-001", service=service,
                    maintenance_timeout_ms=cfg.maintenance.timeout_ms)
    return cfg, clock, hw, rt, service, app


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="landscape_800x480")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", default="screens", choices=("screens", "maintenance"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, clock, hw, rt, service, app = start_kiosk(args.layout, Path(tempfile.mkdtemp()))
    drive = Drive(app, rt, hw, service, cfg, clock, out)
    threading.Thread(target=drive.run, args=(args.scenario,), daemon=True).start()
    app.run()
    rt.request_stop()
    rt.wait_stopped(5)
    hw.close()
    report = drive.report
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0 if report.get("ok") and not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
