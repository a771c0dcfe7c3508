"""The whole method, s1-s7, through real parts: the one-command system (`main.py --simulate --embedded-cloud`:
the cloud, the kiosk's Kivy window under Xvfb, simulated hardware), the QR code decoded from a grab of the
kiosk's screen with a real decoder (zxing-cpp), headless Chromium as the phone, and the simulated stop
button pressed with a real key event (xdotool). Screenshots of each step in tests/screenshots/e2e/."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.cloudkit import id_photo, resident_id
from tests.test_phone_pages import CHROMIUM, PHONE
from tests.util import wait_until
from tests.xvfb import RunningSystem, Xvfb

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(__file__).parent / "screenshots" / "e2e"


def window_box(img) -> tuple[int, int, int, int] | None:
    """Where the kiosk's window is on the X screen: without a window manager SDL places it, and the rest of
    Xvfb's screen is black."""
    return img.convert("L").point(lambda v: 255 if v > 20 else 0).getbbox()


def grab(display: str, name: str | None = None):
    from PIL import ImageGrab
    img = ImageGrab.grab(xdisplay=display)
    box = window_box(img)
    if box:
        img = img.crop(box)
    if name:
        SHOTS.mkdir(parents=True, exist_ok=True)
        img.save(SHOTS / f"{name}.png")
    return img


def decode_qr(img) -> str:
    import zxingcpp
    codes = [c.text for c in zxingcpp.read_barcodes(img) if c.format == zxingcpp.BarcodeFormat.QRCode]
    assert len(codes) == 1, codes
    return codes[0]


@pytest.mark.slow
def test_scan_register_top_up_pour_stop_bill_points_and_record(tmp_path):
    skip_without_xvfb_xdotool_or_chromium()
    from playwright.sync_api import sync_playwright

    from cloud.__main__ import create_operator
    with Xvfb(1280, 800) as x:
        env = x.env(KIVY_HOME=str(tmp_path / "kivy"))
        with RunningSystem(env, tmp_path / "data") as system:
            base, machine, data = system.base, system.machine, system.data_dir
            admin = create_operator(f"sqlite:///{data / 'cloud' / 'cloud.db'}", "e2e-admin", "admin")
            op = {"Authorization": f"Bearer {admin}"}
            gift = add_a_gift(base, op)
            url = read_the_qr_code_off_the_kiosk_screen(x, base, machine)           # s1

            with sync_playwright() as pw:
                browser = launch_chromium(pw)
                page = browser.new_page(viewport=PHONE, locale="zh-CN")
                scan_with_the_phone(page, url)
                log_in_and_register_with_an_id_photo(page, tmp_path)               # s4
                top_up_in_the_sandbox(page)                                         # s5
                start_and_watch_the_kiosk_pour(page, x)                             # s2, s3
                press_stop_on_the_kiosk(x, env)                                     # s6
                check_the_bill(page, x)
                redeem_a_gift_with_the_points(page, gift)
                browser.close()

            check_the_rental_record(base, op, machine)                              # s7
        assert system.rc == 0, system.output[-3000:]


def skip_without_xvfb_xdotool_or_chromium() -> None:
    for tool in ("Xvfb", "xdotool"):
        if shutil.which(tool) is None:
            if os.environ.get("TAPSHARE_TEST_ALL"):
                pytest.fail(f"test.sh set up everything, yet {tool} is missing (see scripts/test-setup.sh)")
            pytest.skip(f"no {tool}")
    if not CHROMIUM:
        pytest.skip("no chromium")


def add_a_gift(base: str, op: dict) -> dict:
    return requests.post(base + "/api/v1/operator/gifts", headers=op, timeout=10, json={
        "name_zh": "环保水杯", "name_en": "Reusable cup", "points_cost": 1, "stock": 10}).json()


def read_the_qr_code_off_the_kiosk_screen(x, base: str, machine: str) -> str:
    """The QR code as the kiosk draws it, read by a real decoder from a grab of the screen."""
    assert wait_until(lambda: decode_ok(x.display), timeout_s=30), f"no QR on the kiosk ({LAST_ERROR})"
    url = decode_qr(grab(x.display, "01-kiosk-idle"))
    assert url.startswith(f"{base}/m/{machine}?c=")
    return url


