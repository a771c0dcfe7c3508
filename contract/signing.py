"""Signed device requests: every dispenser request carries ``X-Tapshare-Machine``, ``X-Tapshare-Timestamp``
(Unix ms), ``X-Tapshare-Nonce`` (16+ random bytes, hex), ``X-Tapshare-Protocol`` and ``X-Tapshare-Signature``:
HMAC-SHA256, keyed with a key derived from the device secret, over
``METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nSHA256(BODY)``. The server rejects a bad signature, a reused nonce,
a timestamp more than 5 minutes off and a protocol version it does not speak."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re

PROTOCOL_VERSION = 1                 # sent with every device request; the cloud refuses one it does not speak
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})
HEADER_MACHINE = "X-Tapshare-Machine"
HEADER_TIMESTAMP = "X-Tapshare-Timestamp"
HEADER_NONCE = "X-Tapshare-Nonce"
HEADER_SIGNATURE = "X-Tapshare-Signature"
HEADER_PROTOCOL = "X-Tapshare-Protocol"
MAX_CLOCK_SKEW_MS = 300_000
MIN_SECRET_BYTES = 16
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
            HEADER_PROTOCOL: str(PROTOCOL_VERSION),
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
