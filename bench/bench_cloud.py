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
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert

import contract as p
from bench.common import free_port, pct, start_cloud, stop_process
from cloud import db as t
from cloud.db import Database
from cloud.security import SecretBox, new_token, token_hash
from sync.link import poll_wait_now_ms


def raise_fd_limit(n: int = 20_000) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def seed(data_dir: Path, n: int, database_url: str | None = None, box: SecretBox | None = None,
         prefix: str = "B", users: int | None = None) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Machines (enrolled) and users with a balance, written straight into the database: SQLite in data_dir, or
    ``database_url`` already migrated (the fleet's first instance did) with the fleet's key ``box``."""
    box = box or SecretBox.from_env_or_file(data_dir / "server.key", production=False)
    database = Database(database_url or f"sqlite:///{data_dir / 'cloud.db'}")
    if database_url is None:
        database.create_all()
    now = time.time_ns() // 1_000_000
    machines, tokens = [], []
    m_rows, u_rows, tok_rows, bal_rows = [], [], [], []
    for i in range(n):
        mid, secret = f"{prefix}{i:05d}", secrets.token_bytes(32)
        machines.append((mid, secret))
        m_rows.append(dict(machine_id=mid, secret_enc=box.seal(secret, f"machine:{mid}"), location="bench",
                           price_fen_per_l=200, max_volume_ml=5000, max_duration_ms=300_000, max_idle_ms=15_000,
                           max_credit_fen=10_000, created_ms=now))
    for i in range(users if users is not None else max(200, n // 5)):
        uid, tok = f"{prefix.lower()}u{i:05d}", new_token()
        tokens.append(tok)
        u_rows.append(dict(user_id=uid, phone=f"13{ord(prefix[0]) % 10}{i:08d}", registered=True, points=0,
                           created_ms=now))
        tok_rows.append(dict(token_hash=token_hash(tok), user_id=uid, created_ms=now))
        bal_rows.append(dict(user_id=uid, kind="topup", amount_fen=10_000_000, note="bench", created_ms=now))
    with database.tx() as conn:
        for table, rows in ((t.machines, m_rows), (t.users, u_rows), (t.user_tokens, tok_rows),
                            (t.balance_entries, bal_rows)):
            for k in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[k:k + 5000])
    database.dispose()
    return machines, tokens


CONNECT_TIMEOUT_S = 10
POLL_WAIT_MS = 55_000            # a device's (sync.link's default)
ANSWER_MARGIN_S = 15


class Conn:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last = ""                               # what the last request was (for the errors' names)

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      held_ms: int = 0) -> tuple[int, dict]:
        """``held_ms``: how long the server may hold the answer (a long-poll's wait)."""
        self.last = method + " " + "/".join(path.split("?")[0].split("/")[:4])
        if self.writer is None:
            # a connection the balancer never accepts (its queue full: the SYN is retried for minutes) is an
            # error with a name, not a machine silently missing from the count
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port),
                                                              CONNECT_TIMEOUT_S)
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        if body:
            head.append("Content-Type: application/json")
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        # as a device does: an answer that does not come within the poll's wait and a margin is an error with a
        # name (and the machine connects again), not a machine silently missing from the count
        return await asyncio.wait_for(self._answer(), held_ms / 1000 + ANSWER_MARGIN_S)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def _answer(self) -> tuple[int, dict]:
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
        try:
            return status, json.loads(data) if data else {}
        except ValueError:                  # the balancer's own error page (HTML), named by its title
            title = data.split(b"<h1>", 1)[-1].split(b"</h1>", 1)[0][:60].decode("utf-8", "replace")
            return status, {"error": f"not JSON: {title}"}


