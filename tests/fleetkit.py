"""A fleet of real cloud instances (``python -m cloud serve`` processes) on one PostgreSQL, behind a real HAProxy
configured by the repository's own ``cloud/deploy/haproxy.cfg`` with TLS termination (a certificate made here).
For the fleet tests and ``bench/bench_cloud.py --instances``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "cloud" / "deploy" / "haproxy.cfg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key: (HAProxy's PEM with both, the certificate for clients)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tapshare.pem").write_bytes(cert_pem + key_pem)
    (directory / "cert.pem").write_bytes(cert_pem)
    return directory / "tapshare.pem", directory / "cert.pem"


def haproxy_config(pem: Path, https_port: int, http_port: int, servers: list[int], socket_path: Path,
                   plain_port: int | None = None) -> str:
    """The repository's configuration with this test's addresses: binds, servers, log and stats socket.
    ``plain_port``: also a frontend without TLS and without the redirect to https (the benchmark's load
    generator, whose thousands of TLS handshakes would measure the generator, not the cloud)."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^    log /dev/log local0$", "    log stdout format raw local0", text, flags=re.M)
    text = re.sub(r"^    stats socket \S+", f"    stats socket {socket_path}", text, flags=re.M)
    text = re.sub(r"^    bind :443 ssl crt \S+", f"    bind 127.0.0.1:{https_port} ssl crt {pem}", text, flags=re.M)
    text = re.sub(r"^    bind :80$", f"    bind 127.0.0.1:{http_port}", text, flags=re.M)
    text = re.sub(r"^    server .*\n", "", text, flags=re.M)
    # this machine allows a process fewer descriptors than a production balancer has (two a connection)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    maxconn = 60_000
    if hard != resource.RLIM_INFINITY and hard < 120_000:
        maxconn = hard // 2 - 500
        text = re.sub(r"^    maxconn \d+$", f"    maxconn {maxconn}", text, flags=re.M)
    if plain_port is not None:
        text = text.replace("\nbackend tapshare_cloud\n", f"""
frontend tapshare_plain
    bind 127.0.0.1:{plain_port}
    maxconn {maxconn}
    default_backend tapshare_cloud

backend tapshare_cloud
""", 1)
    return text + "".join(f"    server cloud{i + 1} 127.0.0.1:{port}\n" for i, port in enumerate(servers))


