"""A private X server (Xvfb) for tests that open real Kivy windows; Mesa's software renderer draws them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


class Xvfb:
    def __init__(self, width: int = 1280, height: int = 1400) -> None:
        self.size = f"{width}x{height}x24"
        self.proc: subprocess.Popen | None = None
        self.display = ""

    def __enter__(self) -> Xvfb:
        exe = shutil.which("Xvfb")
        if exe is None:
            raise FileNotFoundError("Xvfb is not installed (Debian: apt-get install xvfb)")
        for n in range(91, 140):
            if Path(f"/tmp/.X11-unix/X{n}").exists() or Path(f"/tmp/.X{n}-lock").exists():
                continue
            proc = subprocess.Popen([exe, f":{n}", "-screen", "0", self.size, "-nolisten", "tcp"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if Path(f"/tmp/.X11-unix/X{n}").exists():
                    self.proc, self.display = proc, f":{n}"
                    return self
                time.sleep(0.05)
            proc.kill()
        raise RuntimeError("could not start Xvfb")

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process that opens windows on this server."""
        return {**os.environ, "DISPLAY": self.display, "KIVY_NO_ARGS": "1", **extra}

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