class Bench:
    """``port``: where everything goes; or ``machine_port(i)`` where dispenser i polls and ``phone_port(i)`` where
    the start for machine i goes, with a label its latency is counted under (``(port, label)``)."""

    def __init__(self, port: int, machines: list[tuple[str, bytes]], tokens: list[str],
                 machine_port=None, phone_port=None, aligned_polls: bool = False) -> None:
        self.port, self.machines, self.tokens = port, machines, tokens
        self.aligned_polls, self.rng = aligned_polls, random.Random()
        self.heartbeats_sent = 0
        self.machine_port = machine_port or (lambda i: port)
        self.phone_port = phone_port or (lambda i: (self.machine_port(i), ""))
        self.label: dict[str, str] = {}              # session id -> its label
        self.stop_phones: asyncio.Event | None = None   # set: the phones stop (instead of after ``seconds``)
        self.sent_at: dict[str, float] = {}          # session id -> when the phone sent the start
        self.got_at: dict[str, float] = {}           # session id -> when its dispenser had the command
        self.answered_s: list[float] = []            # how long each start took to answer the phone
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.idle = set(range(len(machines)))
        self.connected = 0
        self.stop = False
        self.seq = 0
        self.status_s: list[float] = []               # the phones' machine-status polls (one a second each)
        self.busy_users: set[int] = set()             # a person with a session running starts no other
        self.user_of: dict[str, int] = {}             # session id -> its person
        self.ended: set[str] = set()                  # sessions whose end the machine reported
        self.doing: dict[int, str] = {}               # machine -> what it waits for now (for a run that stalls)

    def _signed(self, mid: str, secret: bytes, method: str, path: str, body: bytes) -> dict[str, str]:
        return p.signed_headers(secret, mid, method, path, body, timestamp_ms=time.time_ns() // 1_000_000,
                                nonce=secrets.token_hex(16))

    async def heartbeats(self, i: int, every_s: float) -> None:
        """Dispenser i's heartbeats, as a device sends them beside its poll (its own connection), every
        ``every_s`` (+-10 %), the first at a random point of the interval."""
        mid, secret = self.machines[i]
        conn = Conn(self.machine_port(i))
        body = json.dumps({"state": "idle", "valve_open": False, "software_version": "bench"}).encode()
        path = "/device/v1/heartbeat"
        await asyncio.sleep(self.rng.uniform(0, every_s))
        while not self.stop:
            try:
                st, _ = await conn.request("POST", path, body, self._signed(mid, secret, "POST", path, body))
                self.heartbeats_sent += 1
                if st != 200:
                    self.errors[f"heartbeat {st}"] = self.errors.get(f"heartbeat {st}", 0) + 1
            except (TimeoutError, OSError, ValueError) as e:
                what = f"{type(e).__name__} on heartbeat"
                self.errors[what] = self.errors.get(what, 0) + 1
                conn.close()
                conn = Conn(self.machine_port(i))
            await asyncio.sleep(every_s * self.rng.uniform(0.9, 1.1))

    async def dispenser(self, i: int) -> None:
        mid, secret = self.machines[i]
        conn = Conn(self.machine_port(i))
        # the first poll answers at once (connected, known to every instance); then each is held as a device's
        # is (sync.link: 44-55 s). The first long-poll's wait is spread over the whole 55 s, as a fleet running
        # for a while has its polls spread (a machine's place in the cycle is where it once booted), unless
        # --aligned-polls: every machine then comes back in the wave the ramp made, as after a cloud restart
        wait_ms, first = 0, True
        while not self.stop:
            try:
                path = f"/device/v1/commands?wait_ms={wait_ms}"
                self.doing[i] = "first poll" if first else "long-poll"
                status, body = await conn.request("GET", path, headers=self._signed(mid, secret, "GET", path, b""),
                                                  held_ms=wait_ms)
                self.doing[i] = "handling"
                wait_ms = poll_wait_now_ms(POLL_WAIT_MS, self.rng)
                if first:
                    self.connected += 1
                    first = False
                    if not self.aligned_polls:
                        wait_ms = self.rng.randint(1_000, POLL_WAIT_MS)
                if status != 200:
                    what = f"poll {status} {body.get('error', '')}".strip()
                    self.errors[what] = self.errors.get(what, 0) + 1
                    await asyncio.sleep(1)
                    continue
                for cmd in body["commands"]:
                    if cmd["kind"] != "start":
                        continue
                    sid = cmd["session_id"]
                    self.got_at.setdefault(sid, time.perf_counter())
                    ack_path = f"/device/v1/commands/{cmd['command_id']}/ack"
                    ack = json.dumps({"ok": True}).encode()
                    st, _ = await conn.request("POST", ack_path, ack, self._signed(mid, secret, "POST", ack_path, ack))
                    if st != 200:
                        self.errors[f"ack {st}"] = self.errors.get(f"ack {st}", 0) + 1
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
                    self.ended.add(sid)
                    self.busy_users.discard(self.user_of.pop(sid, None))   # their session has ended
            except asyncio.CancelledError:
                raise
            except Exception as e:          # any failure is counted by its name; the machine goes on
                if self.stop:
                    break
                what = f"{type(e).__name__} on {conn.last}" + (
                    "" if isinstance(e, (ConnectionError, OSError, asyncio.IncompleteReadError)) else f": {e!r:.80}")
                self.errors[what] = self.errors.get(what, 0) + 1
                self.doing[i] = "reconnecting"
                conn.close()
                conn = Conn(self.machine_port(i))
                await asyncio.sleep(0.5)

    async def phone(self, rate: float, seconds: float) -> None:
        pools: dict[int, asyncio.Queue] = {}        # a pool of 16 keep-alive connections per address
        users = list(range(len(self.tokens)))
        busy_users = self.busy_users

        async def one(i: int, u: int) -> None:
            port, label = self.phone_port(i)
            if port not in pools:
                pools[port] = asyncio.Queue()
                for _ in range(16):
                    pools[port].put_nowait(Conn(port))
            free = pools[port]
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
                self.answered_s.append(time.perf_counter() - t0)
                if st == 200:                 # the command may reach the dispenser before this response
                    self.sent_at[res["session_id"]] = t0
                    self.label[res["session_id"]] = label
                    if res["session_id"] not in self.ended:
                        self.user_of[res["session_id"]] = u
                        u = -1                # still busy: released when the machine reports the end
                else:
                    self.errors[f"start {st} {res.get('error')}"] = self.errors.get(f"start {st} {res.get('error')}",
                                                                                   0) + 1
                    self.idle.add(i)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                what = f"{type(e).__name__} on {c.last}"
                self.errors[what] = self.errors.get(what, 0) + 1
                c = Conn(port)
            finally:
                free.put_nowait(c)
                busy_users.discard(u)

        end = time.perf_counter() + seconds
        tasks = []
        while (time.perf_counter() < end) if self.stop_phones is None else not self.stop_phones.is_set():
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
        i = random.randrange(len(self.machines))
        mid = self.machines[i][0]
        conn = Conn(self.machine_port(i))
        end = time.perf_counter() + seconds
        while not self.stop and ((time.perf_counter() < end) if self.stop_phones is None
                                 else not self.stop_phones.is_set()):
            t0 = time.perf_counter()
            try:
                st, _ = await conn.request("GET", f"/api/v1/machines/{mid}")
                if st == 200:
                    self.status_s.append(time.perf_counter() - t0)
                else:
                    self.errors[f"status {st}"] = self.errors.get(f"status {st}", 0) + 1
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                what = f"{type(e).__name__} on {conn.last}"
                self.errors[what] = self.errors.get(what, 0) + 1
                conn = Conn(self.machine_port(i))
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))


