"""The kiosk touched as people touch it: real X pointer events (xdotool) into the real window of the one-command
system (``main.py --simulate --embedded-cloud``) under Xvfb. Where to touch comes from the app's widget map
(``TAPSHARE_UI_MAP``: every touchable widget's rectangle in window pixels), never from calling the app.

A tap on the machine number once killed the kiosk (and the embedded cloud with it). Here: taps and long
presses on it, the PIN entered by taps, and a "monkey" pass that taps every widget of every screen it reaches,
in both layouts; the process must stay alive with no traceback in its log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.xvfb import RunningSystem, Xvfb

ROOT = Path(__file__).resolve().parent.parent
PIN = "482913"
SHOTS = ROOT / "tests" / "screenshots" / "touch"


class Screen:
    """The kiosk's window on an X server, touched with xdotool."""

    def __init__(self, x: Xvfb, map_path: Path, proc) -> None:
        self.x, self.map_path, self.proc = x, map_path, proc
        self.left = self.top = 0
        self.contrast: list[str] = []
        self.upside_down = False                # [screen] rotation_deg = 180: the picture is turned, and so are taps

    def find_window(self) -> None:
        """Where the window is, from the X server (xdotool), once the app has drawn its first screen (its widget
        map): not from the picture, whose edges may be as dark as Xvfb's empty screen."""
        from PIL import ImageGrab
        deadline = time.monotonic() + 60
        geometry: dict[str, str] = {}
        m = None
        while time.monotonic() < deadline:
            m = self.map()
            found = subprocess.run(["xdotool", "search", "--pid", str(self.proc.pid)], env=self.x.env(),
                                   capture_output=True, text=True, timeout=10).stdout.split()
            if found:                                       # the process's window (SDL names its pid on it)
                shell = subprocess.run(["xdotool", "getwindowgeometry", "--shell", found[0]], env=self.x.env(),
                                       capture_output=True, text=True, timeout=10).stdout
                geometry = dict(line.split("=", 1) for line in shell.split() if "=" in line)
            if m and geometry and [int(geometry["WIDTH"]), int(geometry["HEIGHT"])] == list(m["window"]):
                self.left, self.top = int(geometry["X"]), int(geometry["Y"])
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        SHOTS.mkdir(parents=True, exist_ok=True)
        ImageGrab.grab(xdisplay=self.x.display).save(SHOTS / "window-not-found.png")
        raise AssertionError(f"the kiosk window did not appear: X says {geometry or 'no window'}, the app's map says "
                             f"{m and m.get('window')}, the app {'exited' if self.proc.poll() is not None else 'runs'}"
                             f" (the screen: {SHOTS / 'window-not-found.png'})")

    def map(self) -> dict | None:
        try:
            return json.loads(self.map_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def wait(self, pred, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        m = None
        while time.monotonic() < deadline:
            m = self.map()
            if m and pred(m):
                return m
            assert self.proc.poll() is None, "the kiosk process died"
            time.sleep(0.1)
        raise AssertionError(f"the screen did not get there; last map: {m and (m['screen'], m['state'])}")

    def widget(self, pred) -> dict:
        m = self.map()
        found = [w for w in m["widgets"] if pred(w)]
        assert found, f"no such widget on {m['screen']}: {[(w['id'], w['text']) for w in m['widgets']]}"
        return found[0]

    def _xdo(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env=self.x.env(), check=True, timeout=10)

    def _center(self, w: dict) -> tuple[str, str]:
        x, y = w["x"] + w["w"] // 2, w["y"] + w["h"] // 2
        if self.upside_down:                    # where the widget is drawn on the glass
            width, height = self.map()["window"]
            x, y = width - 1 - x, height - 1 - y
        return str(self.left + x), str(self.top + y)

    def tap(self, w: dict) -> None:
        self._xdo("mousemove", *self._center(w), "click", "1")
        time.sleep(0.15)

    def long_press(self, w: dict, seconds: float = 2.6) -> None:
        self._xdo("mousemove", *self._center(w), "mousedown", "1")
        time.sleep(seconds)
        self._xdo("mouseup", "1")

    def type_number(self, field: dict, digits: str, shot: str = "") -> None:
        """Tap the field, then the keypad's keys (C first), then OK."""
        self.tap(field)
        self.wait(lambda m: m["overlay"] and any(w["text"] == "C" for w in m["widgets"]))
        if shot:
            self.shot(shot)
            self.audit_contrast("keypad")
        for key in ("C", *digits):
            self.tap(self.widget(lambda w, k=key: w["button"] and w["text"] == k))
        self.tap(self.widget(lambda w: w["button"] and w["text"] in ("确定", "OK")))
        self.wait(lambda m: not m["overlay"])
        assert self.widget(lambda w: w["id"] == field["id"])["text"] == digits

    def audit_contrast(self, where: str) -> None:
        """WCAG contrast of every text on screen, measured in the pixels: the text's colour against the colour
        around it, at least 4.5:1 for small text and 3:1 for large (24 px, or 18.7 px bold)."""
        from PIL import ImageGrab
        time.sleep(0.3)
        img = ImageGrab.grab(xdisplay=self.x.display).convert("RGB")
        m = self.map()
        for t in m.get("texts", []):
            if t["disabled"]:
                continue                       # WCAG exempts inactive controls
            box = (self.left + t["x"], self.top + t["y"], self.left + t["x"] + t["w"], self.top + t["y"] + t["h"])
            ratio = text_contrast(img.crop(box))
            need = 3.0 if t["font_px"] >= 24 or (t["bold"] and t["font_px"] >= 18.66) else 4.5
            if ratio is not None and ratio < need:
                self.contrast.append(f"{where}/{m['lang']}: {t['text']!r} {ratio:.2f}:1 < {need}:1 "
                                     f"({t['font_px']} px{' bold' if t['bold'] else ''})")

    def shot(self, name: str) -> None:
        from PIL import ImageGrab
        img = ImageGrab.grab(xdisplay=self.x.display)
        m = self.map()
        box = (self.left, self.top, self.left + m["window"][0], self.top + m["window"][1])
        SHOTS.mkdir(parents=True, exist_ok=True)
        img.crop(box).save(SHOTS / f"{name}.png")


def _luminance(rgb: tuple[int, int, int]) -> float:
    def lin(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a, b) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_contrast(crop) -> float | None:
    """The background is the commonest colour of the text's box; the text's colour is the one (among colours
    covering enough pixels to be glyph strokes, not anti-aliasing) that stands out most from it."""
    colors = sorted(crop.getcolors(maxcolors=crop.width * crop.height) or [], reverse=True)
    if len(colors) < 2:
        return None
    total = sum(n for n, _ in colors)
    bg = colors[0][1]
    strokes = [rgb for n, rgb in colors[1:] if n >= max(6, total * 0.003)]
    return max((contrast_ratio(rgb, bg) for rgb in strokes), default=None)


def _count(ledger: Path, kind: str) -> int:
    import sqlite3
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5) as db:
        return db.execute("SELECT count(*) FROM events WHERE kind = ?", [kind]).fetchone()[0]


def _need_tools() -> None:
    for tool in ("Xvfb", "xdotool"):
        if shutil.which(tool) is None:
            if os.environ.get("TAPSHARE_TEST_ALL"):
                pytest.fail(f"test.sh set up everything, yet {tool} is missing (see scripts/test-setup.sh)")
            pytest.skip(f"no {tool}")


def _set_pin(data: Path) -> None:
    env = {**os.environ, "TAPSHARE_MAINTENANCE_PIN": PIN}
    set_pin = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data-dir", str(data), "--set-maintenance-pin"],
                             env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert set_pin.returncode == 0, set_pin.stderr


def _open_maintenance_by_taps(s: Screen, system, layout: str, log: Path) -> str:
    """Taps on the machine number do nothing; a long press opens the PIN pad, the PIN entered by taps opens
    maintenance. Returns the language the screen was in."""
    s.wait(lambda m: m["screen"] == "idle" and any(w["id"] == "machine" for w in m["widgets"]))
    machine = s.widget(lambda w: w["id"] == "machine")
    s.audit_contrast("idle")
    if layout.startswith("landscape"):         # one layout in each language: the landscape run is in English
        s.tap(s.widget(lambda w: w["type"] == "LangButton"))
        s.wait(lambda m: m["lang"] == "en")
        s.audit_contrast("idle")
    lang = s.map()["lang"]
    # taps on the machine number: nothing happens, nothing breaks
    for _ in range(5):
        s.tap(machine)
    time.sleep(0.5)
    assert s.map()["screen"] == "idle" and system.proc.poll() is None
    # a long press opens the PIN pad; the PIN entered by taps opens maintenance
    s.long_press(machine)
    s.wait(lambda m: m["screen"] == "pin_pad")
    assert s.map()["lang"] == lang
    s.shot(f"{layout}-pin-pad")
    s.audit_contrast("pin_pad")
    for digit in PIN:
        s.tap(s.widget(lambda w, d=digit: w["button"] and w["text"] == d))
    s.tap(s.widget(lambda w: w["button"] and w["text"] in ("确定", "OK")))
    try:
        s.wait(lambda m: m["screen"] == "maintenance", timeout=15)
    finally:
        log.write_text(system.output)
    return lang


def _calibrate_by_taps(s: Screen, ledger: Path, layout: str, lang: str) -> None:
    """A calibration done by taps alone: the numbers through the on-screen keypad, three pours, accept."""
    s.tap(s.widget(lambda w: w["type"] == "NavButton" and w["key"] == "calibrate"))
    for n in range(1, 4):
        s.type_number(s.widget(lambda w: w["id"] == "cal_target"), "120",
                      shot=f"{layout}-keypad" if n == 1 else "")
        s.tap(s.widget(lambda w: w["id"] == "cal_pour"))
        deadline = time.monotonic() + 30
        while _count(ledger, "tech_pour") < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _count(ledger, "tech_pour") == n, "the calibration pour did not finish"
        s.type_number(s.widget(lambda w: w["id"] == "cal_measured"), "121")
        s.tap(s.widget(lambda w: w["id"] == "cal_record"))
        recorded = f"已记录 {n} 次" if lang == "zh" else f"{n} pours recorded"
        s.wait(lambda m, r=recorded: any(w["id"] == "cal_status" and w["text"].startswith(r)
                                         for w in m["widgets"]))
    s.tap(s.widget(lambda w: w["id"] == "cal_accept"))
    deadline = time.monotonic() + 10
    while _count(ledger, "calibration_changed") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _count(ledger, "calibration_changed") == 1
    s.shot(f"{layout}-calibration-accepted")


def _tap_every_maintenance_button(s: Screen, system, log: Path) -> None:
    """The monkey: every button of the maintenance screen, section by section (each section's own buttons too)."""
    sections = [w for w in s.map()["widgets"] if w["type"] == "NavButton"]
    assert len(sections) == 7
    tapped = 0
    for tab in sections:
        s.tap(tab)
        time.sleep(0.4)
        s.audit_contrast(f"maintenance-{tab['key']}")
        for w in s.map()["widgets"]:
            if not w["button"] or w["type"] == "NavButton" or w["id"] == "exit":
                continue
            if s.map()["screen"] != "maintenance":
                break
            s.tap(w)
            tapped += 1
        if system.proc.poll() is not None:
            log.write_text(system.output)
            raise AssertionError(f"the kiosk died after tapping in {tab['key']}: {system.output[-3000:]}")
        if s.map()["screen"] != "maintenance":
            break
    assert tapped >= 10, json.dumps(s.map(), ensure_ascii=False)[:3000]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["landscape_800x480", "portrait_720x1280"])