def launch_chromium(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"])


def scan_with_the_phone(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#go-login")
    page.screenshot(path=str(SHOTS / "02-phone-scanned.png"), full_page=True)


def log_in_and_register_with_an_id_photo(page, tmp_path) -> None:
    """Told to register: logs in with the SMS code, consents, registers with an ID photo."""
    page.click("#go-login")
    page.fill("#phone", "13600136000")
    page.click("label[for=agree-terms]")
    page.click("#send")
    page.wait_for_selector("#sms-list .sms")
    page.fill("#code", re.search(r"\d{6}", page.inner_text("#sms-list .sms")).group(0))
    page.click("#login")
    page.wait_for_selector("#go-register")
    page.click("#go-register")
    page.click("#agree")
    page.wait_for_selector("#submit")
    page.fill("#name", "赵六")
    page.fill("#docnum", resident_id(42))
    photo = tmp_path / "id.jpg"
    photo.write_bytes(id_photo())
    page.set_input_files("#photo", str(photo))
    page.click("#submit")


def top_up_in_the_sandbox(page) -> None:
    """No balance: told to top up; tops up in the sandbox."""
    page.wait_for_selector("#start[disabled]")
    page.wait_for_selector("#start-why:has-text('余额不足')")
    page.screenshot(path=str(SHOTS / "03-phone-top-up-first.png"), full_page=True)
    page.click("#nav-wallet")
    page.click("button.amt[data-fen='2000']")
    page.click("#pay")
    page.wait_for_selector("#paid", timeout=15_000)


def start_and_watch_the_kiosk_pour(page, x) -> None:
    """Start; the kiosk's valve opens and its screen shows volume and cost."""
    page.click("#continue")
    page.wait_for_selector("#start:not([disabled])")
    page.click("#start")
    page.wait_for_function("() => Number(document.querySelector('#vol')?.textContent) > 0.6",
                           timeout=30_000)
    page.screenshot(path=str(SHOTS / "04-phone-pouring.png"), full_page=True)
    grab(x.display, "05-kiosk-dispensing")


def press_stop_on_the_kiosk(x, env) -> None:
    """The machine's (simulated) stop button, pressed with a real key event in its window."""
    from PIL import ImageGrab
    left, top, right, bottom = window_box(ImageGrab.grab(xdisplay=x.display))
    subprocess.run(["xdotool", "mousemove", str((left + right) // 2), str((top + bottom) // 2), "key", "s"],
                   env=env, check=True, timeout=10)


def check_the_bill(page, x) -> None:
    """The kiosk shows its receipt; the phone's bill has the water quality, temperature and why it stopped."""
    page.wait_for_selector("#bill", timeout=20_000)
    grab(x.display, "06-kiosk-receipt")
    page.screenshot(path=str(SHOTS / "07-phone-bill.png"), full_page=True)
    bill_text = page.inner_text("#bill")
    assert "ppm" in bill_text and "°C" in bill_text and "按下停止按钮" in bill_text


def redeem_a_gift_with_the_points(page, gift: dict) -> None:
    """Growth points, and a gift redeemed with them."""
    page.click("#nav-points")
    page.wait_for_selector("#points")
    assert int(page.inner_text("#points")) >= 1
    page.click(f"button.redeem[data-gift='{gift['gift_id']}']")
    page.click("#confirm-redeem")
    page.wait_for_selector("#pickup-code")
    page.wait_for_selector("#redemptions li")
    page.screenshot(path=str(SHOTS / "08-phone-points.png"), full_page=True)


def check_the_rental_record(base: str, op: dict, machine: str) -> None:
    """The cloud's rental record: flow data, temperatures, valve states."""
    recs = requests.get(base + "/api/v1/operator/records", headers=op, params={"machine_id": machine},
                        timeout=10).json()["records"]
    assert len(recs) == 1
    rec = recs[0]["record"]
    assert rec["reason"] == "stop_button" and rec["billed_pulses"] > 0
    assert len(rec["flow_series"]) >= 3 and rec["temp_start_c"] is not None
    assert [v[1] for v in rec["valve_events"]][:2] == ["open", "close"]


LAST_ERROR: list[str] = []


def decode_ok(display: str) -> bool:
    try:
        import zxingcpp
        time.sleep(0.5)                  # grabbing and decoding is heavy: leave the kiosk time to draw
        return bool(zxingcpp.read_barcodes(grab(display)))
    except Exception as e:
        LAST_ERROR[:] = [repr(e)]
        return False