async def run(port: int, machines, tokens, rate: float, seconds: float, ramp_s: float, server_pid: int,
              watchers: int = 0, aligned_polls: bool = False) -> Bench:
    b = Bench(port, machines, tokens, aligned_polls=aligned_polls)
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


class RssSampler(threading.Thread):
    """The server's resident memory every ``every_s`` (for a long run: is it flat after warm-up?)."""

    def __init__(self, pid: int, every_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.halt = pid, every_s, threading.Event()
        self.points: list[tuple[float, float]] = []          # (s since start, MB)

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.wait(self.every_s):
            self.points.append((time.monotonic() - t0, rss_mb(self.pid)))

    def summary(self, sessions_per_s: float) -> str:
        """Growth per 1,000 sessions after warm-up (the first quarter of the run), over the rest, its first and
        its second half (least squares; the sessions' rate is steady, so time stands for sessions)."""
        from bench.bench_soak import slope
        pts = self.points[len(self.points) // 4:]
        if len(pts) < 6 or sessions_per_s <= 0:
            return "server RSS: too few samples for a trend (run longer)"
        mid = (pts[0][0] + pts[-1][0]) / 2
        per_k = [s * 1000 / sessions_per_s if s is not None else float("nan")
                 for s in (slope(pts), slope([q for q in pts if q[0] <= mid]), slope([q for q in pts if q[0] >= mid]))]
        return (f"server RSS {pts[0][1]:.1f} MB after warm-up, {pts[-1][1]:.1f} MB at the end; per 1,000 sessions "
                f"{per_k[0]:+.2f} MB (first half {per_k[1]:+.2f}, second half {per_k[2]:+.2f})")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_sessions(admin_url: str, name: str) -> int:
    """Connections opened to the bench's database so far (``pg_stat_database.sessions``): a pool that opens and
    closes connections under load makes PostgreSQL start a backend, and warm its caches, each time."""
    import psycopg
    with psycopg.connect(admin_url, autocommit=True) as c:
        row = c.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (name,)).fetchone()
    return int(row[0]) if row and row[0] is not None else -1


def postgres_cpu_seconds() -> float:
    """CPU of every PostgreSQL process on this machine (its backends, and those ended: counted to the server's
    main process when it reaped them); the bench's database shares the 2 cores with the rest."""
    total, tck = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        if name.startswith("postgres"):
            f = rest.split()
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / tck
    return total


def one_size(n: int, rate: float, seconds: float, watchers: int = 0, aligned_polls: bool = False) -> None:
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        machines, tokens = seed(data, n)
        port = free_port()
        server = start_cloud(data, port, preexec_fn=raise_fd_limit)
        memory = RssSampler(server.pid)
        try:
            srv0, gen0 = cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_SELF)
            memory.start()
            b = asyncio.run(run(port, machines, tokens, rate, seconds, ramp_s=max(2.0, n / 1000),
                                server_pid=server.pid, watchers=watchers, aligned_polls=aligned_polls))
            srv1, gen1 = cpu_seconds(server.pid), resource.getrusage(resource.RUSAGE_SELF)
        finally:
            memory.halt.set()
            stop_process(server)
        lat = sorted(b.got_at[s] - t0 for s, t0 in b.sent_at.items() if s in b.got_at)
        missing = sum(1 for s in b.sent_at if s not in b.got_at)
        q = (lambda f: lat[min(len(lat) - 1, int(len(lat) * f))] * 1000) if lat else (lambda f: float("nan"))
        gen_cpu = gen1.ru_utime + gen1.ru_stime - gen0.ru_utime - gen0.ru_stime
        print(f"N={n:>6}: {b.completed} sessions in {b.elapsed:.1f} s = {b.completed / b.elapsed:.1f}/s; "
              f"start->command p50 {q(.5):.1f} ms, p99 {q(.99):.1f} ms (n={len(lat)}, never received {missing}); "
              f"CPU server {srv1 - srv0:.1f} s, generator {gen_cpu:.1f} s; errors {b.errors or 'none'}")
        print("        " + memory.summary(b.completed / b.elapsed if b.elapsed else 0.0))
        if b.status_s:
            st = sorted(b.status_s)
            print(f"        status polls from {watchers} phones at machines (1/s each, alongside): {len(st)}, "
                  f"p50 {st[len(st) // 2] * 1000:.1f} ms, p99 {st[min(len(st) - 1, int(len(st) * .99))] * 1000:.1f} ms")


