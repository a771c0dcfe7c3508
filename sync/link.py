"""The dispenser's link to the cloud: commands in, acknowledgements, progress, reports and heartbeats out.

Network threads never touch the core or the UI: commands become events posted to the runtime's
queue; what the core does is observed through a runtime listener (called on the core thread, which
only enqueues). Threads:

* **commands**: syncs the clock, then long-polls. A start command is checked (this machine, its absolute
  deadline by the server-corrected clock, the machine free) and then *claimed* with the cloud before the
  core sees it: only a claim the cloud accepts becomes a grant, so the valve never opens for a session
  the cloud has voided. A command already handled (a redelivery) is not handled again. Cancel, price,
  out of service, in service and clear-lockout become their events. The machine is "online" (shows a
  QR, accepts grants) only after a time sync and while polls succeed.
* **replies**: tells the cloud when a claimed start did not pour after all (the core refused it, or its
  session row could not be written: ``session_start_failed``), acknowledges a clear-lockout once the
  core has decided (refused with the reason while the cause remains), other commands once posted; live
  progress about once a second while water flows (best effort).
* **outbox**: sends the ledger's pending reports in order, in batches, each with its event id as the
  idempotency key and its age; backs off with jitter on transient errors (honouring Retry-After);
  re-syncs the clock on 401s and retries; dead-letters a message the cloud rejects (4xx), visibly.
* **heartbeat**: telemetry every ``heartbeat_interval_ms``, including the open session (the cloud ends a
  session the machine no longer has as ``lost`` and releases its hold), the price on the screen and the
  consumables' use (the cloud's alarms say when a filter or UV lamp is due).

Every thread is supervised: an unexpected exception (a ledger read or write that failed, a bug) is
logged and the loop goes on after a backoff; a thread that fails ``THREAD_FAILURES_TO_LOCKOUT`` times in
a row puts the machine out of service (``fault:sync``) until it works again.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from pydantic import ValidationError

import contract as p
from kiosk.events import (
    Action,
    CancelReceived,
    ClearLockout,
    ClearSource,
    Fault,
    Grant,
    GrantReceived,
    LinkChanged,
    MachineSettings,
    OpenValve,
    PriceChanged,
    RecordEvent,
    SessionEnded,
    SetOutOfService,
    State,
    fault_lockout,
)
from kiosk.ledger import Ledger, LedgerError
from kiosk.maintenance import consumables
from kiosk.runtime import Runtime
from kiosk.session import Snapshot
from sync.client import AuthProblem, CloudClient, Rejected, SyncError, Transient

log = logging.getLogger("tapshare.sync")

THREAD_FAILURES_TO_LOCKOUT = 3
SYNC_LOCKOUT = fault_lockout("sync")
REMEMBERED_COMMANDS = 1_000        # command ids handled recently (a redelivery is not handled twice)
UNDECIDED_KEPT = 100               # starts and lockout clears waiting for the core's decision (in practice 0 or 1)
PROGRESS_QUEUED_MAX = 100          # live progress is dropped (best effort) while this many replies wait to be sent
CONSUMABLES_EVERY_MS = 600_000     # their use changes by the day: counted again for a heartbeat at most this often
CLAIM_TIMEOUT_S = 3.0
# each long-poll asks to be held between (1 - POLL_JITTER) and all of poll_wait_ms: a fleet that reconnected at
# once (a cloud instance restarted, a town's network came back) would otherwise come back in one wave every
# poll_wait_ms for ever; with the spread it is even again within a few polls
POLL_JITTER = 0.2


def poll_wait_now_ms(poll_wait_ms: int, rng: random.Random | None = None) -> int:
    """How long this poll asks to be held (a device's and the cloud benchmark's simulated ones)."""
    return int(poll_wait_ms * (1 - POLL_JITTER * (rng or random).random()))


class Backoff:
    """Exponential backoff with full jitter: base, 2x base, ... up to ``max_s``; reset on success."""

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.base_s, self.max_s, self.attempt = base_s, max_s, 0
        self._rng = rng or random.Random()

    def next_delay(self, retry_after_s: float | None = None) -> float:
        cap = min(self.max_s, self.base_s * 2 ** self.attempt)
        self.attempt += 1
        delay = self._rng.uniform(0, cap)
        return max(delay, retry_after_s or 0.0)

    def reset(self) -> None:
        self.attempt = 0


class SyncLink:
    def __init__(self, runtime: Runtime, client: CloudClient, ledger: Ledger, *, software_version: str,
                 poll_wait_ms: int = 55_000, heartbeat_interval_ms: int = 30_000, batch_size: int = 100,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0, link_lost_after_ms: int = 15_000,
                 progress_interval_ms: int = 1_000, mono_ms: Callable[[], int] | None = None) -> None:
        self.rt, self.client, self.ledger = runtime, client, ledger
        self.software_version = software_version
        self.poll_wait_ms, self.heartbeat_interval_ms = poll_wait_ms, heartbeat_interval_ms
        self.batch_size = batch_size
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.link_lost_after_ms, self.progress_interval_ms = link_lost_after_ms, progress_interval_ms
        self._mono = mono_ms or (lambda: time.monotonic_ns() // 1_000_000)
        self._halt = threading.Event()
        self._outbox_wake = threading.Event()
        self._heartbeat_now = threading.Event()
        self._service_state: tuple | None = None
        self._replies: queue.Queue = queue.Queue()
        self._start_commands: dict[str, str] = {}     # session id -> command id of its claimed start
        self._clear_commands: dict[str, str] = {}     # command id -> kind, acknowledged once the core decided
        self._handled: OrderedDict[str, None] = OrderedDict()
        self._failures: dict[str, int] = {}
        self._failures_lock = threading.Lock()
        self._online = False
        self._settings: p.MachineSettingsMsg | None = None
        self._last_ok_mono: int | None = None
        self._last_progress_mono = 0
        self.sent = 0
        self.dead = 0
        self._started_mono = self._mono()
        self._consumables: tuple[int, list[p.ConsumableMsg] | None] | None = None     # (counted at, counts)
        self.updater = None               # sync.updater.Updater: told of each accepted heartbeat and its offer
        self._threads = [threading.Thread(target=self._supervised, args=(name, body), name=f"sync-{name}", daemon=True)
                         for name, body in (("commands", self._commands_loop), ("replies", self._replies_loop),
                                            ("outbox", self._outbox_loop), ("heartbeat", self._heartbeat_loop))]
        runtime.listeners.append(self._observe)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 5.0, flush_s: float = 0.0) -> None:
        """Stop the threads; first give the outbox up to ``flush_s`` to drain (what is left is sent after
        the next start: it is on disk)."""
        deadline = time.monotonic() + flush_s
        while flush_s and time.monotonic() < deadline and self.client.time_synced:
            try:
                if self.ledger.outbox_depth() == 0:
                    break
            except Exception:
                break
            self._outbox_wake.set()
            time.sleep(0.05)
        self._halt.set()
        self._outbox_wake.set()
        self._heartbeat_now.set()
        self._replies.put(None)
        for t in self._threads:
            t.join(timeout_s)

    # ------------------------------------------------------------------ supervision
    def _supervised(self, name: str, body: Callable[[], None]) -> None:
        """Run a thread's loop; if it raises, log, back off and run it again (never give up while running)."""
        backoff = Backoff(min(self.backoff_base_s, 1.0), min(self.backoff_max_s, 30.0))
        while not self._halt.is_set():
            try:
                body()
                return                                     # the loop returned: we are stopping
            except Exception as e:
                n = self._thread_failed(name, e)
                delay = backoff.next_delay()
                log.exception("sync thread %s failed (%d in a row); again in %.1f s", name, n, delay)
                self._halt.wait(delay)

    def _thread_failed(self, name: str, e: Exception) -> int:
        with self._failures_lock:
            n = self._failures[name] = self._failures.get(name, 0) + 1
        if n == THREAD_FAILURES_TO_LOCKOUT:
            self.rt.post(Fault("sync", f"the {name} link thread keeps failing: {type(e).__name__}: {e}"[:300]))
        return n

    def _thread_ok(self, name: str) -> None:
        """A loop iteration worked: forget its failures (and lift the lockout if it was the cause)."""
        if not self._failures.get(name):
            return
        with self._failures_lock:
            was = self._failures.pop(name, 0)
            still = any(n >= THREAD_FAILURES_TO_LOCKOUT for n in self._failures.values())
        if was >= THREAD_FAILURES_TO_LOCKOUT and not still:
            log.warning("sync thread %s works again", name)
            self.rt.post(ClearLockout(SYNC_LOCKOUT, ClearSource.AUTO, actor=f"sync-{name}"))

    def collection_sizes(self) -> dict[str, int]:
        """How full the link's long-lived collections are (diagnostics; README, "Bounded resources")."""
        return {"handled_commands": len(self._handled), "start_commands": len(self._start_commands),
                "clear_commands": len(self._clear_commands), "replies_queued": self._replies.qsize(),
                "thread_failures": len(self._failures)}

    @property
    def thread_failures(self) -> dict[str, int]:
        return dict(self._failures)

    @property
    def last_ok_mono(self) -> int | None:
        """When the cloud last answered (monotonic ms), or None."""
        return self._last_ok_mono

    def wake_outbox(self) -> None:
        self._outbox_wake.set()

    # ------------------------------------------------------------------ QR
    def current_qr_url(self, public_url: str) -> str | None:
        """The QR payload now, or ``None`` while offline (the screen shows "offline" instead of a QR
        that cannot work). Computed on the device from its secret and the synced clock."""
        if not self._online or not self.client.time_synced:
            return None
        code = p.qr_code(self.client.secret, self.client.machine_id, self.client.server_now_ms() // 1000)
        return p.qr_url(public_url, self.client.machine_id, code)

    # ------------------------------------------------------------------ link state
    def _set_online(self, online: bool) -> None:
        if online != self._online:
            self._online = online
            log.warning("cloud link %s", "up" if online else "DOWN: no new sessions until it returns")
            self.rt.post(LinkChanged(online))

    def _ok(self) -> None:
        self._last_ok_mono = self._mono()
        self._set_online(True)

    def _failed(self) -> None:
        last = self._last_ok_mono
        if last is None or self._mono() - last > self.link_lost_after_ms:
            self._set_online(False)

    # ------------------------------------------------------------------ commands
    def _commands_loop(self) -> None:
        backoff = Backoff(self.backoff_base_s, self.backoff_max_s)
        while not self._halt.is_set():
            try:
                if not self.client.time_synced:
                    self.client.sync_time()
                commands = self.client.poll(poll_wait_now_ms(self.poll_wait_ms))
                self._ok()
                backoff.reset()
                for cmd in commands:
                    self._dispatch(cmd)
                if commands:                   # handling commands is its work: an empty poll proves nothing...
                    self._thread_ok("commands")
                elif self._failures.get("commands"):
                    self.ledger.session("-")    # ...but after failures, the read it needs working again does
                    self._thread_ok("commands")
            except AuthProblem as e:
                self._failed()
                log.warning("poll refused (%s): re-syncing the clock", e.code)
                self._resync()
                self._halt.wait(backoff.next_delay())
            except Transient as e:
                self._failed()
                delay = backoff.next_delay(e.retry_after_s)
                log.info("poll failed (%s); retrying in %.1f s", e, delay)
                self._halt.wait(delay)
            except (Rejected, SyncError, ValueError) as e:
                self._failed()
                log.error("poll rejected: %s", e)
                self._halt.wait(backoff.next_delay())

    def _resync(self) -> None:
        try:
            self.client.sync_time()
        except SyncError as e:
            log.info("time sync failed: %s", e)

    def _dispatch(self, cmd: p.CommandMsg) -> None:
        if cmd.command_id in self._handled:
            log.info("command %s %s delivered again: already handled", cmd.kind, cmd.command_id)
            return
        self._handled[cmd.command_id] = None
        while len(self._handled) > REMEMBERED_COMMANDS:
            self._handled.popitem(last=False)
        log.info("command %s %s", cmd.kind, cmd.command_id)
        if cmd.kind is p.CommandKind.START:
            try:
                self._start(cmd)
            except Exception:
                self._handled.pop(cmd.command_id, None)      # not handled after all: a redelivery may try again
                raise
            return
        if cmd.kind in (p.CommandKind.IN_SERVICE, p.CommandKind.CLEAR_LOCKOUT):
            reason = "operator" if cmd.kind is p.CommandKind.IN_SERVICE else cmd.reason
            self._clear_commands[cmd.command_id] = reason
            _keep_newest(self._clear_commands, UNDECIDED_KEPT)
            self.rt.post(ClearLockout(reason, ClearSource.REMOTE, actor="cloud", ref=cmd.command_id))
            return                        # acknowledged when the core has decided (see _observe)
        event = {
            p.CommandKind.CANCEL: lambda: CancelReceived(cmd.session_id or "", cmd.reason or "cloud"),
            p.CommandKind.PRICE: lambda: PriceChanged(cmd.price_fen_per_l if cmd.price_fen_per_l is not None else -1),
            p.CommandKind.OUT_OF_SERVICE: lambda: SetOutOfService(cmd.detail),
        }.get(cmd.kind)
        if event is None:
            self._replies.put(("ack", cmd.command_id, False, f"unsupported command {cmd.kind}"))
            return
        self.rt.post(event())
        self._replies.put(("ack", cmd.command_id, True, ""))

    def _start(self, cmd: p.CommandMsg) -> None:
        """Check a start, claim it with the cloud, and only then hand the grant to the core."""
        g = cmd.grant
        if g is None or g.machine_id != self.client.machine_id:
            self._replies.put(("ack", cmd.command_id, False, "wrong_machine"))
            return
        if self.rt.core.session_id == g.session_id or g.session_id in self._start_commands \
                or self.ledger.session(g.session_id) is not None:
            log.info("start %s delivered again: session %s is already here", cmd.command_id, g.session_id)
            return
        left_ms = g.deadline_ms - self.client.server_now_ms()
        if not self.client.time_synced or left_ms <= 0:
            log.warning("start %s arrived %d ms after its deadline: refused", cmd.command_id, -left_ms)
            self._replies.put(("ack", cmd.command_id, False, "expired"))
            return
        snap = self.rt.snapshot
        # refused before the claim (the core checks again after it). Not for "offline": a command just came, so
        # the link is up, and the core hears so (LinkChanged is queued ahead of the grant) before the grant
        if snap.state not in (State.IDLE, State.RECEIPT, State.OFFLINE):
            self._replies.put(("ack", cmd.command_id, False, _REFUSAL.get(snap.state, snap.state.value)))
            return
        result = self._claim(cmd.command_id, g.deadline_ms)
        if result is None:
            return
        if result.session_state != "active":
            log.warning("start %s not claimed: the session is %s", cmd.command_id, result.session_state)
            return
        self._start_commands[g.session_id] = cmd.command_id
        _keep_newest(self._start_commands, UNDECIDED_KEPT)
        left_ms = max(1_000, g.deadline_ms - self.client.server_now_ms())
        self.rt.post(GrantReceived(Grant(
            session_id=g.session_id, machine_id=g.machine_id, user_ref=g.user_ref,
            price_fen_per_l=g.price_fen_per_l, credit_limit_fen=g.credit_limit_fen,
            max_volume_ml=g.max_volume_ml, max_duration_ms=g.max_duration_ms, max_idle_ms=g.max_idle_ms,
            expires_at_ms=self.rt.clock.monotonic_ms() + left_ms, min_dispense_ml=g.min_dispense_ml,
            balance_fen=g.balance_fen)))

    def _claim(self, command_id: str, deadline_ms: int) -> p.AckResult | None:
        """Claim a start, retrying lost answers (the claim is idempotent) until the grant's deadline. ``None``:
        not claimed, never pour. (If a claim did land unseen, the next heartbeat tells the cloud this machine
        has no such session, and the cloud ends it as lost and releases its hold.)"""
        backoff = Backoff(0.05, 0.5)
        while not self._halt.is_set():
            left_s = (deadline_ms - self.client.server_now_ms()) / 1000
            if left_s <= 0:
                log.warning("start %s not claimed by its deadline: not pouring", command_id)
                return None
            try:
                return self.client.ack(command_id, True, "claim", timeout_s=min(CLAIM_TIMEOUT_S, left_s + 0.5))
            except Rejected as e:
                log.warning("start %s not claimed, the cloud refused: %s", command_id, e)
                return None
            except AuthProblem:
                self._resync()
            except SyncError as e:
                log.info("claim of %s failed (%s): trying again", command_id, e)
            self._halt.wait(min(backoff.next_delay(), max(0.0, left_s)))
        return None

    # ------------------------------------------------------------------ observing the core (core thread)
    def _observe(self, snap: Snapshot, actions: list[Action]) -> None:
        """Called with the actions the runtime carried out (an OpenValve here means the valve did open)."""
        for a in actions:
            if isinstance(a, OpenValve):
                self._start_commands.pop(a.session_id, None)      # claimed and pouring: nothing more to say
            elif isinstance(a, RecordEvent) and a.kind in ("grant_rejected", "session_start_failed"):
                cid = self._start_commands.pop(str(a.detail.get("session_id")), None)
                if cid and a.kind is p.EventKind.GRANT_REJECTED:
                    self._replies.put(("ack", cid, False, str(a.detail.get("reason"))))
                elif cid:
                    self._replies.put(("ack", cid, False, p.START_FAILED, str(a.detail.get("detail", ""))))
            elif isinstance(a, RecordEvent) and a.kind in _CLEAR_OUTCOMES and a.detail.get("ref"):
                cid = str(a.detail["ref"])
                if self._clear_commands.pop(cid, None) is not None:
                    ok = a.kind in (p.EventKind.LOCKOUT_CLEARED, p.EventKind.LOCKOUT_CLEAR_IGNORED)
                    self._replies.put(("ack", cid, ok, "" if ok else "refused", str(a.detail.get("why", ""))))
            if isinstance(a, SessionEnded) or (isinstance(a, RecordEvent) and a.report):
                self._outbox_wake.set()
        # a change the phone must see at once (out of service, maintenance, back in service, lockouts): a heartbeat
        # now, not up to a heartbeat interval later
        resting = snap.state if snap.state in (State.IDLE, State.OFFLINE, State.OUT_OF_SERVICE,
                                               State.MAINTENANCE, State.UPDATING) else "busy"
        service = (resting, snap.lockouts)
        if service != self._service_state:
            first, self._service_state = self._service_state is None, service
            if not first:
                self._heartbeat_now.set()
        if snap.state is State.DISPENSING and snap.session_id:
            now = self._mono()
            if now - self._last_progress_mono >= self.progress_interval_ms \
                    and self._replies.qsize() < PROGRESS_QUEUED_MAX:
                self._last_progress_mono = now
                self._replies.put(("progress", p.ProgressMsg(
                    session_id=snap.session_id, volume_ml=snap.volume_ml, cost_fen=snap.cost_fen,
                    flow_ml_per_min=snap.flow_ml_per_min, elapsed_ms=min(snap.elapsed_ms, 86_400_000))))

    def _replies_loop(self) -> None:
        while not self._halt.is_set():
            job = self._replies.get()
            if job is None:
                return
            if job[0] == "ack":
                self._ack(*job[1:])
            else:
                try:
                    self.client.progress(job[1])          # best effort: a lost progress message is fine
                except SyncError as e:
                    log.debug("progress not sent: %s", e)
            self._thread_ok("replies")

    def _ack(self, command_id: str, ok: bool, reason: str, detail: str = "") -> None:
        backoff = Backoff(0.05, 1.0)
        for _ in range(8):
            try:
                self.client.ack(command_id, ok, reason, detail)
                return
            except AuthProblem:
                self._resync()
            except Transient:
                pass
            except Rejected as e:
                log.warning("ack %s refused: %s", command_id, e)
                return
            if self._halt.wait(backoff.next_delay()):
                return
        log.error("could not acknowledge command %s", command_id)

    # ------------------------------------------------------------------ outbox
    def _outbox_loop(self) -> None:
        backoff = Backoff(self.backoff_base_s, self.backoff_max_s)
        while not self._halt.is_set():
            rows = self.ledger.outbox("pending", limit=self.batch_size)     # a failure here is supervised
            if not rows:
                self._outbox_wake.wait(1.0)
                self._outbox_wake.clear()
                continue
            if not self.client.time_synced:
                self._halt.wait(0.2)
                continue
            try:
                self._send_batch(rows)
                backoff.reset()
                self._thread_ok("outbox")
            except AuthProblem as e:
                log.warning("reports refused (%s): re-syncing the clock and retrying", e.code)
                self._resync()
                self._halt.wait(backoff.next_delay())
            except Transient as e:
                delay = backoff.next_delay(e.retry_after_s)
                log.info("reports not sent (%s); %d waiting; retrying in %.1f s", e, len(rows), delay)
                self._halt.wait(delay)

    def _event(self, row: dict) -> dict:
        """The report as sent. Its age is measured on the monotonic clock when it was written in this boot (a
        wall clock stepped by time sync in between does not move it), else on the wall clock."""
        if row.get("created_boot_id") == self.ledger.boot_id and row.get("created_mono_ms") is not None:
            age = self.rt.clock.monotonic_ms() - row["created_mono_ms"]
        else:
            age = self.rt.clock.wall_ms() - row["created_wall_ms"]
        return {"event_id": row["event_id"], "kind": row["kind"], "payload": row["payload"],
                "age_ms": min(max(0, age), 10 * 365 * 86_400_000)}

    def _send_batch(self, rows: list[dict]) -> None:
        valid = []
        for r in rows:
            try:
                p.report_payload(r["kind"], r["payload"])
                valid.append(r)
            except ValueError as e:           # a report this software wrote but the protocol refuses: a bug
                why = e.errors()[0] if isinstance(e, ValidationError) else str(e)
                self._dead(r["event_id"], f"does not match the protocol, not sent: {why}"[:500])
        rows = valid
        if not rows:
            return
        try:
            results = self.client.send_events([self._event(r) for r in rows])
        except Rejected as e:
            if len(rows) == 1:
                self._dead(rows[0]["event_id"], str(e))
                return
            for row in rows:                   # find the one the cloud cannot accept; send the rest
                self._send_batch([row])
            return
        sent = [r.event_id for r in results if r.status in ("accepted", "duplicate")]
        if sent:
            self.ledger.mark_sent(sent)
            self.sent += len(sent)
        for r in results:
            if r.status == "rejected":
                self._dead(r.event_id, r.detail)

    def _dead(self, event_id: str, error: str) -> None:
        log.error("report %s rejected by the cloud, dead-lettered: %s", event_id, error)
        self.ledger.mark_dead(event_id, error[:500])
        self.dead += 1

    # ------------------------------------------------------------------ heartbeat
    def heartbeat_msg(self) -> p.HeartbeatMsg:
        snap = self.rt.snapshot
        return p.HeartbeatMsg(
            state=snap.state.value, session_id=snap.session_id, valve_open=self.rt.valve.is_open,
            temp_c=snap.temp_c, tds_ppm=snap.tds_ppm if snap.tds_measured else None,
            outbox_depth=self.ledger.outbox_depth(), dead_letters=self.ledger.outbox_depth("dead"),
            totalizer_pulses=self.ledger.totalizer_pulses(), lockouts=list(snap.lockouts)[:20],
            software_version=self.software_version, boot_id=self.ledger.boot_id,
            uptime_s=(self._mono() - self._started_mono) // 1000, consumables=self._consumable_use(),
            price_fen_per_l=snap.display_price_fen_per_l)

    def _consumable_use(self) -> list[p.ConsumableMsg] | None:
        """The filter's and UV lamp's use as the maintenance screen counts it (the operators' alarms say when one
        is due), counted again at most every ``CONSUMABLES_EVERY_MS``. ``None`` while the ledger cannot say: the
        heartbeat goes anyway."""
        now = self._mono()
        if self._consumables is None or now - self._consumables[0] >= CONSUMABLES_EVERY_MS:
            try:
                used = consumables(self.rt.cfg.maintenance, self.ledger, self.rt.snapshot.milli_pulses_per_litre,
                                   self.rt.clock.wall_ms())
                counts = [p.ConsumableMsg(kind=c.kind, used_l=c.used_l, life_l=c.life_l, used_days=c.used_days,
                                          life_days=c.life_days, used_permille=c.used_permille, due=c.warn)
                          for c in used]
            except (LedgerError, ValueError) as e:
                log.warning("consumables not counted for the heartbeat: %s", e)
                counts = None
            self._consumables = (now, counts)
        return self._consumables[1]

    def _heartbeat_loop(self) -> None:
        """A heartbeat as soon as the clock is synced, then every interval. A signed request that succeeds
        proves the link: the machine is online without waiting for the first long-poll to come back."""
        while not self._halt.is_set():
            wait_s = 0.5
            if self.client.time_synced:
                wait_s = self.heartbeat_interval_ms / 1000
                try:
                    answer = self.client.heartbeat_answer(self.heartbeat_msg())
                    settings = answer.settings if answer is not None else None
                    if self.updater is not None:
                        self.updater.heartbeat_accepted()
                        self.updater.offer(answer.update if answer is not None else None)
                    if settings is not None and settings != self._settings:
                        self._settings = settings        # before the link is up: the QR never shows a stale price
                        self.rt.post(MachineSettings(settings.price_fen_per_l, settings.timezone, settings.hotline))
                    self._ok()
                except AuthProblem:
                    self._resync()
                except SyncError as e:
                    log.info("heartbeat not sent: %s", e)
                self._thread_ok("heartbeat")
            if self._heartbeat_now.wait(wait_s):
                self._heartbeat_now.clear()        # the machine's service state changed: tell the cloud now


def _keep_newest(table: dict, n: int) -> None:
    """Forget the oldest entries beyond ``n`` (a dict keeps insertion order)."""
    while len(table) > n:
        table.pop(next(iter(table)))


_REFUSAL = {State.DISPENSING: "busy", State.SETTLING: "busy", State.RECEIPT: "busy",
            State.OUT_OF_SERVICE: "out_of_service", State.MAINTENANCE: "maintenance", State.OFFLINE: "offline",
            State.UPDATING: "updating"}
_CLEAR_OUTCOMES = (p.EventKind.LOCKOUT_CLEARED, p.EventKind.LOCKOUT_CLEAR_REFUSED, p.EventKind.LOCKOUT_CLEAR_IGNORED)