def test_touching_the_kiosk_never_kills_it_and_opens_maintenance(tmp_path, layout):
    _need_tools()
    data = tmp_path / "data"
    _set_pin(data)
    cfg = tmp_path / "kiosk.toml"
    cfg.write_text(f'[screen]\nlayout = "{layout}"\n')
    map_path = tmp_path / "ui-map.json"
    log = tmp_path / "kiosk.log"
    with Xvfb(1280, 1400) as x, RunningSystem(x.env(KIVY_HOME=str(tmp_path / "kivy"), TAPSHARE_UI_MAP=str(map_path)),
                                              data, args=("--config", str(cfg))) as system:
        s = Screen(x, map_path, system.proc)
        s.find_window()
        lang = _open_maintenance_by_taps(s, system, layout, log)
        _calibrate_by_taps(s, data / "ledger.db", layout, lang)
        _tap_every_maintenance_button(s, system, log)
        s.shot(f"{layout}-after-monkey")
    log.write_text(system.output)
    assert s.contrast == [], "\n".join(s.contrast)
    assert "Traceback" not in system.output, system.output[-5000:]
    assert system.rc == 0, system.output[-3000:]


def test_an_upside_down_screen_takes_taps_where_it_draws(tmp_path):
    """The official 7-inch display mounted upside down: ``rotation_deg = 180`` turns the picture, and a tap on
    the glass where a button is drawn must reach that button (Kivy turns the touches with the picture)."""
    _need_tools()
    data = tmp_path / "data"
    _set_pin(data)
    cfg = tmp_path / "kiosk.toml"
    cfg.write_text('[screen]\nlayout = "landscape_800x480"\nrotation_deg = 180\n')
    map_path = tmp_path / "ui-map.json"
    with Xvfb(1280, 1400) as x, RunningSystem(x.env(KIVY_HOME=str(tmp_path / "kivy"), TAPSHARE_UI_MAP=str(map_path)),
                                              data, args=("--config", str(cfg))) as system:
        s = Screen(x, map_path, system.proc)
        s.find_window()
        s.upside_down = True
        s.wait(lambda m: m["screen"] == "idle" and any(w["id"] == "machine" for w in m["widgets"]))
        assert s.map()["lang"] == "zh"
        s.tap(s.widget(lambda w: w["type"] == "LangButton"))
        s.wait(lambda m: m["lang"] == "en")
        s.shot("landscape-upside-down-en")
        s.long_press(s.widget(lambda w: w["id"] == "machine"))
        s.wait(lambda m: m["screen"] == "pin_pad")
        for digit in PIN:
            s.tap(s.widget(lambda w, d=digit: w["button"] and w["text"] == d))
        s.tap(s.widget(lambda w: w["button"] and w["text"] in ("确定", "OK")))
        s.wait(lambda m: m["screen"] == "maintenance", timeout=15)
    assert "Traceback" not in system.output, system.output[-5000:]
    assert system.rc == 0, system.output[-3000:]
