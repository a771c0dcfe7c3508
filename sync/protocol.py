"""The dispenser-cloud protocol, in one pure module both sides import (no requests, no web framework).

* **Signing**: every dispenser request carries ``X-Tapshare-Machine``, ``X-Tapshare-Timestamp`` (Unix
  ms), ``X-Tapshare-Nonce`` (16+ random bytes, hex) and ``X-Tapshare-Signature``: HMAC-SHA256, keyed
  with a key derived from the device secret, over ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nSHA256(BODY)``.
  The server rejects a bad signature, a reused nonce and a timestamp more than 5 minutes off.
* **QR codes**: time-based one-time codes (TOTP-style, RFC 6238 construction with HMAC-SHA256): the
  code for 30 s step ``t // 30`` is bound to the machine id and derived from the device secret, so it
  is computed on the device even offline, and a photographed code stops working within a minute.
* **Tariff**: :func:`fee_fen` is the fee rule (from :mod:`kiosk.billing`), the same on both sides.
* **Messages**: pydantic models for every message, used by the cloud's API (and its OpenAPI document)
  and by the dispenser to validate what it receives.

Golden vectors in ``tests/test_protocol.py`` pin all of this down.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kiosk.billing import Calibration

PROTOCOL_VERSION = 1
HEADER_MACHINE = "X-Tapshare-Machine"
HEADER_TIMESTAMP = "X-Tapshare-Timestamp"
HEADER_NONCE = "X-Tapshare-Nonce"
HEADER_SIGNATURE = "X-Tapshare-Signature"
MAX_CLOCK_SKEW_MS = 300_000
MIN_SECRET_BYTES = 16
QR_STEP_S = 30
QR_DIGITS = 8
QR_SKEW_STEPS = 1
MACHINE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NONCE_RE = re.compile(r"^[0-9a-f]{32,64}$")


# ---------------------------------------------------------------- keys and signing

@functools.lru_cache(maxsize=65_536)
def _subkey(secret: bytes, purpose: bytes) -> bytes:
    """Separate keys for separate uses, so a QR code can never be used as a request signature."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a device secret has at least {MIN_SECRET_BYTES} bytes")
    return hmac.new(secret, b"tapshare/" + purpose + b"/v1", hashlib.sha256).digest()


def canonical_request(method: str, path: str, timestamp_ms: int, nonce: str, body: bytes) -> bytes:
    """What is signed. ``path`` includes the query string exactly as sent."""
    return "\n".join([method.upper(), path, str(timestamp_ms), nonce, hashlib.sha256(body).hexdigest()]).encode()


def sign(secret: bytes, method: str, path: str, timestamp_ms: int, nonce: str, body: bytes) -> str:
    key = _subkey(secret, b"request")
    return hmac.new(key, canonical_request(method, path, timestamp_ms, nonce, body), hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, machine_id: str, method: str, path: str, body: bytes, *, timestamp_ms: int,
                   nonce: str) -> dict[str, str]:
    return {HEADER_MACHINE: machine_id, HEADER_TIMESTAMP: str(timestamp_ms), HEADER_NONCE: nonce,
            HEADER_SIGNATURE: sign(secret, method, path, timestamp_ms, nonce, body)}


def verify_signature(secret: bytes, method: str, path: str, timestamp_ms: int, nonce: str, body: bytes,
                     signature: str) -> bool:
    return hmac.compare_digest(sign(secret, method, path, timestamp_ms, nonce, body), signature.lower())


def clock_problem(timestamp_ms: int, now_ms: int) -> str | None:
    """Why a request timestamp is refused, or ``None``."""
    off = timestamp_ms - now_ms
    if abs(off) > MAX_CLOCK_SKEW_MS:
        return f"timestamp is {off / 1000:+.0f} s off the server's clock (at most {MAX_CLOCK_SKEW_MS // 1000} s)"
    return None


# ---------------------------------------------------------------- QR codes

def qr_code(secret: bytes, machine_id: str, unix_s: int) -> str:
    """The machine's code for the 30 s step containing ``unix_s`` (8 digits)."""
    return _qr_for_step(secret, machine_id, unix_s // QR_STEP_S)


def _qr_for_step(secret: bytes, machine_id: str, step: int) -> str:
    mac = hmac.new(_subkey(secret, b"qr"), machine_id.encode() + b"\x00" + struct.pack(">Q", step),
                   hashlib.sha256).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10 ** QR_DIGITS).zfill(QR_DIGITS)


def qr_step(secret: bytes, machine_id: str, code: str, unix_s: int) -> int | None:
    """The step ``code`` belongs to, if it is the current one or one step either side; else ``None``.
    (The server refuses a step it has already seen used, so each code starts at most one session.)"""
    if not (isinstance(code, str) and len(code) == QR_DIGITS and code.isdigit()):
        return None
    now = unix_s // QR_STEP_S
    for step in range(now - QR_SKEW_STEPS, now + QR_SKEW_STEPS + 1):
        if hmac.compare_digest(_qr_for_step(secret, machine_id, step), code):
            return step
    return None


def qr_url(base_url: str, machine_id: str, code: str) -> str:
    """What the QR on the machine's screen encodes: the phone page for this machine and code."""
    return f"{base_url.rstrip('/')}/m/{machine_id}?c={code}"


# ---------------------------------------------------------------- tariff