# ------------------------------------------------------------------ several instances behind HAProxy (issue 21)

MACHINES_PER_BALANCER = 9_000      # an HAProxy process holds two descriptors a connection; a process may have 20,000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generator(conn, machines, tokens, ports, rate: float, watchers: int, aligned_polls: bool,
              heartbeat_s: float = 0) -> None:
    """One load-generator process: its slice of the machines (machine i polls through balancer ports[i % len]),
    its own phones at ``rate``. Talks to the parent through ``conn``: ("connected", n); waits for "go"; runs the
    phones until "stop"; sends its figures; exits."""
    raise_fd_limit()

    async def go() -> dict:
        b = Bench(ports[0], machines, tokens, machine_port=lambda i: ports[i % len(ports)],
                  aligned_polls=aligned_polls)
        b.stop_phones = asyncio.Event()
        loop = asyncio.get_running_loop()
        tasks = []
        for i in range(len(machines)):
            tasks.append(asyncio.create_task(b.dispenser(i)))
            if i % 100 == 99:
                await asyncio.sleep(0.1)
        deadline = time.monotonic() + 120           # a machine not connected by then is reported, not waited for
        while b.connected < len(machines) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if heartbeat_s:
            tasks += [asyncio.create_task(b.heartbeats(i, heartbeat_s)) for i in range(len(machines))]
        doing: dict[str, int] = {}
        for what in b.doing.values():
            doing[what] = doing.get(what, 0) + 1
        conn.send(("connected", b.connected, dict(b.errors), doing))
        assert await loop.run_in_executor(None, conn.recv) == "go"
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        phones = asyncio.gather(b.phone(rate, 1e9), *(b.watcher(1e9) for _ in range(watchers)))
        assert await loop.run_in_executor(None, conn.recv) == "stop"
        b.stop_phones.set()
        await phones
        elapsed = time.perf_counter() - t0
        for _ in range(100):                      # the last commands reach their machines, the last reports land
            if all(sid in b.got_at for sid in b.sent_at) and len(b.idle) == len(machines):
                break
            await asyncio.sleep(0.1)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        errors_during = dict(b.errors)
        b.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return dict(lat=[b.got_at[sid] - t for sid, t in b.sent_at.items() if sid in b.got_at],
                    when=[(t, b.got_at[sid] - t) for sid, t in b.sent_at.items() if sid in b.got_at],
                    missing=sum(1 for sid in b.sent_at if sid not in b.got_at), started=len(b.sent_at),
                    completed=b.completed, elapsed=elapsed, errors=errors_during, status=b.status_s,
                    connected=b.connected, answered=b.answered_s,
                    cpu=cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime)

    conn.send(("result", asyncio.run(go())))


