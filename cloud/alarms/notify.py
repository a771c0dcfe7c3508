"""Alarm notifications: an email (SMTP, standard library) and a webhook (a signed JSON POST), each channel at most
once per alarm, sent from a background task of their own so a slow mail server delays nothing else.

A round claims an alarm's due channels before sending, in one conditional update that also counts the attempt
(the row must still be as it was read): the claimed column holds ``-claim_ms``, "being sent since". Success writes
when it was sent; a failure puts NULL back, keeps the error in ``notify_error``, and the alarm is tried again after
a back-off (``retry_s``, doubling, at most an hour; kept in memory) until ``MAX_ATTEMPTS`` rounds, when it gives up
with the error kept. So two clouds or two loops never both send. The one exception: a claim left by a cloud that
died mid-send is taken again after ``CLAIM_LEASE_MS`` (far longer than a send's timeouts), so a cloud killed after
the mail server took the message but before it wrote so may send it once more; the webhook's receiver can tell a
repeat by ``X-Tapshare-Alarm-Id``.

Only alarms not yet resolved, of at least ``min_severity``, are sent."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from typing import Any
from zoneinfo import ZoneInfo

import requests
from sqlalchemy import and_, or_, select, update

import contract as p
from cloud import db as t
from cloud.alarms.rules import RULES, SEVERITIES, SEVERITY_WORDS
from cloud.db import Database

log = logging.getLogger("tapshare.cloud")
a = t.operator_alarms.c

MAX_ATTEMPTS = 8
MAX_BACKOFF_MS = 3_600_000
CLAIM_LEASE_MS = 600_000
BATCH = 20                               # alarms looked at a round
SMTP_TIMEOUT_S = 15.0
WEBHOOK_TIMEOUT_S = (3.05, 5.0)          # connect, read
COLUMNS = {"email": a.emailed_ms, "webhook": a.webhooked_ms}


@dataclass(frozen=True)
class NotifySettings:
    """Where notifications go (``TAPSHARE_SMTP_*``, ``TAPSHARE_ALARM_*``; see :mod:`cloud.settings`)."""

    smtp_host: str = ""                  # empty: no email
    smtp_port: int = 587
    smtp_starttls: bool = True
    smtp_user: str = ""
    smtp_password: str | None = None
    email_from: str = ""
    email_to: tuple[str, ...] = ()
    webhook_url: str = ""                # empty: no webhook
    webhook_secret: bytes | None = None  # None (development only): sent unsigned
    min_severity: str = "warning"
    retry_s: float = 30.0
    timezone: str = "Asia/Shanghai"


class Notifier:
    def __init__(self, db: Database, settings: NotifySettings, public_url: Callable[[], str],
                 clock_ms: Callable[[], int]) -> None:
        self.db, self.cfg, self._public_url, self._clock = db, settings, public_url, clock_ms
        self.channels = [c for c, on in (("email", settings.smtp_host), ("webhook", settings.webhook_url)) if on]
        self._not_before: dict[int, int] = {}        # alarm id -> when it may be tried again (back-off)
        if settings.webhook_url and settings.webhook_secret is None:
            log.warning("alarm webhooks to %s are sent UNSIGNED: set TAPSHARE_ALARM_WEBHOOK_SECRET_FILE (production "
                        "refuses to start without it)", settings.webhook_url)

    def send_due(self) -> int:
        """One round: claim and send what is due; returns how many messages went out."""
        if not self.channels:
            return 0
        now = self._clock()
        due = or_(*(_due(COLUMNS[c], now) for c in self.channels))
        wanted = [s for s, rank in SEVERITIES.items() if rank >= SEVERITIES[self.cfg.min_severity]]
        q = select(t.operator_alarms, t.machines.c.location).outerjoin(
            t.machines, t.machines.c.machine_id == a.machine_id).where(and_(
                a.state.in_(("open", "acknowledged")), a.severity.in_(wanted), a.notify_attempts < MAX_ATTEMPTS, due))
        # backing off: not in the way of others. Only those still waiting are kept (an alarm closed while it backed
        # off is never asked about again): at most one entry per alarm that failed within MAX_BACKOFF_MS
        self._not_before = {i: at for i, at in self._not_before.items() if at > now}
        waiting = list(self._not_before)
        if waiting:
            q = q.where(a.alarm_id.not_in(waiting))
        with self.db.read() as conn:
            rows = [dict(r) for r in conn.execute(q.order_by(a.alarm_id).limit(BATCH)).mappings()]
        return sum(self._round(row, self._clock()) for row in rows)

    def _round(self, row: dict[str, Any], now: int) -> int:
        channels = [c for c in self.channels if _is_due(row[COLUMNS[c].key], now)]
        if not channels:
            return 0
        claim = [a.alarm_id == row["alarm_id"], a.notify_attempts == row["notify_attempts"],
                 a.state.in_(("open", "acknowledged")),
                 *((COLUMNS[c].is_(None) if row[COLUMNS[c].key] is None else COLUMNS[c] == row[COLUMNS[c].key])
                   for c in channels)]
        attempts = row["notify_attempts"] + 1
        with self.db.tx() as conn:
            won = conn.execute(update(t.operator_alarms).where(and_(*claim)).values(
                notify_attempts=attempts, **{COLUMNS[c].key: -now for c in channels})).rowcount == 1
        if not won:
            return 0                             # another loop or cloud claimed it first
        errors: dict[str, str] = {}
        for c in channels:
            try:
                (self._email if c == "email" else self._webhook)(row, now)
            except Exception as e:           # any failure is recorded and retried; none may stop the loop
                errors[c] = f"{type(e).__name__}: {e}"[:140]
        done = self._clock()
        error = "; ".join(f"{c}: {e}" for c, e in errors.items()) or None
        if error and attempts >= MAX_ATTEMPTS:
            error = f"gave up after {attempts} attempts: {error}"
        with self.db.tx() as conn:
            for c in channels:
                conn.execute(update(t.operator_alarms).where(and_(a.alarm_id == row["alarm_id"], COLUMNS[c] == -now))
                             .values({COLUMNS[c].key: None if c in errors else done}))
            conn.execute(update(t.operator_alarms).where(a.alarm_id == row["alarm_id"])
                         .values(notify_error=error[:300] if error else None))
        self._not_before.pop(row["alarm_id"], None)
        if errors:
            log.error("alarm %d not notified (attempt %d of %d): %s", row["alarm_id"], attempts, MAX_ATTEMPTS, error)
            if attempts < MAX_ATTEMPTS:
                delay = min(int(self.cfg.retry_s * 1000) * 2 ** (attempts - 1), MAX_BACKOFF_MS)
                self._not_before[row["alarm_id"]] = now + delay
        return len(channels) - len(errors)

    # ---------------------------------------------------------------- the channels
    def _email(self, row: dict[str, Any], now: int) -> None:
        cfg = self.cfg
        msg = email_message(row, self.link(row["alarm_id"]), cfg.timezone)
        msg["From"], msg["To"] = cfg.email_from, ", ".join(cfg.email_to)
        msg["Message-ID"] = make_msgid(f"alarm-{row['alarm_id']}",
                                       parseaddr(cfg.email_from)[1].rpartition("@")[2] or None)
        smtp_class = smtplib.SMTP_SSL if cfg.smtp_port == 465 else smtplib.SMTP
        with smtp_class(cfg.smtp_host, cfg.smtp_port, timeout=SMTP_TIMEOUT_S) as smtp:
            if cfg.smtp_starttls and smtp_class is smtplib.SMTP:
                smtp.starttls(context=ssl.create_default_context())
            if cfg.smtp_user:
                smtp.login(cfg.smtp_user, cfg.smtp_password or "")
            refused = smtp.send_message(msg)
        if refused:                          # taken for the others: sent (never again), the refusal logged
            log.error("alarm %d: the mail server refused %s", row["alarm_id"], ", ".join(refused))

    def _webhook(self, row: dict[str, Any], now: int) -> None:
        body = json.dumps(webhook_payload(row, self.link(row["alarm_id"]), self.cfg.timezone), ensure_ascii=False,
                          separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Tapshare-Alarm-Id": str(row["alarm_id"]),
                   "User-Agent": f"Tapshare-cloud/{p.SOFTWARE_VERSION}"}
        if self.cfg.webhook_secret is not None:
            headers["X-Tapshare-Signature"] = signature(self.cfg.webhook_secret, now // 1000, body)
        r = requests.post(self.cfg.webhook_url, data=body, headers=headers, timeout=WEBHOOK_TIMEOUT_S,
                          allow_redirects=False)
        if not 200 <= r.status_code < 300:
            raise RuntimeError(f"HTTP {r.status_code} {r.text[:60]!r}")

    def link(self, alarm_id: int) -> str:
        return f"{self._public_url().rstrip('/')}/console#/alarms/{alarm_id}"

    def status(self, row: dict[str, Any]) -> dict[str, Any]:
        """Each channel's state for the console: off, sent, sending, not_sent (waiting, retrying, or never: below
        the severity sent, resolved first) or gave_up; the attempts and the last error."""
        out: dict[str, Any] = {}
        for c, col in COLUMNS.items():
            v = row[col.key]
            out[c] = "off" if c not in self.channels else "sent" if (v or 0) > 0 else "sending" if v else \
                "gave_up" if row["notify_attempts"] >= MAX_ATTEMPTS else "not_sent"
        return {**out, "attempts": row["notify_attempts"], "error": row["notify_error"]}


def _due(col, now: int):
    """Not sent and not being sent (a claim older than the lease was left by a cloud that stopped mid-send)."""
    return or_(col.is_(None), and_(col < 0, col > CLAIM_LEASE_MS - now))


def _is_due(v: int | None, now: int) -> bool:
    return v is None or (v < 0 and -v < now - CLAIM_LEASE_MS)


def signature(secret: bytes, timestamp_s: int, body: bytes) -> str:
    """``X-Tapshare-Signature``: ``t=<unix s>,v1=<hex HMAC-SHA256 over "<t>.<raw body>">``. A receiver recomputes it
    over the bytes it received, compares in constant time and refuses a ``t`` far from its own clock (a replay)."""
    mac = hmac.new(secret, f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={mac}"


# ---------------------------------------------------------------- the words

def _words(row: dict[str, Any], tz: str) -> dict[str, str]:
    rule = RULES.get(row["rule"])
    sev_zh, sev_en = SEVERITY_WORDS.get(row["severity"], (row["severity"], row["severity"].upper()))
    at = datetime.fromtimestamp(row["opened_ms"] / 1000, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S")
    where_zh = where_en = ""
    if row["machine_id"]:
        place = f" ({row['location']})" if row.get("location") else ""
        where_zh, where_en = f"机器 {row['machine_id']}{place}", f"machine {row['machine_id']}{place}"
    return {"rule_zh": rule.zh if rule else row["rule"], "rule_en": rule.en if rule else row["rule"],
            "sev_zh": sev_zh, "sev_en": sev_en, "at": f"{at} ({tz})", "where_zh": where_zh, "where_en": where_en}


def _one_line(text: str) -> str:
    return " ".join(text.split())        # a location an operator typed may hold a line break: never in a header


def email_message(row: dict[str, Any], link: str, tz: str) -> EmailMessage:
    """The alarm as an email, Chinese first then English: what, where, since when (in ``tz``), the detail, and the
    link to it in the console. UTF-8 throughout."""
    w = _words(row, tz)
    zh_where = f"：{w['where_zh']}" if w["where_zh"] else ""
    en_where = f": {w['where_en']}" if w["where_en"] else ""
    msg = EmailMessage()
    msg["Subject"] = _one_line(f"[Tapshare] {w['sev_zh']} {w['rule_zh']}{zh_where} / {w['sev_en']} "
                               f"{w['rule_en']}{en_where} (#{row['alarm_id']})")
    detail = "\n".join(f"  {k}: {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
                       for k, v in row["detail"].items()) or "  -"
    msg.set_content(
        f"{w['sev_zh']}：{w['rule_zh']}\n"
        + (f"机器：{w['where_zh'].removeprefix('机器 ')}\n" if w["where_zh"] else "来源：服务本身\n")
        + f"开始时间：{w['at']}\n详情：\n{detail}\n查看与处理：{link}\n\n"
        f"{w['sev_en']}: {w['rule_en']}\n"
        + (f"Machine: {w['where_en'].removeprefix('machine ')}\n" if w["where_en"] else "Source: the service itself\n")
        + f"Since: {w['at']}\nDetail:\n{detail}\nSee and handle it: {link}\n", charset="utf-8")
    return msg


def webhook_payload(row: dict[str, Any], link: str, tz: str) -> dict[str, Any]:
    w = _words(row, tz)
    return {"alarm_id": row["alarm_id"], "rule": row["rule"], "severity": row["severity"], "state": row["state"],
            "machine_id": row["machine_id"], "location": row.get("location"), "title_zh": w["rule_zh"],
            "title_en": w["rule_en"], "detail": row["detail"], "opened_ms": row["opened_ms"],
            "opened_at": w["at"], "last_ms": row["last_ms"], "url": link}

