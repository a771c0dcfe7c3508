"""A real cloud server on loopback (uvicorn in a thread) and a signed device client, for tests and benches."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

import contract as p
from cloud.__main__ import create_operator
from cloud.accounts.service import CONSENT_VERSION
from cloud.app import CloudSettings, create_app
from cloud.server import GracefulServer, server_config

PG_URL = os.environ.get("TAPSHARE_TEST_POSTGRES_URL", "")
RUNNING: list[CloudServer] = []         # the clouds now serving (a stopping dispenser asks them to answer its poll)


class _Server(GracefulServer):
    """The cloud's own server, looking at ``should_exit`` every 10 ms instead of uvicorn's 100 ms: the suite stops
    hundreds of servers, each after waiting for the next look. How it stops (held long-polls answered first) is
    GracefulServer's, unchanged."""

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            await asyncio.sleep(0.01)
            should_exit = await self.on_tick(counter)


class CloudServer:
    def __init__(self, data_dir: Path, database_url: str = "", **settings) -> None:
        self.settings = CloudSettings(database_url=database_url, data_dir=data_dir, background_interval_s=0.1,
                                      **settings)
        self._given = set(settings)
        self.http = requests.Session()       # one browser: it keeps the development SMS inbox's cookie
        self.app = create_app(self.settings)
        self.server = _Server(server_config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                            header_timeout_s=self.settings.header_timeout_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> CloudServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the cloud server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if "public_url" not in self._given:
            self.settings.public_url = self.url          # what phones and payment notifications are sent to
        self.admin = create_operator(self.settings.url(), f"admin-{secrets.token_hex(3)}", "admin")
        RUNNING.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        self.server.stop()
        self.thread.join(10)

    def op(self, method: str, path: str, token: str | None = None, headers: dict | None = None,
           **kw) -> requests.Response:
        return requests.request(method, self.url + path, timeout=10,
                                headers={"Authorization": f"Bearer {token or self.admin}", **(headers or {})}, **kw)

    def provision(self, machine_id: str, price: int = 200, **limits) -> DeviceClient:
        r = self.op("POST", "/api/v1/operator/machines",
                    json={"machine_id": machine_id, "location": "Lobby", "price_fen_per_l": price, **limits})
        assert r.status_code == 200, r.text
        e = requests.post(self.url + "/device/v1/enroll", timeout=10,
                          json={"machine_id": machine_id, "enrolment_token": r.json()["enrolment_token"]})
        assert e.status_code == 200, e.text
        return DeviceClient(self.url, machine_id, bytes.fromhex(e.json()["secret_hex"]))

    def user(self, phone: str, balance_fen: int = 1_000, registered: bool = True) -> UserClient:
        r = self.op("POST", "/api/v1/dev/users", json={"phone": phone, "balance_fen": balance_fen,
                                                       "registered": registered})
        assert r.status_code == 200, r.text
        return UserClient(self.url, r.json()["token"], r.json()["user_id"])


    def sms_code(self, phone: str) -> str:
        """The newest code the development SMS sink holds for ``phone`` (read like the demo page does)."""
        r = self.http.get(self.url + "/api/v1/dev/sms", params={"phone": phone}, timeout=10)
        assert r.status_code == 200, r.text
        return re.search(r"(\d{6})", r.json()["messages"][0]["text"]).group(1)

    def login(self, phone: str) -> UserClient:
        """A real SMS login (development sink)."""
        r = self.http.post(self.url + "/api/v1/auth/sms-code", json={"phone": phone}, timeout=10)
        assert r.status_code == 200, r.text
        r = requests.post(self.url + "/api/v1/auth/login", json={"phone": phone, "code": self.sms_code(phone)},
                          timeout=10)
        assert r.status_code == 200, r.text
        return UserClient(self.url, r.json()["token"], r.json()["user_id"])

    def signup(self, phone: str, id_number: str | None = None, name: str = "张三") -> UserClient:
        """Login, consent, ID photo and real-name registration, as the phone pages do."""
        user = self.login(phone)
        assert user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True}).ok
        photo = user.call("PUT", "/api/v1/me/id-photo", data=id_photo(), headers={"Content-Type": "image/jpeg"})
        assert photo.status_code == 200, photo.text
        r = user.call("POST", "/api/v1/me/registration", json={
            "legal_name": name, "doc_type": "resident_id", "doc_number": id_number or resident_id(),
            "photo_id": photo.json()["photo_id"]})
        assert r.status_code == 200, r.text
        return user


def resident_id(seed: int | None = None, birth: str = "19900307") -> str:
    """A resident ID number with a correct GB 11643 check digit (Beijing Chaoyang, a made-up sequence)."""
    from cloud.accounts.identity import check_digit
    seq = seed if seed is not None else secrets.randbelow(1000)
    first17 = f"110105{birth}{seq % 1000:03d}"
    return first17 + check_digit(first17)


def id_photo(width: int = 900, height: int = 570, fmt: str = "JPEG", exif: bool = True) -> bytes:
    """A picture of a (fake) ID card, with EXIF (camera, GPS-like comment) unless exif=False."""
    import io

    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (220, 232, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 40, width - 40, height - 40), outline=(30, 60, 120), width=6)
    draw.text((80, 80), "RESIDENT IDENTITY CARD (TEST)", fill=(20, 20, 20))
    out = io.BytesIO()
    kwargs = {}
    if exif and fmt == "JPEG":
        ex = Image.Exif()
        ex[0x010F] = "SecretCam"          # Make
        ex[0x9286] = "taken at 39.9N 116.4E"   # UserComment
        kwargs["exif"] = ex.tobytes()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


