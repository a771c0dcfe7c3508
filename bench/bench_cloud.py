"""N simulated dispensers (real HTTP, signed, long-polling) against one cloud server on loopback.

    .venv/bin/python bench/bench_cloud.py [--machines 100 1000 10000] [--seconds 20] [--rate 50]

The server runs as its own process (``python -m cloud serve``, SQLite). The load generator is one
asyncio process with raw keep-alive connections (one per dispenser, plus a pool for phones), so it
stays light. Each dispenser long-polls; on a start it acknowledges, reports the session's end and
polls again. Phones start sessions at ``--rate`` per second on idle machines. Prints sessions
completed per second, p50/p99 from "phone sends start" to "dispenser has the command", and the CPU
seconds used by the server and by the generator (they share the machine's 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert

import contract as p
from bench.common import free_port, start_cloud, stop_process
from cloud import db as t
from cloud.db import Database
from cloud.security import SecretBox, new_token, token_hash


def raise_fd_limit(n: int = 20_000) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def seed(data_dir: Path, n: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Machines (enrolled) and users with a balance, written straight into the database."""
    box = SecretBox.from_env_or_file(data_dir / "server.key", production=False)
    database = Database(f"sqlite:///{data_dir / 'cloud.db'}")
    database.create_all()
    now = time.time_ns() // 1_000_000
    machines, tokens = [], []
    m_rows, u_rows, tok_rows, bal_rows = [], [], [], []
    for i in range(n):
        mid, secret = f"B{i:05d}", secrets.token_bytes(32)
        machines.append((mid, secret))
        m_rows.append(dict(machine_id=mid, secret_enc=box.seal(secret, f"machine:{mid}"), location="bench",
                           price_fen_per_l=200, max_volume_ml=5000, max_duration_ms=300_000, max_idle_ms=15_000,
                           max_credit_fen=10_000, created_ms=now))
    for i in range(max(200, n // 5)):
        uid, tok = f"bu{i:05d}", new_token()
        tokens.append(tok)
        u_rows.append(dict(user_id=uid, phone=f"139{i:08d}", registered=True, points=0, created_ms=now))
        tok_rows.append(dict(token_hash=token_hash(tok), user_id=uid, created_ms=now))
        bal_rows.append(dict(user_id=uid, kind="topup", amount_fen=10_000_000, note="bench", created_ms=now))
    with database.tx() as conn:
        conn.execute(insert(t.machines), m_rows)
        conn.execute(insert(t.users), u_rows)
        conn.execute(insert(t.user_tokens), tok_rows)
        conn.execute(insert(t.balance_entries), bal_rows)
    database.dispose()
    return machines, tokens


class Conn:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        if body:
            head.append("Content-Type: application/json")
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        data = await self.reader.readexactly(length) if length else b""
        return status, json.loads(data) if data else {}


class Bench:
    def __init__(self, port: int, machines: list[tuple[str, bytes]], tokens: list[str]) -> None:
        self.port, self.machines, self.tokens = port, machines, tokens
        self.sent_at: dict[str, float] = {}          # session id -> when the phone sent the start
        self.got_at: dict[str, float] = {}           # session id -> when its dispenser had the command
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.idle = set(range(len(machines)))
        self.connected = 0
        self.stop = False
        self.seq = 0
        self.status_s: list[float] = []               # the phones' machine-status polls (one a second each)

    def _signed(self, mid: str, secret: bytes, method: str, path: str, body: bytes) -> dict[str, str]:
        return p.signed_headers(secret, mid, method, path, body, timestamp_ms=time.time_ns() // 1_000_000,
                                nonce=secrets.token_hex(16))

    async def dispenser(self, i: int) -> None:
        mid, secret = self.machines[i]
        conn = Conn(self.port)
        path = "/device/v1/commands?wait_ms=55000"
        first = True
        while not self.stop:
            try:
                status, body = await conn.request("GET", path, headers=self._signed(mid, secret, "GET", path, b""))
                if first:
                    self.connected += 1
                    first = False
                if status != 200:
                    self.errors[f"poll {status}"] = self.errors.get(f"poll {status}", 0) + 1
                    await asyncio.sleep(1)
                    continue
                for cmd in body["commands"]:
                    if cmd["kind"] != "start":
                        continue
                    sid = cmd["session_id"]
                    self.got_at.setdefault(sid, time.perf_counter())
                    ack_path = f"/device/v1/commands/{cmd['command_id']}/ack"
                    ack = json.dumps({"ok": True}).encode()
                    await conn.request("POST", ack_path, ack, self._signed(mid, secret, "POST", ack_path, ack))
                    self.seq += 1
                    event_id = f"1-{self.seq}"
                    payload = {"event_id": event_id, "kind": "session_ended", "machine_id": mid, "boot_id": 1,
                               "created_at": "2026-01-01T00:00:11Z", "user_ref": "u-bench",
                               "session_id": sid, "reason": "stop_button", "started_at": "2026-01-01T00:00:00Z",
                               "closed_at": "2026-01-01T00:00:10Z", "ended_at": "2026-01-01T00:00:11Z",
                               "duration_ms": 10_000, "price_fen_per_l": 200, "credit_limit_fen": 1_000,
                               "min_dispense_ml": 10, "milli_pulses_per_litre": 450_000, "billed_pulses": 225,
                               "volume_ml": 500, "cost_fen": 100}
                    ev = json.dumps({"events": [{"event_id": event_id, "kind": "session_ended",
                                                 "payload": payload}]}).encode()
                    st, res = await conn.request("POST", "/device/v1/events", ev,
                                                 self._signed(mid, secret, "POST", "/device/v1/events", ev))
                    if st == 200 and res["results"][0]["status"] == "accepted":
                        self.completed += 1
                    else:
                        self.errors[f"report {st}"] = self.errors.get(f"report {st}", 0) + 1
                    self.idle.add(i)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
                conn = Conn(self.port)
                await asyncio.sleep(0.5)

    async def phone(self, rate: float, seconds: float) -> None:
        conns = [Conn(self.port) for _ in range(16)]
        free = asyncio.Queue()
        for c in conns:
            free.put_nowait(c)
        users = list(range(len(self.tokens)))
        busy_users: set[int] = set()

        async def one(i: int, u: int) -> None:
            c = await free.get()
            try:
                mid, secret = self.machines[i]
                code = p.qr_code(secret, mid, int(time.time()))
                auth = {"Authorization": f"Bearer {self.tokens[u]}"}
                st, scan = await c.request("GET", f"/api/v1/scan?machine={mid}&c={code}", headers=auth)
                if st != 200:
                    self.errors[f"scan {st}"] = self.errors.get(f"scan {st}", 0) + 1
                    self.idle.add(i)
                    return
                body = json.dumps({"presence_token": scan["presence_token"], "expected_price_fen_per_l": 200})
                t0 = time.perf_counter()
                st, res = await c.request("POST", "/api/v1/sessions", body.encode(), auth)
                if st == 200:                 # the command may reach the dispenser before this response
                    self.sent_at[res["session_id"]] = t0
                else:
                    self.errors[f"start {st} {res.get('error')}"] = self.errors.get(f"start {st} {res.get('error')}",
                                                                                   0) + 1
                    self.idle.add(i)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
                conns.append(Conn(self.port))
            finally:
                free.put_nowait(c)
                busy_users.discard(u)

        end = time.perf_counter() + seconds
        tasks = []
        while time.perf_counter() < end:
            if self.idle and len(busy_users) < len(users):
                i = random.choice(tuple(self.idle))
                self.idle.discard(i)
                u = random.choice([x for x in users if x not in busy_users][:50])
                busy_users.add(u)
                tasks.append(asyncio.create_task(one(i, u)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)


    async def watcher(self, seconds: float) -> None:
        """A person standing at a machine: the phone page asks for its status once a second."""
        conn = Conn(self.port)
        mid = random.choice(self.machines)[0]
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not self.stop:
            t0 = time.perf_counter()
            try:
                st, _ = await conn.request("GET", f"/api/v1/machines/{mid}")
                if st == 200:
                    self.status_s.append(time.perf_counter() - t0)
                else:
                    self.errors[f"status {st}"] = self.errors.get(f"status {st}", 0) + 1
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                self.errors[type(e).__name__] = self.errors.get(type(e).__name__, 0) + 1
                conn = Conn(self.port)
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))


async def run(port: int, machines, tokens, rate: float, seconds: float, ramp_s: float, server_pid: int,
              watchers: int = 0) -> Bench:
    b = Bench(port, machines, tokens)
    tasks = []
    for i in range(len(machines)):
        tasks.append(asyncio.create_task(b.dispenser(i)))
        if i % 100 == 99:
            await asyncio.sleep(ramp_s * 100 / len(machines))
    while b.connected < len(machines):
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    if os.environ.get("BENCH_PROFILE"):              # profile the server during the phone phase only
        subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(server_pid), "-d",
                          str(int(seconds)), "-f", "raw", "-o", os.environ["BENCH_PROFILE"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    await asyncio.gather(b.phone(rate, seconds), *(b.watcher(seconds) for _ in range(watchers)))
    await asyncio.sleep(3)                            # let the last reports land
    b.elapsed = time.perf_counter() - t0
    b.stop = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return b


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_size(n: int, rate: float, seconds: float, watchers: int = 0) -> None:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        machines, tokens = seed(data, n)
        port = free_port()
        server = start_cloud(data, port, preexec_fn=raise_fd_limit)
        try:
            srv0, gen0 = cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_SELF)
            b = asyncio.run(run(port, machines, tokens, rate, seconds, ramp_s=max(2.0, n / 1000),
                                server_pid=server.pid, watchers=watchers))
            srv1, gen1 = cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_SELF)
        finally:
            stop_process(server)
        lat = sorted(b.got_at[s] - t0 for s, t0 in b.sent_at.items() if s in b.got_at)
        missing = sum(1 for s in b.sent_at if s not in b.got_at)
        q = (lambda f: lat[min(len(lat) - 1, int(len(lat) * f))] * 1000) if lat else (lambda f: float("nan"))
        gen_cpu = gen1.ru_utime + gen1.ru_stime - gen0.ru_utime - gen0.ru_stime
        print(f"N={n:>6}: {b.completed} sessions in {b.elapsed:.1f} s = {b.completed / b.elapsed:.1f}/s; "
              f"start->command p50 {q(.5):.1f} ms, p99 {q(.99):.1f} ms (n={len(lat)}, never received {missing}); "
              f"CPU server {srv1 - srv0:.1f} s, generator {gen_cpu:.1f} s; errors {b.errors or 'none'}")
        if b.status_s:
            st = sorted(b.status_s)
            print(f"        status polls from {watchers} phones at machines (1/s each, alongside): {len(st)}, "
                  f"p50 {st[len(st) // 2] * 1000:.1f} ms, p99 {st[min(len(st) - 1, int(len(st) * .99))] * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", type=int, nargs="+", default=[100, 1_000, 10_000])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rate", type=float, default=50, help="phone starts per second")
    ap.add_argument("--watchers", type=int, default=100,
                    help="phones standing at machines, polling the machine's status once a second")
    args = ap.parse_args()
    raise_fd_limit()
    for n in args.machines:
        one_size(n, args.rate, args.seconds, args.watchers)


if __name__ == "__main__":
    main()
