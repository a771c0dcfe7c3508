"""QR codes: time-based one-time codes (TOTP-style, RFC 6238 construction with HMAC-SHA256). The code for 30 s
step ``t // 30`` is bound to the machine id and derived from the device secret, so it is computed on the device
even offline, and a photographed code stops working within a minute. A code may be scanned by several phones (a
queue at one screen): the server rate-limits scans and each scan's presence token starts at most one session."""

from __future__ import annotations

import hashlib
import hmac
import struct

from contract.signing import _subkey

QR_STEP_S = 30
QR_DIGITS = 8
QR_SKEW_STEPS = 1


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
    """The step ``code`` belongs to, if it is the current one or one step either side; else ``None``."""
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
