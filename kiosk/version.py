"""The version this release of the dispenser reports (heartbeats, the ledger's boots, the maintenance screen).

A release installed from a bundle has a ``VERSION`` file the applier wrote from the bundle's signed manifest
(the tracked files carry no version of their own, so one checkout can be bundled as any version); a checkout
run directly, or a release deploy.sh installed, has none and reports ``contract.SOFTWARE_VERSION``."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from contract import SOFTWARE_VERSION

_VERSION = re.compile(r"^\d{1,6}(?:\.\d{1,6}){1,3}$")
RELEASE_DIR = Path(__file__).resolve().parent.parent


@functools.cache
def running_version() -> str:
    try:
        text = (RELEASE_DIR / "VERSION").read_text().strip()
    except OSError:
        return SOFTWARE_VERSION
    return text if _VERSION.fullmatch(text) else SOFTWARE_VERSION
