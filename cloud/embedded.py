"""The reference cloud inside the dispenser's process, for the desktop simulation (``./run.sh``): uvicorn on a
thread, an admin operator, and this machine provisioned and enrolled on first start, so the whole system
(cloud, kiosk, simulated hardware, phone pages) runs from one command. Development only."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

import requests
from sqlalchemy import insert, select

from cloud import db as t
from cloud.app import CloudSettings, create_app
from cloud.security import new_token, token_hash
from cloud.server import GracefulServer, server_config

log = logging.getLogger("tapshare.cloud.embedded")


class EmbeddedCloudError(RuntimeError):
    pass


class EmbeddedCloud:
    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 8700, public_url: str = "") -> None:
        self.data_dir = data_dir
        self.host, self.port = host, port
        self.public_url = public_url
        self.settings = CloudSettings(data_dir=data_dir, public_url=public_url or f"http://127.0.0.1:{port}")
        self.app = create_app(self.settings)
        self.server = GracefulServer(server_config(self.app, host=host, port=port, log_level="warning",
                                                   timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="embedded-cloud", daemon=True)
        self.url = ""

    def start(self, timeout_s: float = 20) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise EmbeddedCloudError(f"the embedded cloud could not start on {self.host}:{self.port} "
                                         "(is the port in use? choose another with --cloud-port)")
            if time.monotonic() > deadline:
                raise EmbeddedCloudError("the embedded cloud did not start in time")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        if not self.public_url:
            self.public_url = self.settings.public_url = self.url
        log.info("embedded cloud at %s (public URL %s)", self.url, self.public_url)
        return self.url

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)

    def _admin_token(self) -> str:
        token = new_token()
        database = self.app.state.database
        with database.tx() as conn:
            conn.execute(insert(t.operators).values(operator_id=f"embedded-{secrets.token_hex(3)}", role="admin",
                                                    token_hash=token_hash(token), created_ms=time.time_ns() // 10**6))
        return token

    def ensure_machine(self, machine_id: str, price_fen_per_l: int,
                       location: str = "Desktop simulation") -> bytes | None:
        """Provision and enrol ``machine_id`` if the cloud does not know it; returns the new device secret, or
        None if it was enrolled before (the dispenser has its secret file)."""
        with self.app.state.database.read() as conn:
            known = conn.execute(select(t.machines.c.secret_enc).where(t.machines.c.machine_id == machine_id)).first()
        if known is not None and known[0] is not None:
            return None
        if known is not None:
            raise EmbeddedCloudError(f"machine {machine_id} exists in {self.data_dir} but was never enrolled: "
                                     "remove that folder to start the simulation afresh")
        r = requests.post(self.url + "/api/v1/operator/machines", timeout=10,
                          headers={"Authorization": f"Bearer {self._admin_token()}"},
                          json={"machine_id": machine_id, "location": location, "price_fen_per_l": price_fen_per_l})
        if r.status_code != 200:
            raise EmbeddedCloudError(f"could not provision {machine_id}: {r.text}")
        e = requests.post(self.url + "/device/v1/enroll", timeout=10,
                          json={"machine_id": machine_id, "enrolment_token": r.json()["enrolment_token"]})
        if e.status_code != 200:
            raise EmbeddedCloudError(f"could not enrol {machine_id}: {e.text}")
        return bytes.fromhex(e.json()["secret_hex"])

    def demo_fleet(self, seed: bool) -> tuple[str, str]:
        """Development: seed the console's demo fleet (``python -m cloud demo-data``) when ``seed`` (a fresh data
        folder), and return the development admin's name and password for the console."""
        from cloud.dev.demo import DemoRefused, demo_admin, seed_demo
        svc = self.app.state.services
        if seed:
            try:
                seed_demo(svc, self.data_dir, time.time_ns() // 1_000_000)
            except DemoRefused:
                pass                     # there already: nothing to add
        return demo_admin(svc, self.data_dir, time.time_ns() // 1_000_000)

    def demo_link(self, machine_id: str) -> str:
        """A link that always opens the machine's current QR page (development only: see /dev/qr)."""
        return f"{self.public_url}/dev/qr/{machine_id}"
