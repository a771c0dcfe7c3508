"""The dispenser's HTTP client to the cloud: a requests Session, every request signed, every call with a
timeout, and the server's clock tracked from every response.

Errors are sorted into what to do about them:

* :class:`Transient`: timeouts, connection errors, 5xx, 429 (retry later; ``retry_after_s`` if the
  server said so);
* :class:`AuthProblem`: 401 (bad signature, clock skew, replayed nonce): fix the clock and retry, never
  give up on the message;
* :class:`Rejected`: any other 4xx: this message will never be accepted.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

import requests

import contract as p

log = logging.getLogger("tapshare.sync")


class SyncError(Exception):
    pass


class Transient(SyncError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuthProblem(SyncError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Rejected(SyncError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


class TooLarge(SyncError):
    """A download that goes on past the size it was announced with."""


MAX_RTT_FOR_TIME_MS = 2_000


class CloudClient:
    """Signed requests for one machine. Thread-safe (one Session per thread)."""

    def __init__(self, base_url: str, machine_id: str, secret: bytes, *, wall_ms: Callable[[], int],
                 mono_ms: Callable[[], int], timeout_s: float = 10.0) -> None:
        if len(secret) < p.MIN_SECRET_BYTES:
            raise ValueError("the device secret is too short")
        self.base_url, self.machine_id, self.secret = base_url.rstrip("/"), machine_id, secret
        self._wall, self._mono = wall_ms, mono_ms
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._offset_lock = threading.Lock()
        self.offset_ms: int | None = None          # server time minus local wall time; None until synced
        self.synced_at_mono_ms: int | None = None

    # ------------------------------------------------------------------ time
    def server_now_ms(self) -> int:
        """Our best idea of the server's (true) time."""
        return self._wall() + (self.offset_ms or 0)

    @property
    def time_synced(self) -> bool:
        return self.offset_ms is not None

    def _learn_time(self, server_time_ms: int, sent_wall: int, got_wall: int) -> None:
        """The server's clock was read somewhere between sending and receiving: trust the midpoint only when
        the round trip was short (a long-poll is held by the server, so its midpoint is far off)."""
        if got_wall - sent_wall > MAX_RTT_FOR_TIME_MS and self.offset_ms is not None:
            return
        offset = server_time_ms - (sent_wall + got_wall) // 2
        with self._offset_lock:
            if self.offset_ms is None or abs(offset - self.offset_ms) > 2_000:
                log.info("clock offset to the server: %+d ms", offset)
            self.offset_ms = offset
            self.synced_at_mono_ms = self._mono()

    def sync_time(self) -> int:
        """GET /device/v1/time (unsigned). Returns the offset in ms."""
        sent = self._wall()
        data = self._send("GET", "/device/v1/time", None, signed=False)
        self._learn_time(data["server_time_ms"], sent, self._wall())
        return self.offset_ms or 0

    # ------------------------------------------------------------------ requests
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def request(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None) -> dict:
        return self._send(method, path, body, timeout_s=timeout_s)

    def _send(self, method: str, path: str, body: Any, *, signed: bool = True, timeout_s: float | None = None
              ) -> dict:
        raw = b"" if body is None else json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if signed:
            headers.update(p.signed_headers(self.secret, self.machine_id, method, path, raw,
                                            timestamp_ms=self.server_now_ms(), nonce=secrets.token_hex(16)))
        sent = self._wall()
        try:
            r = self._session().request(method, self.base_url + path, data=raw, headers=headers,
                                        timeout=timeout_s or self.timeout_s)
        except requests.Timeout as e:
            raise Transient(f"{method} {path}: timed out") from e
        except requests.RequestException as e:
            raise Transient(f"{method} {path}: {type(e).__name__}") from e
        got = self._wall()
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 500 or r.status_code == 429:
            retry_after = r.headers.get("Retry-After")
            raise Transient(f"{method} {path}: {r.status_code}",
                            float(retry_after) if retry_after and retry_after.isdigit() else None)
        if not isinstance(data, dict):
            raise Transient(f"{method} {path}: {r.status_code} with an unreadable body")
        if "server_time_ms" in data and isinstance(data["server_time_ms"], int):
            self._learn_time(data["server_time_ms"], sent, got)
        if r.status_code == 401:
            code, message = str(data.get("error", "unauthenticated")), str(data.get("message", ""))
            if code == "clock_skew":
                log.error("the cloud says our clock is off: %s", message)
            else:
                log.error("the cloud rejected our credentials (%s): %s", code, message)
            raise AuthProblem(code, message)
        if r.status_code >= 400:
            raise Rejected(r.status_code, str(data.get("error", "rejected")), str(data.get("message", "")))
        return data

    # ------------------------------------------------------------------ the protocol
    def poll(self, wait_ms: int) -> list[p.CommandMsg]:
        data = self._send("GET", f"/device/v1/commands?wait_ms={wait_ms}", None, timeout_s=wait_ms / 1000 + 10)
        return [p.CommandMsg(**c) for c in data.get("commands", [])]

    def ack(self, command_id: str, ok: bool, reason: str = "", detail: str = "", *,
            timeout_s: float | None = None) -> p.AckResult:
        data = self._send("POST", f"/device/v1/commands/{command_id}/ack",
                          {"ok": ok, "reason": reason[:200], "detail": detail[:500]}, timeout_s=timeout_s)
        return p.AckResult(ok=bool(data.get("ok", True)), session_state=data.get("session_state"))

    def send_events(self, events: list[dict]) -> list[p.EventResult]:
        data = self._send("POST", "/device/v1/events", {"events": events})
        return [p.EventResult(**r) for r in data["results"]]

    def heartbeat(self, hb: p.HeartbeatMsg) -> p.MachineSettingsMsg | None:
        """Send telemetry; returns the machine's settings the cloud answers with (None from an older cloud)."""
        answer = self.heartbeat_answer(hb)
        return answer.settings if answer is not None else None

    def heartbeat_answer(self, hb: p.HeartbeatMsg) -> p.HeartbeatResponse | None:
        """Send telemetry; the cloud's whole answer (settings, and a release to install if it offers one), or
        None if it has no valid settings. An offer that is not valid is dropped, not the settings with it."""
        data = self._send("POST", "/device/v1/heartbeat", hb.model_dump())
        try:
            return p.HeartbeatResponse.model_validate(data)
        except ValueError:
            pass
        try:
            answer = p.HeartbeatResponse.model_validate({k: v for k, v in data.items() if k != "update"})
        except ValueError:
            log.warning("the heartbeat's answer has no valid machine settings")
            return None
        log.warning("the heartbeat's answer offers an update that is not valid: ignored")
        return answer

    def update_report(self, msg: p.UpdateReportMsg) -> None:
        self._send("POST", "/device/v1/update-report", msg.model_dump())

    def download(self, path: str, dest, *, max_bytes: int, timeout_s: float = 30.0) -> int:
        """GET a (signed) file into ``dest``, resuming after what ``dest`` already holds (Range), never past
        ``max_bytes`` (:class:`TooLarge`, the part kept so far left as it is). Returns the bytes ``dest`` holds."""
        have = dest.stat().st_size if dest.exists() else 0
        if have > max_bytes:
            dest.unlink()
            have = 0
        headers = p.signed_headers(self.secret, self.machine_id, "GET", path, b"",
                                   timestamp_ms=self.server_now_ms(), nonce=secrets.token_hex(16))
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            r = self._session().get(self.base_url + path, headers=headers, stream=True, timeout=timeout_s)
        except requests.RequestException as e:
            raise Transient(f"GET {path}: {type(e).__name__}") from e
        with r:
            if r.status_code == 416 and have == max_bytes:
                return have
            if r.status_code >= 500 or r.status_code == 429:
                raise Transient(f"GET {path}: {r.status_code}")
            if r.status_code >= 400:
                try:
                    data = r.json()
                except ValueError:
                    data = {}
                code, message = str(data.get("error", "rejected")), str(data.get("message", ""))
                if r.status_code == 401:
                    raise AuthProblem(code, message)
                raise Rejected(r.status_code, code, message)
            if r.status_code == 206:
                start = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                if start != str(have):
                    raise Transient(f"GET {path}: the server resumed at {start!r}, not {have}")
                mode = "ab"
            else:                                   # 200: the whole file again
                mode, have = "wb", 0
            try:
                with open(dest, mode) as fh:
                    for chunk in r.iter_content(1 << 16):
                        if have + len(chunk) > max_bytes:
                            raise TooLarge(f"GET {path}: more than the {max_bytes} bytes offered")
                        fh.write(chunk)
                        have += len(chunk)
            except requests.RequestException as e:
                raise Transient(f"GET {path}: {type(e).__name__} after {have} bytes") from e
        return have

    def progress(self, msg: p.ProgressMsg) -> None:
        self._send("POST", "/device/v1/progress", msg.model_dump(), timeout_s=2.0)


def enroll(base_url: str, machine_id: str, enrolment_token: str, timeout_s: float = 15.0) -> bytes:
    """Exchange a single-use enrolment token for this machine's secret."""
    try:
        r = requests.post(base_url.rstrip("/") + "/device/v1/enroll", timeout=timeout_s,
                          json={"machine_id": machine_id, "enrolment_token": enrolment_token})
    except requests.RequestException as e:
        raise Transient(f"cannot reach {base_url}: {type(e).__name__}") from e
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code != 200:
        raise Rejected(r.status_code, str(data.get("error", "rejected")), str(data.get("message", r.text[:200])))
    return bytes.fromhex(data["secret_hex"])
