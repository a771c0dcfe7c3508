"""A private X server (Xvfb) for tests that open real Kivy windows; Mesa's software renderer draws them."""

from __future__ import annotations

import os
import shutil
import signal
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
        # each display from :91 (clear of a desktop's :0 and of the booted test root's): Xvfb takes the display's
        # lock file itself, and writes the number to the pipe once it listens (-displayfd), or exits; so two test
        # processes starting one at the same moment never both believe they have the same display
        for n in range(91, 160):
            if Path(f"/tmp/.X{n}-lock").exists():
                continue
            read_end, write_end = os.pipe()
            try:
                proc = subprocess.Popen([exe, f":{n}", "-displayfd", str(write_end), "-screen", "0", self.size,
                                         "-nolisten", "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        pass_fds=(write_end,))
            finally:
                os.close(write_end)
            with os.fdopen(read_end, "rb") as r:
                ready = r.readline().strip()        # empty: it exited (the display was taken)
            if ready == str(n).encode():
                self.proc, self.display = proc, f":{n}"
                return self
            proc.kill()
            proc.wait()
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


class RunningSystem:
    """``main.py --simulate --embedded-cloud`` (the README's run command) as a child process on an X server:
    waits for the phone link it prints, keeps its output, and stops it with SIGTERM. ``rc`` is its exit
    code after the ``with`` block."""

    def __init__(self, env: dict[str, str], data_dir: Path, args: tuple[str, ...] = ()) -> None:
        self.env, self.data_dir, self.args = env, data_dir, args
        self.lines: list[str] = []
        self.base = self.machine = self.link = ""
        self.rc: int | None = None

    def __enter__(self) -> RunningSystem:
        import re
        import sys
        import threading
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, str(root / "main.py"), "--simulate", "--embedded-cloud",
                                      "--cloud-port", "0", "--data-dir", str(self.data_dir), *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not self.base and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/dev/qr/(\S+)", line)
            if m:
                self.link, self.base, self.machine = m.group(0), m.group(1), m.group(2)
        if not self.base:
            self.__exit__()
            raise RuntimeError("the system did not start:\n" + self.output[-3000:])
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        return self

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.rc = None