class DeviceClient:
    """Signs every request like a dispenser does."""

    def __init__(self, base: str, machine_id: str, secret: bytes, clock_offset_ms: int = 0) -> None:
        self.base, self.machine_id, self.secret, self.offset = base, machine_id, secret, clock_offset_ms
        self.http = requests.Session()

    def request(self, method: str, path: str, body: dict | None = None, *, nonce: str | None = None,
                timeout: float = 10, secret: bytes | None = None, headers: dict | None = None) -> requests.Response:
        raw = json.dumps(body).encode() if body is not None else b""
        headers = {**(headers or {}), **p.signed_headers(secret or self.secret, self.machine_id, method, path, raw,
                                                         timestamp_ms=time.time_ns() // 1_000_000 + self.offset,
                                                         nonce=nonce or secrets.token_hex(16))}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return self.http.request(method, self.base + path, data=raw, headers=headers, timeout=timeout)

    def poll(self, wait_ms: int = 0, timeout: float = 35) -> list[dict]:
        r = self.request("GET", f"/device/v1/commands?wait_ms={wait_ms}", timeout=timeout)
        assert r.status_code == 200, r.text
        return r.json()["commands"]

    def ack(self, command_id: str, ok: bool = True, reason: str = "") -> requests.Response:
        return self.request("POST", f"/device/v1/commands/{command_id}/ack", {"ok": ok, "reason": reason})

    def qr(self) -> str:
        return p.qr_code(self.secret, self.machine_id, time.time_ns() // 1_000_000_000)

    def report_end(self, event_id: str, session_id: str, billed_pulses: int, price: int = 200,
                   reason: str = "stop_button", **extra) -> requests.Response:
        payload = {"event_id": event_id, "kind": "session_ended", "machine_id": self.machine_id, "boot_id": 1,
                   "created_at": "2026-11-25T10:00:21.000Z", "user_ref": "u-test",
                   "session_id": session_id, "reason": reason, "started_at": "2026-11-25T10:00:00.000Z",
                   "closed_at": "2026-11-25T10:00:20.000Z", "ended_at": "2026-11-25T10:00:21.000Z",
                   "duration_ms": 20_000, "price_fen_per_l": price, "credit_limit_fen": 1_000, "min_dispense_ml": 10,
                   "milli_pulses_per_litre": 450_000, "billed_pulses": billed_pulses, "overrun_pulses": 2,
                   "volume_ml": p.volume_ml(billed_pulses, 450_000),
                   "cost_fen": p.fee_fen(billed_pulses, 450_000, price), "temp_start_c": 12.0, "temp_end_c": 12.5,
                   "water_quality": {"tds_ppm": 80, "tds_measured": True, "tds_limit_ppm": 500},
                   "flow_series": [[0, 0, 0, 12.0, True], [1000, 40, 0, 12.0, True]],
                   "valve_events": [[0, "open"], [20000, "close", reason]], **extra}
        # a machine with a right clock that wrote this report at created_at says how old it is
        created = datetime.fromisoformat(payload["created_at"].replace("Z", "+00:00")).timestamp() * 1000
        age_ms = max(0, int(time.time() * 1000 + self.offset - created))
        return self.request("POST", "/device/v1/events", {"events": [
            {"event_id": event_id, "kind": "session_ended", "payload": payload, "age_ms": age_ms}]})

    def event(self, event_id: str, kind: str, detail: dict | None = None) -> dict:
        """One outbox event as a machine sends it (the envelope the ledger adds, the event log's detail)."""
        return {"event_id": event_id, "kind": kind, "payload": {
            "event_id": event_id, "kind": kind, "machine_id": self.machine_id, "boot_id": 1,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "detail": BOOT_DETAIL if detail is None and kind == "boot" else detail or {}}}

    def heartbeat(self, **fields) -> requests.Response:
        body = {"state": "idle", "valve_open": False, **fields}
        return self.request("POST", "/device/v1/heartbeat", body)


BOOT_DETAIL = {"version": p.SOFTWARE_VERSION, "boot_id": 1, "recovered_sessions": [], "totalizer_pulses": 0}


class UserClient:
    def __init__(self, base: str, token: str, user_id: str) -> None:
        self.base, self.token, self.user_id = base, token, user_id

    def call(self, method: str, path: str, headers: dict | None = None, **kw) -> requests.Response:
        return requests.request(method, self.base + path, timeout=10,
                                headers={"Authorization": f"Bearer {self.token}", **(headers or {})}, **kw)

    def scan(self, machine_id: str, code: str) -> requests.Response:
        return self.call("GET", "/api/v1/scan", params={"machine": machine_id, "c": code})

    def start(self, presence: str, price: int = 200) -> requests.Response:
        return self.call("POST", "/api/v1/sessions", json={"presence_token": presence,
                                                           "expected_price_fen_per_l": price})

    def me(self) -> dict:
        return self.call("GET", "/api/v1/me").json()