class Instance:
    def __init__(self, fleet: CloudFleet, index: int) -> None:
        self.fleet, self.index = fleet, index
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = fleet.dir / f"cloud{index + 1}.log"

    def start(self, wait: bool = True) -> None:
        env = {**os.environ, **self.fleet.env, "TAPSHARE_INSTANCE_ID": f"cloud{self.index + 1}"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cloud", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.fleet.dir / "data"), "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"cloud{self.index + 1} exited: {self.log.read_text()[-2000:]}")
            try:
                r = requests.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200 and r.json()["listening"]:        # and hears the other instances
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"cloud{self.index + 1} did not become healthy: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, as systemd stops a unit; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class CloudFleet:
    """``n`` instances and HAProxy in front. ``url`` is the balancer's https address (clients trust ``ca``)."""

    def __init__(self, directory: Path, database_url: str, n: int = 3, drain_s: float = 3.0,
                 env: dict[str, str] | None = None, balancers: int = 1, plain: bool = False,
                 log_balancer: bool = True) -> None:
        if not shutil.which("haproxy"):
            raise RuntimeError("haproxy is not installed (apt-get install haproxy; test.sh does)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.https_port, self.http_port = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.https_port}"
        self.env = {"TAPSHARE_DATABASE_URL": database_url, "TAPSHARE_CLOUD_KEY": secrets.token_bytes(32).hex(),
                    "TAPSHARE_PUBLIC_URL": self.url, "TAPSHARE_DRAIN_S": str(drain_s), **(env or {})}
        self.instances = [Instance(self, i) for i in range(n)]
        self.pem, self.ca = self_signed(self.dir / "tls")
        self.haproxy: subprocess.Popen | None = None
        # more HAProxy processes (the benchmark's: one process may hold only so many descriptors here); each with
        # its own ports and runtime socket; ``plain_ports``: their frontends without TLS when ``plain``
        self.n_balancers, self.log_balancer = balancers, log_balancer
        self.haproxies: list[subprocess.Popen] = []
        self.plain_ports = [free_port() for _ in range(balancers)] if plain else []
        self.admin = ""

    def __enter__(self) -> CloudFleet:
        try:
            return self._start()
        except BaseException:
            self.__exit__()                        # no instance or balancer left running
            raise

    def _start(self) -> CloudFleet:
        # the first instance migrates the database; the others find it done (they would also wait on its lock)
        self.instances[0].start()
        for inst in self.instances[1:]:
            inst.start(wait=False)
        for inst in self.instances[1:]:
            inst.wait_healthy()
        for b in range(self.n_balancers):
            https_port, http_port = (self.https_port, self.http_port) if b == 0 else (free_port(), free_port())
            sfx = "" if b == 0 else str(b + 1)
            cfg = self.dir / f"haproxy{sfx}.cfg"
            text = haproxy_config(self.pem, https_port, http_port, [i.port for i in self.instances],
                                  self.dir / f"haproxy{sfx}.sock", self.plain_ports[b] if self.plain_ports else None)
            if not self.log_balancer:             # a log line a request, at thousands a second, costs CPU
                text = re.sub(r"^    log stdout format raw local0$", "", text, flags=re.M)
            cfg.write_text(text)
            check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
            if check.returncode:
                raise RuntimeError(f"haproxy refuses the configuration: {check.stdout}{check.stderr}")
            with open(self.dir / f"haproxy{sfx}.log", "ab") as log:
                self.haproxies.append(subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log,
                                                       stderr=subprocess.STDOUT, start_new_session=True))
        self.haproxy = self.haproxies[0]
        self.wait_balanced()
        out = subprocess.run([sys.executable, "-m", "cloud", "create-operator", "fleet-admin", "--role", "admin",
                              "--database-url", self.database_url, "--data-dir", str(self.dir / "data")],
                             cwd=ROOT, env={**os.environ, **self.env}, capture_output=True, text=True, check=True)
        self.admin = out.stdout.strip().splitlines()[-1]
        return self

    def wait_balanced(self, timeout_s: float = 20) -> None:
        """Until HAProxy (every HAProxy process) sees every running instance up (its health checks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ups = [self.servers_up(b) for b in range(self.n_balancers)]
            if all(up is not None and sum(up.values()) == sum(i.alive for i in self.instances) for up in ups):
                return
            time.sleep(0.1)
        raise RuntimeError(f"HAProxy does not see the instances up: {self.servers_up()}")

    def runtime(self, command: str, balancer: int = 0) -> str | None:
        """A command to HAProxy's runtime API (the stats socket of HAProxy process ``balancer``)."""
        sfx = "" if balancer == 0 else str(balancer + 1)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.dir / f"haproxy{sfx}.sock"))
                s.sendall(command.encode() + b"\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return None
        return data.decode()

    def servers_up(self, balancer: int = 0) -> dict[str, bool] | None:
        """Each server's state as HAProxy sees it (its runtime API)."""
        data = self.runtime("show servers state tapshare_cloud", balancer)
        if data is None:
            return None
        out = {}
        for line in data.splitlines():
            parts = line.split()
            if len(parts) > 6 and parts[1] == "tapshare_cloud":
                out[parts[3]] = parts[5] == "2"           # srv_op_state 2: running
        return out

    def __exit__(self, *exc) -> None:
        for inst in self.instances:
            if inst.alive:
                inst.proc.kill()
                inst.proc.wait(10)
        for proc in self.haproxies:
            proc.terminate()
            proc.wait(10)

    def op(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, self.url + path, timeout=10, verify=str(self.ca),
                                headers={"Authorization": f"Bearer {self.admin}"}, **kw)
