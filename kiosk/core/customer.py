"""A customer's session, from grant to receipt (:class:`CustomerSession`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from contract.events import EventKind
from kiosk.core.alarms import WaterReadings
from kiosk.core.meter import PulseMeter
from kiosk.core.settings import CoreSettings
from kiosk.events import (
    Action,
    Checkpoint,
    CloseValve,
    EndReason,
    Grant,
    OpenValve,
    RecordEvent,
    SessionEnded,
    SessionRecord,
    SessionStarted,
    State,
)

FLOW_WINDOW_MS = 1_000          # flow rate shown on screen is averaged over this window
REJECTION_SHOWN_MS = 10_000     # how long a refused start's reason stays on the screen
SEEN_SESSION_IDS = 10_000       # how many past session ids are remembered to refuse a replayed grant


@dataclass
class _Session:
    """One customer's session while the valve is open and while its overrun settles: the grant clamped to the
    machine's hard limits, and the pulses counted so far."""

    grant: Grant
    price_fen_per_l: int
    credit_limit_fen: int
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    limit_pulses: int
    limit_reason: EndReason
    started_ms: int
    temp_start_c: float | None
    min_dispense_ml: int
    billed_pulses: int = 0
    overrun_pulses: int = 0
    last_flow_ms: int = 0
    checkpoint_ms: int = 0
    checkpointed: tuple[int, int] = (0, 0)
    closed_ms: int | None = None
    close_reason: EndReason | None = None

    @classmethod
    def for_grant(cls, g: Grant, st: CoreSettings, now_ms: int, temp_c: float | None) -> _Session:
        """The session a grant allows on this machine: its limits clamped to the machine's, and the pulse count
        at which the valve closes (by credit or by volume, whichever comes first)."""
        cal = st.calibration
        credit_fen = min(g.credit_limit_fen, st.max_credit_fen)
        max_volume_ml = min(g.max_volume_ml, st.max_volume_ml)
        by_volume = cal.max_pulses_for_volume(max_volume_ml)
        by_credit = cal.max_pulses_for_credit(credit_fen, g.price_fen_per_l)
        if by_credit is not None and by_credit < by_volume:
            limit, limit_reason = by_credit, EndReason.CREDIT_EXHAUSTED
        else:
            limit, limit_reason = by_volume, EndReason.MAX_VOLUME
        return cls(grant=g, price_fen_per_l=g.price_fen_per_l, credit_limit_fen=credit_fen,
                   max_volume_ml=max_volume_ml, max_duration_ms=min(g.max_duration_ms, st.max_duration_ms),
                   max_idle_ms=min(g.max_idle_ms, st.max_idle_ms), limit_pulses=limit, limit_reason=limit_reason,
                   started_ms=now_ms, temp_start_c=temp_c,
                   min_dispense_ml=g.min_dispense_ml if g.min_dispense_ml is not None else st.min_dispense_ml,
                   last_flow_ms=now_ms, checkpoint_ms=now_ms)


class SeenSessions:
    """The last ``SEEN_SESSION_IDS`` session ids started here, to refuse a replayed grant."""

    def __init__(self, session_ids: tuple[str, ...] | list[str] = ()) -> None:
        self._order: deque[str] = deque(maxlen=SEEN_SESSION_IDS)
        self._ids: set[str] = set()
        for session_id in session_ids:
            self.add(session_id)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, session_id: str) -> None:
        if len(self._order) == self._order.maxlen:
            self._ids.discard(self._order[0])
        self._order.append(session_id)
        self._ids.add(session_id)


