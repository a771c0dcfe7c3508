"""The device secret on disk: hex, one line, mode 0600, refused if anyone else can read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(RuntimeError):
    pass


def write_secret(path: Path, secret: bytes, *, overwrite: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise SecretFileError(f"{path} exists: this machine is already provisioned (use --force to replace it)")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_secret(path: Path) -> bytes | None:
    """The secret, or ``None`` if the machine is not provisioned. Raises on an unsafe or broken file."""
    if not path.exists():
        return None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError as e:
        raise SecretFileError(f"{path} does not hold a hex secret") from e
    if len(secret) < 16:
        raise SecretFileError(f"{path}: the secret is too short")
    return secret
