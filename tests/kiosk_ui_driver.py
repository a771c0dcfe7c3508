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
        inside = p is None or p is root or not hasattr(p, "pos") or hasattr(p, "manager") or p.height <= 1 or (
            p.y - 2 <= w.y and w.top <= p.top + 2 and p.x - 2 <= w.x and w.right <= p.right + 2)
        if not inside:
            out.append(f"{name}: outside its container ({w.x:.0f},{w.y:.0f},{w.width:.0f}x{w.height:.0f} "
                       f"in {p.x:.0f},{p.y:.0f},{p.width:.0f}x{p.height:.0f})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="landscape_800x480")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    cfg = simulated_config(Config().replace(paths={"data_dir": str(tmp / "data")}, machine={"id": "SIM-001"},
                                            screen={"layout": args.layout, "receipt_display_ms": 60_000}))
    configure_window(cfg.screen.layout, fullscreen=False, simulate=True)
    clock = SystemClock()
    hw, rt, _ = simulated_dispenser(cfg, clock, tmp / "sim")
    threading.Thread(target=rt.run, daemon=True).start()
    hw.start()
    rt.post(LinkChanged(True))
    from kiosk.ui.app import build_app
    app = build_app(rt, layout=cfg.screen.layout, language="zh", receipt_display_ms=60_000,
                    qr_url=lambda: "http://127.0.0.1:8700/m/SIM-001?c=123456", sim_world=hw.world,
                    phone_link="http://127.0.0.1:8700/dev/qr/SIM-001")
    report: dict = {"shots": [], "problems": [], "states": []}

    def wait(pred, timeout=10.0):
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

    def shoot(name: str) -> None:
        from kivy.core.window import Window
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
            report["shots"].append(str(path))
            report["problems"] += [f"{name}-{lang}: {p}" for p in problems]
            report["states"].append([name, lang, rt.snapshot.state.value, app.manager.current])
        on_kivy(lambda: setattr(app, "lang", "zh"))

    def script() -> None:
        try:
            assert wait(lambda: app.root is not None and rt.snapshot.state is State.IDLE)
            t0 = time.monotonic()
            assert wait(lambda: on_kivy(lambda: app.manager.get_screen("idle").qr_texture is not None))
            report["first_qr_s"] = time.monotonic() - t0
            shoot("idle")
            hw.world.water.set_flow(5_000)
            rt.post(GrantReceived(Grant(session_id="ui-1", machine_id="SIM-001", user_ref="u", price_fen_per_l=200,
                                        credit_limit_fen=500, max_volume_ml=5_000, max_duration_ms=120_000,
                                        max_idle_ms=15_000, expires_at_ms=clock.monotonic_ms() + 30_000)))
            assert wait(lambda: rt.snapshot.state is State.DISPENSING and rt.snapshot.volume_ml > 150)
            shoot("dispensing")
            hw.world.press_stop()
            assert wait(lambda: rt.snapshot.state is State.RECEIPT)
            shoot("receipt")
            on_kivy(app.dismiss_receipt)
            assert wait(lambda: rt.snapshot.state is State.IDLE)
            rt.post(LinkChanged(False))
            assert wait(lambda: rt.snapshot.state is State.OFFLINE)
            shoot("offline")
            rt.post(LinkChanged(True))
            assert wait(lambda: rt.snapshot.state is State.IDLE)
            rt.post(EnterMaintenance(actor="test"))
            assert wait(lambda: rt.snapshot.state is State.MAINTENANCE)
            shoot("maintenance")
            rt.post(ExitMaintenance(actor="test"))
            assert wait(lambda: rt.snapshot.state is State.IDLE)
            hw.world.set_leak(True)
            assert wait(lambda: rt.snapshot.state is State.OUT_OF_SERVICE)
            shoot("out_of_service")
            report["ok"] = True
        except Exception as e:
            import traceback
            report["error"] = f"{e!r}\n{traceback.format_exc()}"
        finally:
            on_kivy(app.stop)

    threading.Thread(target=script, daemon=True).start()
    app.run()
    rt.request_stop()
    rt.wait_stopped(5)
    hw.close()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0 if report.get("ok") and not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