class Refusal:
    """Why the last start was refused. It is shown to the person it concerns: for ``REJECTION_SHOWN_MS``, and
    only while the machine stays in the state it was refused in (the next customer never sees it)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._at_ms = 0
        self._state: State | None = None

    def note(self, reason: str, now_ms: int, state: State) -> None:
        self.reason, self._at_ms, self._state = reason, now_ms, state

    def shown(self, now_ms: int, state: State) -> str | None:
        if self.reason is None or now_ms - self._at_ms > REJECTION_SHOWN_MS or state is not self._state:
            return None
        return self.reason


class CustomerSession:
    """A customer's session, in phases: DISPENSING (the valve is open and pulses are billed up to the credit or
    volume limit), SETTLING (the valve has closed; pulses within ``overrun_window_ms`` are overrun, recorded but
    not billed), then RECEIPT (the bill is final and shown for ``receipt_display_ms``). ``phase`` is None when no
    customer is at the machine.

    Owns the checks on a grant itself (the machine's own reasons to refuse are the core's), the replay guard, the
    refusal shown on screen, the checkpoints written while the water flows and the bill."""

    def __init__(self, settings: CoreSettings, meter: PulseMeter, readings: WaterReadings,
                 seen_session_ids: tuple[str, ...] | list[str] = ()) -> None:
        self.settings = settings
        self.phase: State | None = None
        self.current: _Session | None = None          # while DISPENSING or SETTLING
        self.refusal = Refusal()
        self._meter = meter
        self._readings = readings
        self._seen = SeenSessions(seen_session_ids)
        self._receipt: SessionRecord | None = None
        self._receipt_balance_fen: int | None = None
        self._receipt_until_ms = 0
        self._flow_samples: deque[tuple[int, int]] = deque()   # (ms, pulses so far) for the flow rate shown

    @property
    def dispensing(self) -> bool:
        return self.phase is State.DISPENSING

    @property
    def busy(self) -> bool:
        """A session is running: the valve is open, or its overrun is settling."""
        return self.phase in (State.DISPENSING, State.SETTLING)

    def collection_sizes(self) -> dict[str, int]:
        """How full the long-lived collections are (for diagnostics: each has a bound)."""
        return {"seen_session_ids": len(self._seen), "flow_samples": len(self._flow_samples)}

    # ------------------------------------------------------------------ start
    def grant_problem(self, g: Grant, now_ms: int, display_price_fen_per_l: int) -> str | None:
        """What is wrong with the grant itself, if anything (checked once the machine could take a session)."""
        if g.machine_id != self.settings.machine_id:
            return "wrong_machine"
        if not g.session_id or g.session_id in self._seen:
            return "duplicate_session"
        if now_ms > g.expires_at_ms:
            return "expired"
        numbers = (g.price_fen_per_l, g.credit_limit_fen, g.max_volume_ml, g.max_duration_ms, g.max_idle_ms)
        if any(not isinstance(n, int) or isinstance(n, bool) for n in numbers) or g.price_fen_per_l < 0 \
                or g.credit_limit_fen < 0 or min(g.max_volume_ml, g.max_duration_ms, g.max_idle_ms) <= 0:
            return "invalid_grant"
        if g.price_fen_per_l != display_price_fen_per_l:
            return "price_changed"            # the price on the screen is the price charged, or nothing is
        return None

    def refuse(self, g: Grant, reason: str, now_ms: int, state: State) -> list[Action]:
        self.refusal.note(reason, now_ms, state)
        return [RecordEvent.of(EventKind.GRANT_REJECTED, session_id=g.session_id, reason=reason)]

    def start(self, g: Grant, now_ms: int, state: State) -> list[Action]:
        """Start a checked grant's session: its row first (``SessionStarted``), then the valve opens."""
        st, cal = self.settings, self.settings.calibration
        s = _Session.for_grant(g, st, now_ms, self._readings.temp_c)
        if (g.price_fen_per_l > 0 and s.credit_limit_fen <= 0) or s.limit_pulses <= 0 \
                or cal.volume_ml(s.limit_pulses) < s.min_dispense_ml:
            # not even the minimum dispense is affordable: tell the user to top up (s5), pour nothing
            return self.refuse(g, "insufficient_credit", now_ms, state)
        self._seen.add(g.session_id)
        self.refusal.reason = None
        self.current, self.phase, self._receipt = s, State.DISPENSING, None
        self._flow_samples.clear()
        self._flow_samples.append((now_ms, 0))
        actions: list[Action] = self._meter.flush(now_ms, force=True)
        actions += [
            SessionStarted(session_id=g.session_id, user_ref=g.user_ref, price_fen_per_l=s.price_fen_per_l,
                           credit_limit_fen=s.credit_limit_fen, max_volume_ml=s.max_volume_ml,
                           max_duration_ms=s.max_duration_ms, max_idle_ms=s.max_idle_ms, limit_pulses=s.limit_pulses,
                           milli_pulses_per_litre=cal.milli_pulses_per_litre, min_dispense_ml=s.min_dispense_ml,
                           started_mono_ms=now_ms, temp_c=self._readings.temp_c),
            OpenValve(g.session_id, close_at_total_pulses=self._meter.close_at(s.limit_pulses)),
        ]
        return actions

    def start_failed(self, session_id: str) -> None:
        """The session's row could not be written: it never poured, so it ends with no bill and no receipt."""
        if self.dispensing and self.current is not None and self.current.grant.session_id == session_id:
            self.current, self.phase = None, None

    # ------------------------------------------------------------------ while it runs
    def on_pulses(self, pulses: int, now_ms: int) -> list[Action]:
        """Bill new pulses up to the limit (the rest is overrun), closing at the limit; after the close, overrun."""
        s = self.current
        assert s is not None and self.busy
        if self.phase is State.SETTLING:
            s.overrun_pulses += pulses
            return []
        billed = min(pulses, s.limit_pulses - s.billed_pulses)
        s.billed_pulses += billed
        s.overrun_pulses += pulses - billed
        s.last_flow_ms = now_ms
        self._flow_samples.append((now_ms, s.billed_pulses + s.overrun_pulses))
        self._flow_rate(now_ms)   # prunes samples older than the window
        if s.billed_pulses >= s.limit_pulses:
            return self.close(s.limit_reason, now_ms)
        return self._maybe_checkpoint(now_ms)

    def time_limit(self, now_ms: int) -> EndReason | None:
        """Why a dispensing session must close now by the clock (its maximum duration, or no flow for too long)."""
        s = self.current
        if not self.dispensing or s is None:
            return None
        if now_ms - s.started_ms >= s.max_duration_ms:
            return EndReason.MAX_DURATION
        if now_ms - s.last_flow_ms >= s.max_idle_ms:
            return EndReason.IDLE
        return None

    def on_tick(self, now_ms: int) -> list[Action]:
        """A checkpoint while dispensing; the bill once the overrun has settled; the receipt's timeout."""
        s = self.current
        if self.dispensing:
            return self._maybe_checkpoint(now_ms)
        if self.phase is State.SETTLING and s is not None and s.closed_ms is not None:
            if now_ms - s.closed_ms >= self.settings.overrun_window_ms:
                return self._finalize(now_ms)
        elif self.phase is State.RECEIPT and now_ms >= self._receipt_until_ms:
            self.dismiss_receipt()
        return []

    # ------------------------------------------------------------------ the end
    def close(self, reason: EndReason, now_ms: int) -> list[Action]:
        """Close the valve for ``reason``; the bill is final once the overrun window has passed (at once without
        one)."""
        s = self.current
        assert s is not None and self.dispensing
        s.closed_ms, s.close_reason = now_ms, reason
        self.phase = State.SETTLING
        actions: list[Action] = [CloseValve(reason.value), self._checkpoint(now_ms, closing=True)]
        if self.settings.overrun_window_ms == 0:
            actions += self._finalize(now_ms)
        return actions

    def shutdown(self, now_ms: int) -> list[Action]:
        """End a running session now, overrun window or not."""
        actions = self.close(EndReason.SHUTDOWN, now_ms) if self.dispensing else []
        if self.phase is State.SETTLING:
            actions += self._finalize(now_ms)
        return actions

    def dismiss_receipt(self) -> None:
        if self.phase is State.RECEIPT:
            self.phase, self._receipt = None, None

    def _finalize(self, now_ms: int) -> list[Action]:
        s = self.current
        assert s is not None and s.closed_ms is not None and s.close_reason is not None
        st, cal, r = self.settings, self.settings.calibration, self._readings
        volume_ml = cal.volume_ml(s.billed_pulses)
        below = volume_ml < s.min_dispense_ml
        record = SessionRecord(
            session_id=s.grant.session_id, user_ref=s.grant.user_ref, reason=s.close_reason.value,
            started_mono_ms=s.started_ms, closed_mono_ms=s.closed_ms, ended_mono_ms=now_ms,
            price_fen_per_l=s.price_fen_per_l, credit_limit_fen=s.credit_limit_fen,
            milli_pulses_per_litre=cal.milli_pulses_per_litre, billed_pulses=s.billed_pulses,
            overrun_pulses=s.overrun_pulses, volume_ml=volume_ml,
            cost_fen=0 if below else cal.cost_fen(s.billed_pulses, s.price_fen_per_l),
            below_minimum=below, temp_start_c=s.temp_start_c, temp_end_c=r.temp_c,
            tds_ppm=r.tds_ppm, tds_measured=r.tds_measured, tds_limit_ppm=st.tds_limit_ppm)
        totalizer_pulses = self._meter.take_for_bill(now_ms)
        self.current, self._receipt = None, record
        b = s.grant.balance_fen
        self._receipt_balance_fen = None if b is None else max(0, b - record.cost_fen)
        self.phase, self._receipt_until_ms = State.RECEIPT, now_ms + st.receipt_display_ms
        return [SessionEnded(record, totalizer_pulses=totalizer_pulses)]

    def _checkpoint(self, now_ms: int, closing: bool = False) -> Checkpoint:
        s = self.current
        assert s is not None
        totalizer_pulses = self._meter.take_for_checkpoint()
        s.checkpoint_ms, s.checkpointed = now_ms, (s.billed_pulses, s.overrun_pulses)
        return Checkpoint(session_id=s.grant.session_id, mono_ms=now_ms, billed_pulses=s.billed_pulses,
                          overrun_pulses=s.overrun_pulses, temp_c=self._readings.temp_c, valve_open=not closing,
                          totalizer_pulses=totalizer_pulses,
                          closing_reason=s.close_reason.value if closing and s.close_reason else None)

    def _maybe_checkpoint(self, now_ms: int) -> list[Action]:
        s = self.current
        assert s is not None
        if now_ms - s.checkpoint_ms < self.settings.checkpoint_interval_ms:
            return []
        if s.checkpointed == (s.billed_pulses, s.overrun_pulses):
            return []
        return [self._checkpoint(now_ms)]

    # ------------------------------------------------------------------ the screen
    def snapshot_fields(self, now_ms: int, state: State) -> dict[str, object]:
        """The session, receipt and refusal as the screen shows them (fields of :class:`~kiosk.session.Snapshot`)."""
        receipt_shown = self.phase is State.RECEIPT
        fields: dict[str, object] = {
            "receipt": self._receipt if receipt_shown else None,
            "receipt_balance_fen": self._receipt_balance_fen if receipt_shown else None,
            "last_rejection": self.refusal.shown(now_ms, state)}
        s = self.current
        if s is None:
            return fields
        cal = self.settings.calibration
        cost_fen = cal.cost_fen(s.billed_pulses, s.price_fen_per_l)
        end_ms = s.closed_ms if s.closed_ms is not None else now_ms
        fields.update(
            session_id=s.grant.session_id, price_fen_per_l=s.price_fen_per_l,
            volume_ml=cal.volume_ml(s.billed_pulses), volume_ul=cal.volume_ul(s.billed_pulses),
            cost_fen=cost_fen, credit_limit_fen=s.credit_limit_fen,
            remaining_credit_fen=max(0, s.credit_limit_fen - cost_fen),
            flow_ml_per_min=self._flow_rate(now_ms) if s.closed_ms is None else 0,
            progress_permille=min(1000, s.billed_pulses * 1000 // s.limit_pulses) if s.limit_pulses else 0,
            elapsed_ms=max(0, end_ms - s.started_ms))
        return fields

    def _flow_rate(self, now_ms: int) -> int:
        samples = self._flow_samples
        while len(samples) > 2 and now_ms - samples[1][0] >= FLOW_WINDOW_MS:
            samples.popleft()
        if len(samples) < 2 or now_ms <= samples[0][0]:
            return 0
        (t0, p0), (_, p1) = samples[0], samples[-1]
        return self.settings.calibration.volume_ul(p1 - p0) * 60 // (now_ms - t0)