def cross_instance(fleet, machines, tokens, rate: float, seconds: float) -> dict[str, list[float]]:
    """Machine j polls instance j % n directly; each start goes directly to that instance (A->A) or to the next
    one (B->A), alternately: what delivery through the database's NOTIFY adds to delivery in one process."""
    ports = [inst.port for inst in fleet.instances]
    n = len(ports)
    turn = {"k": 0}

    def phone_port(i: int) -> tuple[int, str]:
        turn["k"] += 1
        a = i % n
        return (ports[a], "A->A") if turn["k"] % 2 else (ports[(a + 1) % n], "B->A")

    async def go() -> Bench:
        b = Bench(ports[0], machines, tokens, machine_port=lambda i: ports[i % n], phone_port=phone_port)
        tasks = [asyncio.create_task(b.dispenser(i)) for i in range(len(machines))]
        while b.connected < len(machines):
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)                  # every instance knows where they poll (presence, flushed each 1 s)
        await b.phone(rate, seconds)
        for _ in range(50):
            if all(sid in b.got_at for sid in b.sent_at):
                break
            await asyncio.sleep(0.1)
        b.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return b

    b = asyncio.run(go())
    out: dict[str, list[float]] = {"A->A": [], "B->A": []}
    for sid, t0 in b.sent_at.items():
        if sid in b.got_at:
            out[b.label[sid]].append(b.got_at[sid] - t0)
    out["missing"] = [sid for sid in b.sent_at if sid not in b.got_at]
    out["errors"] = b.errors
    return out


def haproxy_stats(fleet, balancer: int) -> list[dict[str, str]]:
    """HAProxy process ``balancer``'s ``show stat``: a row per frontend, backend and server."""
    text = fleet.runtime("show stat", balancer) or ""
    return [dict(zip(text.lstrip("# ").splitlines()[0].split(","), line.split(","), strict=False))
            for line in text.splitlines()[1:] if line.strip()] if text else []


def requests_answered(fleet) -> int:
    """HTTP requests the balancers have passed to the instances so far (HAProxy's req_tot of the backend)."""
    total = 0
    for b in range(fleet.n_balancers):
        rows = haproxy_stats(fleet, b)
        total += sum(int(r.get("req_tot") or 0) for r in rows
                     if r["pxname"] == "tapshare_cloud" and r["svname"] == "BACKEND")
    return total


def where_connections_are(fleet) -> str:
    """Where the machines' connections are: at each HAProxy process (held from the machines, open to each
    instance, queued for one) and at each instance (long-polls its hub holds)."""
    import requests
    parts = []
    for b in range(fleet.n_balancers):
        rows = haproxy_stats(fleet, b)
        front = sum(int(r["scur"] or 0) for r in rows if r["svname"] == "FRONTEND")
        servers = [f"{r['svname']} {r['scur']} (queued {r['qcur']}, checks failed {r['chkfail']}, down "
                   f"{r['chkdown']} times, connections opened {r.get('connect', '?')}, reused "
                   f"{r.get('reuse', '?')})" for r in rows
                   if r["pxname"] == "tapshare_cloud" and r["svname"] not in ("FRONTEND", "BACKEND")]
        parts.append(f"HAProxy {b + 1}: {front} from machines, to " + ", ".join(servers))
    for inst in fleet.instances:
        try:
            held = requests.get(inst.url + "/healthz", timeout=10).json()["connected_machines"]
        except (requests.RequestException, KeyError, ValueError) as e:
            held = f"? ({type(e).__name__})"
        parts.append(f"cloud{inst.index + 1} holds {held} polls")
    return "; ".join(parts)


