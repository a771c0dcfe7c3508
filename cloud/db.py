"""The cloud's data, in SQLAlchemy Core: embedded SQLite by default, PostgreSQL by URL.

Balances are never a number that is overwritten: every change is a row in ``balance_entries``
(top-up, hold, release, charge, refund, adjustment), written in the same transaction as the state
change it belongs to, so a crash mid-request leaves the balance right. The available balance is the
sum of all entries; the held amount is the sum of open holds.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    insert,
    inspect,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

import contract as p

log = logging.getLogger("tapshare.cloud")

metadata = MetaData()

machines = Table(
    "machines", metadata,
    Column("machine_id", String(64), primary_key=True),
    Column("secret_enc", Text, nullable=True),          # AES-GCM with the server key; NULL until enrolled
    Column("location", String(200), nullable=False, default=""),
    Column("price_fen_per_l", Integer, nullable=False),
    Column("max_volume_ml", Integer, nullable=False),
    Column("max_duration_ms", Integer, nullable=False),
    Column("max_idle_ms", Integer, nullable=False),
    Column("max_credit_fen", Integer, nullable=False),
    Column("min_dispense_ml", Integer, nullable=False,
           default=p.LIMIT_BOUNDS["min_dispense_ml"].default),   # sent in every grant, applied by both sides
    Column("created_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=True),
    Column("heartbeat", JSON, nullable=True),
    Column("open_session_id", String(64), nullable=True),
    Column("timezone", String(64), nullable=False, default="Asia/Shanghai"),   # bills and receipts are shown in it
    Column("hotline", String(40), nullable=False, default=""),                 # shown when it cannot serve
    Column("site", String(100), nullable=False, default="", server_default=""),   # a group of machines, for reports
    # until when its current long-poll is held, at whichever cloud instance: "connected" for every instance
    Column("poll_until_ms", BigInteger, nullable=True),
    # whether its latest heartbeat shows any alarm rule's condition, judged when the heartbeat arrived (NULL:
    # unknown, e.g. written before migration 0009): the alarm round reads only such machines, the silent ones
    # and those with an alarm, not the whole fleet every few seconds
    Column("alarm_hint", Boolean, nullable=True),
)

enrolment_tokens = Table(
    "enrolment_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("machine_id", String(64), ForeignKey("machines.machine_id"), nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("used_ms", BigInteger, nullable=True),
)

nonces = Table(
    "nonces", metadata,
    Column("machine_id", String(64), primary_key=True),
    Column("nonce", String(64), primary_key=True),
    Column("seen_ms", BigInteger, nullable=False, index=True),
)

commands = Table(
    "commands", metadata,
    Column("command_id", String(64), primary_key=True),
    Column("machine_id", String(64), ForeignKey("machines.machine_id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("body", JSON, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("delivered_ms", BigInteger, nullable=True),
    Column("acked_ms", BigInteger, nullable=True),
    Column("ack_ok", Boolean, nullable=True),
    Column("ack_reason", String(200), nullable=True),
    Index("commands_pending", "machine_id", "acked_ms", "expires_ms"),
    # each instance's look for commands whose notification it missed (every few seconds) reads only these
    Index("commands_unacked", "expires_ms", postgresql_where=text("acked_ms IS NULL"),
          sqlite_where=text("acked_ms IS NULL")),
    Index("commands_by_time", "created_ms"),         # the prune of commands past their retention
)

users = Table(
    "users", metadata,
    Column("user_id", String(64), primary_key=True),
    Column("phone", String(20), nullable=False, unique=True),
    Column("name", String(100), nullable=False, default=""),
    Column("registered", Boolean, nullable=False, default=False),
    Column("points", Integer, nullable=False, default=0),
    Column("created_ms", BigInteger, nullable=False),
    Column("deleted_ms", BigInteger, nullable=True),   # account deleted: personal data erased, records kept
    Index("users_by_created", "created_ms"),             # the console's newest accounts
)

user_tokens = Table(      # bearer tokens of phone users, given by SMS login
    "user_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False, default=2**62),
)

sms_codes = Table(        # one-time login codes, stored only as an HMAC
    "sms_codes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("phone", String(20), nullable=False),
    Column("code_mac", String(64), nullable=False),
    Column("client_ip", String(64), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("used_ms", BigInteger, nullable=True),
    Column("provider", String(32), nullable=True),              # who sent it, and its id for the message
    Column("provider_request_id", String(80), nullable=True),
    Column("send_error", String(200), nullable=True),
    Index("sms_by_phone", "phone", "created_ms"),
    Index("sms_by_ip", "client_ip", "created_ms"),
)

consents = Table(         # PIPL: separate consent before sensitive personal information is collected
    "consents", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("version", String(16), nullable=False),
    Column("granted_ms", BigInteger, nullable=False),
    Column("withdrawn_ms", BigInteger, nullable=True),
)

id_photos = Table(        # the files are encrypted, outside anything served; this row says where
    "id_photos", metadata,
    Column("photo_id", String(40), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False, index=True),
    Column("width_px", Integer, nullable=False),
    Column("height_px", Integer, nullable=False),
    Column("stored_bytes", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("deleted_ms", BigInteger, nullable=True),
)

identities = Table(       # real-name registration (s4); name and number encrypted, masks for display
    "identities", metadata,
    Column("user_id", String(64), ForeignKey("users.user_id"), primary_key=True),
    Column("doc_type", String(20), nullable=False),
    Column("number_enc", Text, nullable=False),
    Column("number_masked", String(40), nullable=False),
    Column("number_mac", String(64), nullable=False, unique=True),     # one document, one account
    Column("name_enc", Text, nullable=False),
    Column("name_masked", String(80), nullable=False),
    Column("photo_id", String(40), nullable=True),
    Column("state", String(16), nullable=False),        # pending, verified, rejected
    Column("verifier", String(64), nullable=False),
    Column("reject_reason", String(200), nullable=True),
    Column("submitted_ms", BigInteger, nullable=False),
    Column("decided_ms", BigInteger, nullable=True),
    Index("identities_by_state", "state", "submitted_ms"),
)

topup_orders = Table(     # s5: an order at the payment provider; credited only by a verified notification
    "topup_orders", metadata,
    Column("order_id", String(40), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False, index=True),
    Column("amount_fen", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),        # pending, paid, closed
    Column("provider", String(32), nullable=False),
    Column("provider_txn_id", String(64), nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("paid_ms", BigInteger, nullable=True),
    Column("closed_ms", BigInteger, nullable=True),
    Column("notifications", Integer, nullable=False, default=0),
    Column("channel", String(16), nullable=True),        # jsapi, h5, native, wap, precreate, page
    Column("refunded_fen", BigInteger, nullable=False, default=0, server_default="0"),   # sent back by refunds
    Index("orders_pending", "state", "expires_ms"),
    Index("orders_paid", "state", "paid_ms"),
)

provider_refunds = Table(  # money sent back through the provider to the payment it came from, to its final state
    "provider_refunds", metadata,
    Column("refund_id", String(40), primary_key=True),           # our out_refund_no / out_request_no: idempotent
    Column("order_id", String(40), ForeignKey("topup_orders.order_id"), nullable=False, index=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False, index=True),
    Column("provider", String(32), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("origin", String(16), nullable=False),       # withdrawal, deletion, session
    Column("reason", String(200), nullable=False, default=""),
    Column("state", String(16), nullable=False),        # requested, processing, success, closed, abnormal
    Column("provider_refund_id", String(64), nullable=True),
    Column("requested_by", String(64), nullable=False),  # the user, or the operator who refunded a pour
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("done_ms", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", String(200), nullable=True),
    Index("provider_refunds_state", "state", "updated_ms"),
)

payer_accounts = Table(    # the payer's id at a provider that needs one (WeChat JSAPI: the openid under our appid)
    "payer_accounts", metadata,
    Column("user_id", String(64), ForeignKey("users.user_id"), primary_key=True),
    Column("provider", String(32), primary_key=True),
    Column("payer_id", String(128), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

reconciliations = Table(   # a provider's bill for a day compared with our orders and refunds
    "reconciliations", metadata,
    Column("provider", String(32), primary_key=True),
    Column("bill_date", String(10), primary_key=True),           # YYYY-MM-DD, in the provider's time (UTC+8)
    Column("state", String(16), nullable=False),        # matched, mismatch, failed
    Column("report", JSON, nullable=False),
    Column("checked_ms", BigInteger, nullable=False),
)

alarms = Table(            # what operators must look at that is not a machine's: payments, SMS, reconciliation
    "alarms", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(32), nullable=False),       # payments, sms, reconciliation
    Column("kind", String(64), nullable=False),
    Column("detail", JSON, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Index("alarms_by_time", "created_ms"),
)

balance_refunds = Table(  # a balance paid back to the top-ups it came from (account deletion); never forfeited
    "balance_refunds", metadata,
    Column("refund_id", String(40), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False, index=True),
    Column("amount_fen", BigInteger, nullable=False),
    Column("orders", JSON, nullable=False),              # [{order_id, provider, amount_fen}], newest top-up first
    Column("state", String(16), nullable=False),         # requested, paid
    Column("created_ms", BigInteger, nullable=False),
    Column("paid_ms", BigInteger, nullable=True),
    Column("paid_by", String(64), nullable=True),
    Column("reference", String(100), nullable=True),     # the provider's refund number, or the transfer's
    Index("balance_refunds_state", "state", "created_ms"),
)

points_entries = Table(   # s6: growth points, every change a row (earn, redeem, adjust)
    "points_entries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False, index=True),
    Column("delta", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ref", String(64), nullable=True),
    Column("note", String(200), nullable=False, default=""),
    Column("created_ms", BigInteger, nullable=False),
)

gifts = Table(
    "gifts", metadata,
    Column("gift_id", String(40), primary_key=True),
    Column("name_zh", String(100), nullable=False),
    Column("name_en", String(100), nullable=False),
    Column("points_cost", Integer, nullable=False),
    Column("stock", Integer, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_ms", BigInteger, nullable=False),
)

redemptions = Table(
    "redemptions", metadata,
    Column("redemption_id", String(40), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False),
    Column("gift_id", String(40), ForeignKey("gifts.gift_id"), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("points", Integer, nullable=False),
    Column("pickup_code", String(16), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("picked_up_ms", BigInteger, nullable=True),     # handed over at the site, marked in the console
    Column("picked_up_by", String(64), nullable=True),
    UniqueConstraint("user_id", "request_id", name="redemption_once"),
)

balance_entries = Table(
    "balance_entries", metadata,
    Column("entry_id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False),
    Column("kind", String(16), nullable=False),       # topup, hold, release, charge, refund, adjustment
    Column("amount_fen", BigInteger, nullable=False),  # signed: what it does to the available balance
    Column("session_id", String(64), nullable=True),
    Column("note", String(200), nullable=False, default=""),
    Column("created_ms", BigInteger, nullable=False),
    Index("balance_by_user", "user_id"),
    Index("balance_by_session", "session_id"),            # a session's hold, charge and refunds
    Index("balance_refunds_by_session", "session_id",     # the reports' refunds, without the holds and charges
          postgresql_where=text("kind = 'refund'"), sqlite_where=text("kind = 'refund'")),
)

sessions = Table(
    "sessions", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("machine_id", String(64), ForeignKey("machines.machine_id"), nullable=False),
    Column("user_id", String(64), ForeignKey("users.user_id"), nullable=False),
    Column("state", String(16), nullable=False),      # starting, active, ended, voided, lost
    Column("price_fen_per_l", Integer, nullable=False),
    Column("credit_limit_fen", BigInteger, nullable=False),
    Column("command_id", String(64), nullable=False),
    Column("presence_hash", String(64), nullable=False, unique=True),   # each scan starts one session
    Column("created_ms", BigInteger, nullable=False),
    Column("deadline_ms", BigInteger, nullable=False),     # the grant's: voided only after this plus the skew
    Column("min_dispense_ml", Integer, nullable=False),
    Column("max_volume_ml", Integer, nullable=False),       # the grant's: no bill may exceed it (nor the credit)
    Column("acked_ms", BigInteger, nullable=True),
    Column("ended_ms", BigInteger, nullable=True),
    Column("end_reason", String(32), nullable=True),
    Column("void_reason", String(200), nullable=True),
    Column("progress", JSON, nullable=True),
    Column("fee_fen", BigInteger, nullable=True),
    Column("volume_ml", Integer, nullable=True),
    Index("sessions_by_user", "user_id", "state"),
    Index("sessions_by_machine", "machine_id", "created_ms"),
    Index("sessions_by_state", "state", "deadline_ms"),      # the void and reconciliation sweeps
    Index("sessions_by_time", "created_ms"),                  # the console's searches and reports
    Index("sessions_by_user_time", "user_id", "created_ms"),
    Index("sessions_settled_by_time", "created_ms",           # a month's report read from the index alone
          postgresql_include=["machine_id", "fee_fen", "volume_ml"], postgresql_where=text("state = 'ended'"),
          sqlite_where=text("state = 'ended'")),
)

reports = Table(       # idempotency: the first response to (machine, event id) is stored and replayed
    "reports", metadata,
    Column("machine_id", String(64), primary_key=True),
    Column("event_id", String(40), primary_key=True),
    Column("kind", String(64), nullable=False),
    Column("body_sha256", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("detail", String(300), nullable=False, default=""),
    Column("payload", JSON, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("occurred_ms", BigInteger, nullable=False),          # received minus the device's age_ms
    Index("reports_by_kind", "machine_id", "kind", "received_ms"),
)

bills = Table(
    "bills", metadata,
    Column("session_id", String(64), ForeignKey("sessions.session_id"), primary_key=True),
    Column("user_id", String(64), nullable=False, index=True),
    Column("machine_id", String(64), nullable=False),
    Column("started_at", String(40), nullable=False),
    Column("ended_at", String(40), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("volume_ml", Integer, nullable=False),
    Column("avg_flow_ml_per_min", Integer, nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("price_fen_per_l", Integer, nullable=False),
    Column("water_quality", JSON, nullable=False),
    Column("points", Integer, nullable=False),
    Column("end_reason", String(32), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

rental_records = Table(
    "rental_records", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("machine_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("started_at", String(40), nullable=False),
    Column("ended_at", String(40), nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("record", JSON, nullable=False),
    Index("records_by_machine", "machine_id", "started_ms"),
    Index("records_by_user", "user_id", "started_ms"),
)

machine_samples = Table(   # what heartbeats said over time (at most one row per machine per few minutes), for charts
    "machine_samples", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("machine_id", String(64), nullable=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("temp_c", Float, nullable=True),
    Column("tds_ppm", Integer, nullable=True),
    Column("outbox_depth", Integer, nullable=False, default=0),
    Column("dead_letters", Integer, nullable=False, default=0),
    Index("samples_by_machine", "machine_id", "at_ms"),
)

machine_events = Table(
    "machine_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("machine_id", String(64), nullable=False),
    Column("event_id", String(40), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("occurred_ms", BigInteger, nullable=False),
    Column("alarm", Boolean, nullable=False, default=False),
    Index("events_by_machine", "machine_id", "received_ms"),
)

operators = Table(
    "operators", metadata,
    Column("operator_id", String(64), primary_key=True),
    Column("role", String(16), nullable=False),       # admin, reviewer, operator, viewer
    Column("token_hash", String(64), nullable=True, unique=True),   # a bearer token for scripts, if one was made
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=True),      # tokens for scripts expire (TAPSHARE_OPERATOR_TOKEN_DAYS)
    Column("revoked_ms", BigInteger, nullable=True),      # the bearer token revoked
    Column("display_name", String(100), nullable=False, default="", server_default=""),
    Column("password_hash", Text, nullable=True),         # argon2id; NULL: cannot sign in to the console
    Column("totp_secret_enc", Text, nullable=True),       # the second factor's secret, sealed with the server key
    Column("totp_pending_enc", Text, nullable=True),      # being set up: confirmed by a first code
    Column("totp_last_step", BigInteger, nullable=True),  # a code is accepted once
    Column("failed_logins", Integer, nullable=False, default=0, server_default="0"),
    Column("locked_until_ms", BigInteger, nullable=True),
    Column("disabled_ms", BigInteger, nullable=True),     # disabled by an admin: no sign-in, no token
    Column("password_changed_ms", BigInteger, nullable=True),
)

operator_sessions = Table(   # the console's sign-ins: the cookie holds the token, the database only its hash
    "operator_sessions", metadata,
    Column("session_hash", String(64), primary_key=True),
    Column("operator_id", String(64), ForeignKey("operators.operator_id"), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger, nullable=True),
    Column("client_ip", String(64), nullable=False, default=""),
    Column("user_agent", String(200), nullable=False, default=""),
    Index("operator_sessions_by_operator", "operator_id", "revoked_ms"),
)

operator_alarms = Table(    # what operators must see and act on: open -> acknowledged -> resolved, notified once
    "operator_alarms", metadata,
    Column("alarm_id", Integer, primary_key=True, autoincrement=True),
    Column("rule", String(32), nullable=False),          # offline, leak, temperature, tds, ghost_flow, dead_letter, ...
    Column("machine_id", String(64), nullable=True),      # NULL: the service's own (payments, reconciliation)
    Column("open_key", String(160), nullable=True, unique=True),   # rule/subject while not resolved: one at a time
    Column("severity", String(8), nullable=False),       # critical, warning, info
    Column("state", String(16), nullable=False),         # open, acknowledged, resolved
    Column("detail", JSON, nullable=False),
    Column("opened_ms", BigInteger, nullable=False),
    Column("last_ms", BigInteger, nullable=False),       # last time the condition was seen
    Column("acked_ms", BigInteger, nullable=True),
    Column("acked_by", String(64), nullable=True),
    Column("ack_note", String(500), nullable=True),
    Column("resolved_ms", BigInteger, nullable=True),
    Column("resolved_by", String(64), nullable=True),    # an operator, or "system" when the condition cleared
    Column("resolve_note", String(500), nullable=True),
    Column("emailed_ms", BigInteger, nullable=True),     # each channel at most once per alarm
    Column("webhooked_ms", BigInteger, nullable=True),
    Column("notify_attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("notify_error", String(300), nullable=True),
    Index("operator_alarms_by_state", "state", "opened_ms"),
    Index("operator_alarms_by_machine", "machine_id", "opened_ms"),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("operator_id", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(128), nullable=False),
    Column("detail", JSON, nullable=False),
    Column("at_ms", BigInteger, nullable=False),
    Index("audit_by_time", "at_ms"),
    Index("audit_by_operator", "operator_id", "at_ms"),
)

job_leases = Table(   # a background job runs at one cloud instance at a time: the one holding its lease
    "job_leases", metadata,
    Column("job", String(40), primary_key=True),
    Column("holder", String(100), nullable=False),
    Column("until_ms", BigInteger, nullable=False),
)

rate_hits = Table(    # rate limits every cloud instance counts together: hits per key in fixed windows
    "rate_hits", metadata,
    Column("bucket", String(40), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("window_ms", BigInteger, primary_key=True),    # the window's start
    Column("hits", Integer, nullable=False),
    Column("expires_ms", BigInteger, nullable=False, index=True),
)

releases = Table(    # fleet updates: signed bundles an admin uploaded (the file: data_dir/releases/<version>.bundle)
    "releases", metadata,
    Column("version", String(40), primary_key=True),
    Column("sha256", String(64), nullable=False),         # of the whole bundle file: what a machine checks first
    Column("size_bytes", BigInteger, nullable=False),
    Column("key_id", String(16), nullable=False),         # the release key that signed it
    Column("manifest", JSON, nullable=False),             # the manifest without its files: counts and total size
    Column("notes", String(2000), nullable=False, default=""),
    Column("uploaded_by", String(64), nullable=False),
    Column("uploaded_ms", BigInteger, nullable=False),
    Column("withdrawn_ms", BigInteger, nullable=True),    # withdrawn: offered and served no more
)

rollouts = Table(    # a release offered to a set of machines; one open (active or paused) rollout per machine
    "rollouts", metadata,
    Column("rollout_id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(40), ForeignKey("releases.version"), nullable=False),
    Column("created_by", String(64), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),          # active, paused, stopped, done
    Column("machine_ids", JSON, nullable=True),           # the chosen machines, or NULL with a percent
    Column("percent", Integer, nullable=True),
    Column("max_rollback_pct", Integer, nullable=False),  # stopped by itself when more roll back or fail
    Column("stop_reason", String(200), nullable=True),
    Column("updated_ms", BigInteger, nullable=False),
)

machine_updates = Table(    # each targeted machine's step in a rollout, as its reports and heartbeats say
    "machine_updates", metadata,
    Column("rollout_id", Integer, ForeignKey("rollouts.rollout_id"), primary_key=True),
    Column("machine_id", String(64), primary_key=True),
    Column("version", String(40), nullable=False),
    Column("step", String(16), nullable=False),           # pending, then contract.UPDATE_STEPS
    Column("reason", String(40), nullable=False, default=""),
    Column("detail", String(500), nullable=False, default=""),
    Column("running_version", String(40), nullable=False, default=""),
    Column("updated_ms", BigInteger, nullable=False),
    Index("machine_updates_by_rollout", "rollout_id", "step"),
    Index("machine_updates_by_machine", "machine_id"),    # every heartbeat looks its machine's offer up
)

machine_update_steps = Table(    # every step of a machine in a rollout, in the order the cloud received them
    "machine_update_steps", metadata,
    Column("step_id", Integer, primary_key=True, autoincrement=True),    # the order of arrival
    Column("rollout_id", Integer, ForeignKey("rollouts.rollout_id"), nullable=False),
    Column("machine_id", String(64), nullable=False),
    Column("version", String(40), nullable=False),        # as the report said (another version: not applied)
    Column("step", String(16), nullable=False),           # pending, then contract.UPDATE_STEPS
    Column("reason", String(40), nullable=False, default=""),
    Column("detail", String(500), nullable=False, default=""),    # the latest repeat's
    Column("running_version", String(40), nullable=False, default=""),
    Column("source", String(16), nullable=False),         # machine (its report), heartbeat, cloud (the rollout)
    Column("applied", Boolean, nullable=False),           # it moved the current step (false: late or not its own)
    Column("repeats", Integer, nullable=False, default=1),    # the same step received again right after: one row
    Column("at_ms", BigInteger, nullable=False),          # first received
    Column("last_at_ms", BigInteger, nullable=False),     # last received
    Index("machine_update_steps_by_machine", "rollout_id", "machine_id", "at_ms"),
)

MIGRATIONS = Path(__file__).parent / "migrations"
LEGACY_SCHEMA_VERSION = 3      # release 0.1.0's schema_info version: the schema of migration 0001
MIGRATION_LOCK_KEY = 0x7A95_0001     # PostgreSQL advisory lock: one instance migrates at a time
# page cache per pooled SQLite connection (SQLite's default is 2,000): the pool's 64 would hold up to 128 MB of
# them as the database grows (a soak's cloud grew 4 MB per 1,000 sessions with it, 1.6 with 200); the OS's file
# cache holds the pages anyway
SQLITE_CACHE_KIB = 512


# a pooled PostgreSQL connection idle this long is asked whether it still works before it is used (SQLAlchemy's
# pool_pre_ping asks at every checkout: a round trip to the database before each transaction, a fifth of the
# database time under a fleet's load, for connections that were used a few milliseconds before)
PING_IDLE_S = 1.0
PG_POOL_SIZE = 30           # an instance's connections to PostgreSQL, besides its listener's one
PG_WARM_CONNECTIONS = 8     # of those, opened when the instance starts


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling for connections that sat in the pool: a database restart or a network cut
    while they were idle is found before a request uses one, and the pool opens a fresh connection instead
    (raising DisconnectionError from a checkout is SQLAlchemy's documented way to ask for that)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn, record, _proxy) -> None:
        since = record.info.pop("idle_since", None)
        if since is not None and (time.monotonic() - since >= PING_IDLE_S or _has_spoken(dbapi_conn)):
            try:
                engine.dialect.do_ping(dbapi_conn)
            except Exception as e:                   # psycopg's OperationalError, a closed connection, ...
                raise exc.DisconnectionError(f"a pooled connection no longer works: {e}") from e


def _has_spoken(dbapi_conn) -> bool:
    """Whether the server sent something to a connection that asked nothing: PostgreSQL does so when it ends the
    connection (a restart, pg_terminate_backend: an error, then end of file), found without a round trip."""
    try:
        readable, _, _ = select.select([dbapi_conn.fileno()], [], [], 0)
    except (OSError, ValueError, AttributeError):
        return True                                  # closed, or not a socket we can ask: let the ping decide
    return bool(readable)


class SchemaMismatch(RuntimeError):
    pass


class Database:
    """An engine plus a write lock for SQLite (one writer; PostgreSQL uses row locks instead)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict = {"future": True}
        if self.is_sqlite:
            # enough pooled connections for the web threadpool (40): opening one runs the PRAGMAs
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            # most recently used first: each connection's page cache (SQLITE_CACHE_KIB) fills as the database grows,
            # and only as many connections as ever run at once fill theirs (first-in-first-out warmed all 48)
            kwargs.update(pool_size=48, max_overflow=16, pool_use_lifo=True)
        else:
            # most recently used first, as for SQLite: the connections in use stay warm, and only the few that
            # sat idle past PING_IDLE_S are pinged before their next use. No overflow: a connection opened for a
            # burst is kept, not closed when it comes back and opened again at the next burst (with 10 + 20
            # overflow, an instance at 20,000 machines opened 14 in 40 s, each a new PostgreSQL backend with cold
            # caches, under a start that waited for it); the most an instance holds is the same 30
            kwargs.update(pool_size=PG_POOL_SIZE, max_overflow=0, pool_use_lifo=True)
        self.engine: Engine = create_engine(url, **kwargs)
        if not self.is_sqlite:
            _ping_when_idle(self.engine)
        # the same pool; on PostgreSQL its connections read without BEGIN (set on checkout, undone on return)
        self._reader = self.engine if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        if self.is_sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
                cur.close()
        self._write_lock = threading.Lock()

    def create_all(self) -> None:
        """Bring the database to this release's schema with the Alembic migrations in cloud/migrations: create
        a new one, upgrade an older one (a database release 0.1.0 made is recognised by its ``schema_info`` and
        upgraded from there), refuse clearly one from before 0.1.0 or from a newer release. Several instances
        starting at once migrate one after the other (an advisory lock on PostgreSQL)."""
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        with self.migration_connection() as conn:
            tables = inspect(conn).get_table_names()
            cfg.attributes["connection"] = conn
            if "machines" in tables and "alembic_version" not in tables:
                self._check_legacy(conn, "schema_info" in tables)
                command.stamp(cfg, "0001")
            elif "alembic_version" in tables:
                self._check_known(cfg, conn.execute(text("SELECT version_num FROM alembic_version")).scalar())
            command.upgrade(cfg, head)

    @contextmanager
    def migration_connection(self) -> Iterator[Connection]:
        """One transaction that holds a whole migration, its DDL included, so an interrupted one leaves nothing
        behind. SQLite: a connection of its own whose driver commits nothing by itself, ``BEGIN IMMEDIATE`` (one
        migrating writer, other processes included), and foreign keys off so a table can be rebuilt under rows
        that refer to it, then checked before the commit. PostgreSQL: READ COMMITTED (each statement sees what
        committed before it) and an advisory lock, so instances starting at once migrate one after the other."""
        if not self.is_sqlite:
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="READ COMMITTED")
                with conn.begin():
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
                    yield conn
            return
        engine = create_engine(self.url, poolclass=NullPool, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=OFF"):
                dbapi_conn.execute(f"PRAGMA {pragma}")

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with self._write_lock, engine.begin() as conn:
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise SchemaMismatch(f"a migration would leave {len(broken)} rows referring to nothing "
                                         f"(first: {tuple(broken[0])}); nothing was changed")
        finally:
            engine.dispose()

    def _check_legacy(self, conn: Connection, has_schema_info: bool) -> None:
        version = (conn.execute(text("SELECT version FROM schema_info")).scalar() or 1) if has_schema_info else 1
        if version != LEGACY_SCHEMA_VERSION:
            raise SchemaMismatch(
                f"the database {self.engine.url.render_as_string(hide_password=True)} has schema version "
                f"{version}, from before release 0.1.0, which had no migrations: move the old database aside "
                "(development data) or upgrade it with release 0.1.0 first")

    def _check_known(self, cfg, current: str | None) -> None:
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError
        try:
            known = current is None or ScriptDirectory.from_config(cfg).get_revision(current) is not None
        except CommandError:
            known = False
        if not known:
            raise SchemaMismatch(
                f"the database {self.engine.url.render_as_string(hide_password=True)} is at schema revision "
                f"{current}, which this release does not know (a newer release made it): run that release")

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction; on SQLite writers are serialised (no lock-upgrade failures)."""
        if self.is_sqlite:
            with self._write_lock, self.engine.begin() as conn:
                yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def lock(self, conn: Connection, key: str) -> None:
        """Serialise transactions on ``key`` until this one ends (a limit that is counted, then written: SMS per
        number, per network). PostgreSQL: a transaction-level advisory lock; SQLite: writers are serial anyway."""
        if not self.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})

    @contextmanager
    def read(self, streaming: bool = False) -> Iterator[Connection]:
        """A connection for reading. On PostgreSQL without a transaction (autocommit): under READ COMMITTED each
        statement sees what committed before it whether or not a transaction wraps it, and without one a read is
        one round trip, not three (BEGIN, the query, ROLLBACK) and three wake-ups of a server process. Write in
        :meth:`tx`, never here. ``streaming``: rows read as they are used (``yield_per``), through a server-side
        cursor, which PostgreSQL keeps only inside a transaction: one is opened."""
        with (self.engine if streaming else self._reader).connect() as conn:
            yield conn

    def warm(self, n: int = PG_WARM_CONNECTIONS) -> None:
        """Open ``n`` of the pool's connections now, together, and keep them (PostgreSQL): an instance that starts
        (a rolling restart) otherwise opens each at a request that waits for it, a new backend each time. A
        database that does not answer is left to the requests (and the health check)."""
        if self.is_sqlite:
            return
        held = []
        try:
            for _ in range(n):
                conn = self.engine.connect()
                held.append(conn)
                conn.exec_driver_sql("SELECT 1")
                conn.rollback()
        except exc.SQLAlchemyError as e:
            log.warning("could not open the database's connections at start (%s); requests will", e)
        finally:
            for conn in held:
                conn.close()

    def dispose(self) -> None:
        self.engine.dispose()


def first_row(conn: Connection, stmt, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The first row of a query as a dict, or None (``params``: the values of a prebuilt statement's
    bindparams)."""
    row = conn.execute(stmt, params).mappings().first()
    return dict(row) if row else None


def audit(conn: Connection, operator_id: str, action: str, target: str, detail: dict, now_ms: int) -> None:
    """Record who did what to what, in the caller's transaction."""
    conn.execute(insert(audit_log).values(operator_id=operator_id, action=action, target=target, detail=detail,
                                            at_ms=now_ms))


def raise_alarm(conn: Connection, source: str, kind: str, detail: dict, now_ms: int) -> None:
    """An alarm for operators that is not a machine's (payments, SMS, reconciliation), in the caller's
    transaction; ``GET /api/v1/operator/alarms`` lists it with the machines' alarms. It also opens the operator
    alarm (rule ``source``) for the problem, or counts it in the one open, which an operator resolves."""
    from cloud.alarms.service import open_service_case  # cloud.alarms is built on this module

    conn.execute(insert(alarms).values(source=source, kind=kind, detail=detail, created_ms=now_ms))
    open_service_case(conn, source, kind, detail, now_ms)
