"""Secrets and tokens: device secrets encrypted at rest (AES-GCM, key outside the database), bearer
tokens stored only as SHA-256 hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class KeyError_(RuntimeError):
    pass


class SecretBox:
    """Encrypts device secrets with a 256-bit server key that never goes into the database."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise KeyError_("the server key must be 32 bytes (64 hex digits)")
        self._aead = AESGCM(key)
        self._key = key

    def subkey(self, purpose: str) -> bytes:
        """A key for another use (signing presence tokens), derived so it never equals the AES key."""
        return hmac.new(self._key, f"tapshare/{purpose}/v1".encode(), hashlib.sha256).digest()

    @classmethod
    def from_env_or_file(cls, key_file: Path, *, production: bool) -> SecretBox:
        """``TAPSHARE_CLOUD_KEY`` (hex) wins; otherwise a key file, created (mode 0600) in development."""
        env = os.environ.get("TAPSHARE_CLOUD_KEY")
        if env:
            try:
                return cls(bytes.fromhex(env))
            except ValueError as e:
                raise KeyError_("TAPSHARE_CLOUD_KEY must be 64 hex digits") from e
        if key_file.exists():
            return cls(bytes.fromhex(key_file.read_text().strip()))
        if production:
            raise KeyError_("production mode needs TAPSHARE_CLOUD_KEY or an existing key file: "
                            f"{key_file} (create one with: python -m cloud new-key)")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex())
        return cls(key)

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = secrets.token_bytes(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, context.encode())).decode()

    def open(self, sealed: str, context: str) -> bytes:
        raw = base64.b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], context.encode())


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PresenceTokens:
    """What a phone gets for opening a machine's QR link: ``<machine>.<expires_ms>.<nonce>.<mac>``,
    signed with a server key, so issuing one writes nothing (link previews may open the link too).
    The session it starts records its hash, which makes each token start at most one session."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def issue(self, machine_id: str, expires_ms: int) -> str:
        body = f"{machine_id}.{expires_ms}.{secrets.token_hex(8)}"
        return f"{body}.{self._mac(body)}"

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:32]

    def check(self, token: str, now_ms: int) -> str | None:
        """The machine id, if the token is genuine and unexpired; else ``None``."""
        parts = token.split(".")
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        body = ".".join(parts[:3])
        if not hmac.compare_digest(self._mac(body), parts[3]) or int(parts[1]) < now_ms:
            return None
        return parts[0]