def fleet_run(args, n: int) -> None:
    import multiprocessing as mp

    import psycopg

    from tests.fleetkit import CloudFleet
    admin_url = args.database_url or os.environ.get("TAPSHARE_TEST_POSTGRES_URL")
    if not admin_url:
        sys.exit("--instances needs PostgreSQL: --database-url (or TAPSHARE_TEST_POSTGRES_URL), a server where "
                 "the bench may CREATE DATABASE (it creates a fresh one and drops it at the end)")
    name = "bench_" + secrets.token_hex(5)
    plain_admin = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain_admin, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    balancers = args.balancers or max(1, -(-n // MACHINES_PER_BALANCER))
    gens = args.generators or max(1, -(-n // 7_000))
    env = {"TAPSHARE_SCANS_PER_MINUTE_PER_NETWORK": "100000000", "TAPSHARE_SCANS_PER_MINUTE_PER_MACHINE": "1000000",
           **({"TAPSHARE_ALARM_CHECK_INTERVAL_S": str(args.alarm_check_s)} if args.alarm_check_s else {})}
    try:
        with tempfile.TemporaryDirectory() as d, CloudFleet(Path(d), url, n=args.instances, env=env,
                                                              balancers=balancers, plain=True,
                                                              log_balancer=False) as fleet:
            box = SecretBox(bytes.fromhex(fleet.env["TAPSHARE_CLOUD_KEY"]))
            t_seed = time.perf_counter()
            machines, tokens = seed(Path(d), n, url, box)
            cross_m, cross_t = seed(Path(d), args.cross_machines, url, box, prefix="X",
                                    users=args.cross_machines)
            # each instance reads every machine's key once when it starts (as a running fleet's have): the
            # machines were written after the first start, and each instance would otherwise read each key
            # from the database at that machine's first request to it, a cost the real fleet does not pay
            for inst in fleet.instances:
                inst.stop()
                inst.start()
            fleet.wait_balanced()
            print(f"N={n:>6}, {args.instances} instances on PostgreSQL, {balancers} HAProxy process(es) (plain http "
                  f"frontends), {gens} generator processes; polls "
                  f"{'aligned by the ramp' if args.aligned_polls else 'spread'}; seeded in "
                  f"{time.perf_counter() - t_seed:.1f} s",
                  flush=True)
            ports = fleet.plain_ports
            ctx = mp.get_context("fork")
            pipes, procs = [], []
            for g in range(gens):
                idx = list(range(g, n, gens))                      # machine i: generator i % gens
                users = list(range(g, len(tokens), gens))
                parent_end, child_end = ctx.Pipe()
                # machine i polls through balancer i % balancers: keep that with the slice's own numbering
                my_ports = [ports[(g + k * gens) % balancers] for k in range(balancers)]
                proc = ctx.Process(target=generator, args=(child_end, [machines[i] for i in idx],
                                                           [tokens[u] for u in users], my_ports,
                                                           args.rate / gens, args.watchers // gens,
                                                           args.aligned_polls, args.heartbeat_s))
                proc.start()
                pipes.append(parent_end)
                procs.append(proc)
            t_ramp = time.perf_counter()
            hello = [pipe.recv() for pipe in pipes]
            held = sum(h[1] for h in hello)
            ramp = time.perf_counter() - t_ramp
            if held < n:
                print(f"        only {held} of {n} machines connected within 120 s; errors "
                      f"{[h[2] for h in hello]}; waiting for {[h[3] for h in hello]}", flush=True)
            time.sleep(3)
            print("        " + where_connections_are(fleet), flush=True)
            pids = [inst.proc.pid for inst in fleet.instances]
            hpids = [h.pid for h in fleet.haproxies]
            # idle: every machine holds its poll, nobody starts anything
            c0 = [cpu_seconds(pid) for pid in pids]
            h0 = [cpu_seconds(pid) for pid in hpids]
            pg0, r0, ps0 = postgres_cpu_seconds(), requests_answered(fleet), postgres_sessions(plain_admin, name)
            time.sleep(args.idle_seconds)
            c1 = [cpu_seconds(pid) for pid in pids]
            h1 = [cpu_seconds(pid) for pid in hpids]
            pg1, r1, ps1 = postgres_cpu_seconds(), requests_answered(fleet), postgres_sessions(plain_admin, name)
            idle_cores = sum(c1) - sum(c0)
            polls = max(r1 - r0, 1)
            print(f"        held {held} connections (ramp {ramp:.1f} s); idle {args.idle_seconds:.0f} s: instances "
                  f"{', '.join(f'{b - a:.2f}' for a, b in zip(c0, c1, strict=True))} CPU-s, "
                  f"{1000 * idle_cores / args.idle_seconds / max(held, 1):.4f} cores per 1,000 held connections; "
                  f"HAProxy {sum(h1) - sum(h0):.2f} CPU-s, PostgreSQL {pg1 - pg0:.2f} CPU-s; {r1 - r0} polls renewed "
                  f"= {(r1 - r0) / args.idle_seconds:.0f}/s, CPU-ms per poll: instances "
                  f"{1000 * idle_cores / polls:.2f}, HAProxy {1000 * (sum(h1) - sum(h0)) / polls:.2f}, PostgreSQL "
                  f"{1000 * (pg1 - pg0) / polls:.2f}; PostgreSQL connections opened {ps1 - ps0}", flush=True)
            for pipe in pipes:
                pipe.send("go")
            t0 = time.perf_counter()
            if args.timeline:                           # to line the timeline up with the system's own records
                print(f"        phones from {time.time():.3f} (Unix time; the timeline's second 0)", flush=True)
            lost_restart: list[str] = []
            before_restart = [0.0] * len(pids)        # CPU of the processes stopped, in this phase
            if args.rolling_restart:
                time.sleep(3)
                for inst in fleet.instances:
                    t_stop = time.perf_counter()
                    before_restart[inst.index] = cpu_seconds(inst.proc.pid) - c1[inst.index]
                    code = inst.stop()
                    stopped = time.perf_counter() - t_stop
                    inst.start(wait=False)
                    c1[inst.index] = 0.0              # the new process, counted from its start
                    inst.wait_healthy(60)
                    fleet.wait_balanced(60)
                    print(f"        restarted cloud{inst.index + 1}: SIGTERM -> exit {code} in {stopped:.1f} s, "
                          f"back in the balancer {time.perf_counter() - t_stop:.1f} s after the SIGTERM", flush=True)
                    time.sleep(3)
                if any(not inst.alive for inst in fleet.instances):
                    lost_restart.append("an instance did not come back")
            rest = args.seconds - (time.perf_counter() - t0)
            if rest > 0:
                time.sleep(rest)
            c2 = [cpu_seconds(inst.proc.pid) for inst in fleet.instances]
            pg2, ps2 = postgres_cpu_seconds(), postgres_sessions(plain_admin, name)
            h2 = [cpu_seconds(pid) for pid in hpids]
            rss = [rss_mb(inst.proc.pid) for inst in fleet.instances]
            print("        under load: " + where_connections_are(fleet), flush=True)
            hrss = [rss_mb(pid) for pid in hpids]
            for pipe in pipes:
                pipe.send("stop")
            results = [pipe.recv()[1] for pipe in pipes]
            for proc in procs:
                proc.join(30)
            # the first --warmup-seconds of starts after the instances started are reported on their own line
            when_all = sorted(x for r in results for x in r["when"])
            warm = [lat for sent, lat in when_all if sent - t0 < args.warmup_seconds]
            lat = sorted(lat for sent, lat in when_all if sent - t0 >= args.warmup_seconds)
            elapsed = max(r["elapsed"] for r in results)
            completed = sum(r["completed"] for r in results)
            started = sum(r["started"] for r in results)
            missing = sum(r["missing"] for r in results)
            errors: dict[str, int] = {}
            for r in results:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            q = (lambda f: pct(lat, f) * 1000) if lat else (lambda f: float("nan"))
            busy = [b - a + x for a, b, x in zip(c1, c2, before_restart, strict=True)]
            rolling = " (each instance: its old process until the SIGTERM, then the new one from its start)" \
                if args.rolling_restart else ""
            print(f"        {completed} sessions in {elapsed:.1f} s = {completed / elapsed:.1f}/s; start->command "
                  f"p50 {q(.5):.1f} ms, p95 {q(.95):.1f} ms, p99 {q(.99):.1f} ms (n={len(lat)}, started {started}, "
                  f"never received {missing}); errors {errors or 'none'}"
                  + (f"; starts sent in the first {args.warmup_seconds:g} s (the instances' first after their start) "
                     f"left out of these and counted here: n={len(warm)}, p50 {pct(sorted(warm), .5) * 1000:.1f} ms, "
                     f"p99 {pct(sorted(warm), .99) * 1000:.1f} ms" if warm else ""), flush=True)
            slow_at([(sent, x) for sent, x in when_all if sent - t0 >= args.warmup_seconds], t0, args.timeline)
            answered = sorted(x for r in results for x in r["answered"])
            if answered:      # where the time goes: the start itself, or the way of its command to the machine
                print(f"        the start's own answer to the phone: p50 {pct(answered, .5) * 1000:.1f} ms, p95 "
                      f"{pct(answered, .95) * 1000:.1f} ms, p99 {pct(answered, .99) * 1000:.1f} ms", flush=True)
            print(f"        CPU-s under load{rolling}: instances {', '.join(f'{x:.1f}' for x in busy)} = "
                  f"{sum(busy) / elapsed:.2f} cores, {1000 * sum(busy) / elapsed / max(held, 1):.4f} cores per "
                  f"1,000 held connections, {sum(busy) / max(completed, 1) * 1000:.1f} CPU-ms per session; HAProxy "
                  f"{sum(h2) - sum(h1):.1f} CPU-s; PostgreSQL {pg2 - pg1:.1f} CPU-s, connections opened {ps2 - ps1}; "
                  f"generators "
                  f"{sum(r['cpu'] for r in results):.1f} CPU-s", flush=True)
            print(f"        RSS: instances {', '.join(f'{x:.0f}' for x in rss)} MB; HAProxy "
                  f"{', '.join(f'{x:.0f}' for x in hrss)} MB", flush=True)
            if args.rolling_restart:
                print(f"        rolling restart of {len(fleet.instances)} instances under load: commands lost "
                      f"{missing}, requests failed {sum(errors.values())}"
                      + ("; " + "; ".join(lost_restart) if lost_restart else ""), flush=True)
            st = sorted(x for r in results for x in r["status"])
            if st:
                print(f"        status polls ({args.watchers} phones at 1/s): {len(st)}, "
                      f"p50 {pct(st, .5) * 1000:.1f} ms, p99 {pct(st, .99) * 1000:.1f} ms", flush=True)
            if args.cross_machines and not args.rolling_restart:
                cross = cross_instance(fleet, cross_m, cross_t, args.cross_rate, args.cross_seconds)
                aa, ba = sorted(cross["A->A"]), sorted(cross["B->A"])

                def fmt(xs):
                    return (f"p50 {pct(xs, .5) * 1000:.1f} ms, p99 {pct(xs, .99) * 1000:.1f} ms (n={len(xs)})"
                            if xs else "none")
                print(f"        cross-instance ({args.cross_machines} machines polling instances directly, "
                      f"{args.cross_rate:g} starts/s, the others idle): A->A {fmt(aa)}; B->A {fmt(ba)}; "
                      + (f"B->A adds {(pct(ba, .5) - pct(aa, .5)) * 1000:.1f} ms at p50; " if aa and ba else "")
                      + f"never received {len(cross['missing'])}; errors {cross['errors'] or 'none'}", flush=True)
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for log_file in Path(d).glob("*.log"):
                    shutil.copy(log_file, Path(args.keep_logs) / log_file.name)
    finally:
        with psycopg.connect(plain_admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def slow_at(when: list[tuple[float, float]], t0: float, timeline: str | None) -> None:
    """When the slowest 1 % of the starts were sent: spread over the run (the cores are short all the time) or
    bunched in a few seconds (something stalls: a collection, a job, a restart). ``timeline``: a CSV of every start
    (seconds into the run, start -> command ms)."""
    if not when:
        return
    if timeline:
        with open(timeline, "w") as f:
            f.write("sent_s,start_to_command_ms\n")
            f.writelines(f"{sent - t0:.3f},{lat * 1000:.1f}\n" for sent, lat in when)
    cut = pct(sorted(lat for _, lat in when), .99)
    seconds: dict[int, int] = {}
    for sent, lat in when:
        if lat >= cut:
            seconds[int(sent - t0)] = seconds.get(int(sent - t0), 0) + 1
    worst = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    print(f"        the slowest 1 % (>= {cut * 1000:.0f} ms, {sum(seconds.values())} starts) were sent in "
          f"{len(seconds)} different seconds of the run; most in second " +
          ", ".join(f"{s} ({k})" for s, k in worst) + (f"; every start: {timeline}" if timeline else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machines", type=int, nargs="+", default=[100, 1_000, 10_000])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rate", type=float, default=50, help="phone starts per second")
    ap.add_argument("--watchers", type=int, default=100,
                    help="phones standing at machines, polling the machine's status once a second")
    fl = ap.add_argument_group("several instances (issue 21)")
    fl.add_argument("--instances", type=int, default=0,
                    help="N cloud instances on PostgreSQL behind HAProxy (0: one process on SQLite, no balancer)")
    fl.add_argument("--database-url", help="a PostgreSQL server where the bench may create (and drop) a database; "
                                           "default TAPSHARE_TEST_POSTGRES_URL")
    ap.add_argument("--aligned-polls", action="store_true",
                    help="every machine's first long-poll held the whole 55 s, so the fleet comes back in the wave the "
                         "ramp made (as after a cloud restart); default: spread as a running fleet's are")
    fl.add_argument("--heartbeat-s", type=float, default=0,
                    help="each machine also sends a heartbeat this often, on its own connection (devices: 30)")
    fl.add_argument("--generators", type=int, default=0,
                    help="load-generator processes, each with a slice of the machines (default: one per 7,000)")
    fl.add_argument("--balancers", type=int, default=0,
                    help=f"HAProxy processes (default: one per {MACHINES_PER_BALANCER:,} machines)")
    fl.add_argument("--idle-seconds", type=float, default=10, help="CPU measured with every poll held, no starts")
    fl.add_argument("--cross-machines", type=int, default=60,
                    help="machines polling instances directly for the A->A / B->A measurement (0: skip)")
    fl.add_argument("--cross-rate", type=float, default=10)
    fl.add_argument("--cross-seconds", type=float, default=20)
    fl.add_argument("--alarm-check-s", type=float, default=0,
                    help="the instances' TAPSHARE_ALARM_CHECK_INTERVAL_S (0: the cloud's default, 5 s); a large value "
                         "shows what the operators' alarm rules cost the start->command latency")
    fl.add_argument("--timeline", help="write every start (seconds into the run, start -> command ms) to this CSV")
    fl.add_argument("--keep-logs", help="copy the instances' and balancers' logs into this folder at the end")
    fl.add_argument("--warmup-seconds", type=float, default=0,
                    help="the starts sent in the first W seconds of the phone phase (the instances' first starts "
                         "since they started) are reported on their own, not in the p50/p95/p99")
    fl.add_argument("--rolling-restart", action="store_true",
                    help="SIGTERM and restart every instance in turn during the phone phase")
    args = ap.parse_args()
    raise_fd_limit()
    for n in args.machines:
        if args.instances:
            fleet_run(args, n)
        else:
            one_size(n, args.rate, args.seconds, args.watchers, args.aligned_polls)


if __name__ == "__main__":
    main()