def fee_fen(billed_pulses: int, milli_pulses_per_litre: int, price_fen_per_l: int) -> int:
    """The fee rule: floor(pulses x price / pulses-per-litre), in whole fen (see kiosk/billing.py)."""
    return Calibration(milli_pulses_per_litre).cost_fen(billed_pulses, price_fen_per_l)


def volume_ml(billed_pulses: int, milli_pulses_per_litre: int) -> int:
    return Calibration(milli_pulses_per_litre).volume_ml(billed_pulses)


POINTS_PER_YUAN = 1


def points_for_fee(fee_fen: int) -> int:
    """Growth points (s6): one per whole yuan of a bill (1.99 yuan earns 1; a free pour none). The cloud
    awards them; the kiosk's receipt shows the same number."""
    return max(0, fee_fen) // 100 * POINTS_PER_YUAN


# ---------------------------------------------------------------- messages

class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
Fen = Annotated[int, Field(ge=0, le=100_000_000)]
PricePerLitre = Annotated[int, Field(ge=0, le=100_000)]
Ms = Annotated[int, Field(ge=0, le=86_400_000)]
Pulses = Annotated[int, Field(ge=0, le=1_000_000_000)]


class GrantMsg(Msg):
    """The cloud's authorization to pour, inside a ``start`` command. ``ttl_ms`` counts from receipt."""

    session_id: Id
    machine_id: Id
    user_ref: Id
    price_fen_per_l: PricePerLitre
    credit_limit_fen: Fen
    max_volume_ml: Annotated[int, Field(ge=1, le=50_000)]
    max_duration_ms: Annotated[int, Field(ge=1, le=600_000)]
    max_idle_ms: Annotated[int, Field(ge=1, le=600_000)]
    ttl_ms: Annotated[int, Field(ge=1, le=120_000)]


CommandKind = Literal["start", "cancel", "price", "out_of_service", "in_service", "clear_lockout",
                      "maintenance_pin"]


class CommandMsg(Msg):
    command_id: Id
    kind: CommandKind
    grant: GrantMsg | None = None
    session_id: Id | None = None
    price_fen_per_l: PricePerLitre | None = None
    detail: Annotated[str, Field(max_length=500)] = ""
    reason: Annotated[str, Field(max_length=64)] = ""


class CommandsResponse(Msg):
    commands: list[CommandMsg]
    server_time_ms: int


class AckMsg(Msg):
    """The device's answer to a command: ``ok`` (for a start: the valve opened) or refused with a reason."""

    ok: bool
    reason: Annotated[str, Field(max_length=200)] = ""


class DeviceEvent(Msg):
    """One outbox row: ``event_id`` is ``<boot_id>-<seq>``, the idempotency key."""

    event_id: Annotated[str, Field(min_length=3, max_length=40, pattern=r"^[0-9]+-[0-9]+$")]
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    payload: dict[str, Any]
    # how long ago it happened, by the device's own clock at sending: the server dates the event
    # "received minus age", right even when the device's wall clock is wrong
    age_ms: Annotated[int, Field(ge=0, le=10 * 365 * 86_400_000)] = 0


class EventBatch(Msg):
    events: Annotated[list[DeviceEvent], Field(min_length=1, max_length=200)]


class EventResult(Msg):
    event_id: str
    status: Literal["accepted", "duplicate", "rejected"]
    detail: str = ""


class EventBatchResult(Msg):
    results: list[EventResult]
    server_time_ms: int


class SessionEndedPayload(BaseModel):
    """The rental record a dispenser reports when a session ends (``kind = "session_ended"``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    session_id: Id
    reason: Annotated[str, Field(min_length=1, max_length=32)]
    recovered: bool = False
    started_at: str
    closed_at: str
    duration_ms: Annotated[int, Field(ge=0, le=86_400_000)]
    price_fen_per_l: PricePerLitre
    milli_pulses_per_litre: Annotated[int, Field(ge=1_000, le=100_000_000)]
    billed_pulses: Pulses
    overrun_pulses: Pulses = 0
    volume_ml: Annotated[int, Field(ge=0, le=1_000_000)]
    cost_fen: Fen
    below_minimum: bool = False
    avg_flow_ml_per_min: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    temp_start_c: float | None = None
    temp_end_c: float | None = None
    water_quality: dict[str, Any] = Field(default_factory=dict)
    flow_series: Annotated[list[list[Any]], Field(max_length=1_000)] = Field(default_factory=list)
    valve_events: Annotated[list[list[Any]], Field(max_length=100)] = Field(default_factory=list)


class ProgressMsg(Msg):
    session_id: Id
    volume_ml: Annotated[int, Field(ge=0, le=1_000_000)]
    cost_fen: Fen
    flow_ml_per_min: Annotated[int, Field(ge=0, le=1_000_000)]
    elapsed_ms: Ms


class HeartbeatMsg(Msg):
    state: Annotated[str, Field(max_length=32)]
    session_id: Id | None = None
    valve_open: bool
    temp_c: float | None = None
    tds_ppm: int | None = None
    outbox_depth: Annotated[int, Field(ge=0)] = 0
    totalizer_pulses: Annotated[int, Field(ge=0)] = 0
    lockouts: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=20)
    software_version: Annotated[str, Field(max_length=40)] = ""
    boot_id: Annotated[int, Field(ge=0)] = 0
    dead_letters: Annotated[int, Field(ge=0)] = 0
    uptime_s: Annotated[int, Field(ge=0)] = 0


class TimeResponse(Msg):
    server_time_ms: int
