"""The technicians' maintenance PIN: stored only as a salted scrypt hash, and a lockout that grows with each
run of wrong attempts. Pure (no clock reads: ``now_ms`` is passed in; no storage: the state is a value
the caller persists)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from dataclasses import dataclass, replace

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1          # ~16 MB, ~50 ms on a Pi 4: slow for a guesser, fine here
MAX_FAILURES = 5
FIRST_LOCK_MS = 60_000
MAX_LOCK_MS = 3_600_000


class PinError(ValueError):
    pass


def check_new_pin(pin: str) -> str:
    """A new PIN: 6 to 8 digits, not one digit repeated and not a straight run (123456, 987654)."""
    if not pin.isdigit() or not 6 <= len(pin) <= 8:
        raise PinError("the PIN must be 6 to 8 digits")
    steps = {int(b) - int(a) for a, b in itertools.pairwise(pin)}
    if len(set(pin)) == 1 or steps in ({1}, {-1}):
        raise PinError("the PIN is too easy to guess (a repeated digit or a straight run)")
    return pin


def hash_pin(pin: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_pin(stored: str, pin: str) -> bool:
    try:
        kind, n, r, p, salt_hex, digest_hex = stored.split("$")
        if kind != "scrypt":
            return False
        digest = hashlib.scrypt(pin.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
                                dklen=len(digest_hex) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


@dataclass(frozen=True)
class PinState:
    failures: int = 0                # wrong PINs since the last success or lockout
    lockouts: int = 0                # lockouts since the last success: each one doubles the next
    locked_until_ms: int = 0         # wall clock


@dataclass(frozen=True)
class PinResult:
    ok: bool
    state: PinState
    locked_for_ms: int = 0           # > 0: entry refused for this long
    attempts_left: int = MAX_FAILURES


def attempt(stored_hash: str | None, pin: str, state: PinState, now_ms: int) -> PinResult:
    """One try at the PIN pad. Refused without checking while locked; five wrong tries lock entry for 1 min,
    then 2, 4, ... up to an hour; a right PIN clears everything."""
    if state.locked_until_ms > now_ms:
        return PinResult(False, state, locked_for_ms=state.locked_until_ms - now_ms, attempts_left=0)
    if stored_hash and verify_pin(stored_hash, pin):
        return PinResult(True, PinState())
    failures = state.failures + 1
    if failures >= MAX_FAILURES:
        lock_ms = min(MAX_LOCK_MS, FIRST_LOCK_MS * 2**state.lockouts)
        new = PinState(failures=0, lockouts=state.lockouts + 1, locked_until_ms=now_ms + lock_ms)
        return PinResult(False, new, locked_for_ms=lock_ms, attempts_left=0)
    new = replace(state, failures=failures)
    return PinResult(False, new, attempts_left=MAX_FAILURES - failures)
