"""Phone users' accounts (s4): SMS login, PIPL consent, real-name registration with an ID photo, review,
photo retention and account deletion.

Providers are small interfaces so an operator can plug in a real SMS gateway or identity-verification
service: :class:`DevSmsSink` is **not** an SMS gateway (it keeps messages in memory for the demo and the
tests) and :class:`DevAutoVerify` is a development shortcut; both are refused in production mode.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from cloud import db as t
from cloud.accounts.identity import (
    PhotoRejected,
    mask_document,
    mask_name,
    mask_phone,
    normalize_document,
    normalize_name,
    normalize_phone,
    reencode_photo,
)
from cloud.accounts.providers import SmsFailed, SmsProvider, Verifier
from cloud.db import Database, audit, first_row, raise_alarm
from cloud.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InsufficientFunds,
    Invalid,
    NotFound,
    TooLarge,
    TooMany,
    Unauthenticated,
    Unavailable,
    UnsupportedMedia,
)
from cloud.security import SecretBox, new_token, token_hash
from cloud.sessions.bills import user_bills
from cloud.wallet.balance import balance

log = logging.getLogger("tapshare.cloud.accounts")

CODE_TTL_MS = 5 * 60_000
CODE_MAX_ATTEMPTS = 5
RESEND_AFTER_MS = 60_000
CODES_PER_PHONE_PER_HOUR = 5
CODES_PER_PHONE_PER_DAY = 10
CODES_PER_IP_PER_HOUR = 30
TOKEN_TTL_MS = 30 * 86_400_000
CONSENT_VERSION = "2026-11"
CONSENT_KIND = "sensitive_pi_identity"
HOUR_MS, DAY_MS = 3_600_000, 86_400_000


# ---------------------------------------------------------------- providers

PHOTOS_PER_HOUR = 10               # per account: 10 x 5 MB at most an hour
CONCURRENT_DECODES = 2
DECODE_WAIT_S = 10.0
_DECODES = threading.BoundedSemaphore(CONCURRENT_DECODES)
# a slow SMS provider holds a request thread up to its timeout (15 s for Tencent): a few at a time, so it cannot
# take every worker thread from the rest of the cloud
CONCURRENT_SENDS = 8
SEND_WAIT_S = 2.0
_SENDS = threading.BoundedSemaphore(CONCURRENT_SENDS)


# ---------------------------------------------------------------- accounts

@dataclass
class AccountSettings:
    photo_dir: Path
    photo_retention_days: int = 30
    timezone: str = "Asia/Shanghai"


class Accounts:
    def __init__(self, db: Database, box: SecretBox, sms: SmsProvider, verifier: Verifier,
                 settings: AccountSettings) -> None:
        self.db, self.sms, self.verifier, self.settings = db, sms, verifier, settings
        # set by the wiring: a deleted account's balance goes back through the wallet's refunds
        self.payout: Callable[[Any, str, int, int], dict[str, Any]] = _no_payout
        self.send_refunds: Callable[[list[str], int], None] | None = None
        self.pii = SecretBox(box.subkey("pii"))          # a key of its own for personal information
        self._code_key = box.subkey("sms-code")
        self._doc_key = box.subkey("document-number")
        settings.photo_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.photo_dir, 0o700)

    # ---------------------------------------------------------------- SMS login

    def _code_mac(self, phone: str, code: str) -> str:
        return hmac.new(self._code_key, f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()

    def request_code(self, raw_phone: str, client_ip: str, now_ms: int) -> dict[str, Any]:
        """Send a login code. Our limits come first, before any provider is asked: one code a minute per number,
        5 an hour and 10 a day per number, 30 an hour per network. The code's row is written (so it counts) and
        then the provider is called outside the transaction.

        A failed send still counts for the one-minute wait and for the network's hourly limit, so nobody can make
        us call the provider more than once a minute per number (the 503 says to try again in a minute). It does
        not count against the number's hourly and daily allowance (5 and 10), which protects the number's owner
        from a flood of messages and is not used up by messages that were never delivered: after a provider outage
        of any length the person can try again after the minute. (A send whose fate is unknown, a timeout, is not
        counted either; the minute still bounds it, and each such failure is an operator alarm.)
        A code the provider surely did not send is burned (``used_ms``), so a code sent before it still works; one
        whose fate is unknown stays usable, as the message may still arrive."""
        phone = normalized_phone(raw_phone)
        c = t.sms_codes.c
        with self.db.tx() as conn:
            self.db.lock(conn, f"sms-phone:{phone}")         # count-then-insert is atomic per number and network
            self.db.lock(conn, f"sms-ip:{client_ip[:64]}")

            def count(where, since_ms: int) -> int:
                return conn.execute(select(func.count()).select_from(t.sms_codes)
                                    .where(and_(where, c.created_ms > now_ms - since_ms))).scalar() or 0

            last = conn.execute(select(func.max(c.created_ms)).where(c.phone == phone)).scalar()
            if last is not None and now_ms - last < RESEND_AFTER_MS:
                wait_s = (RESEND_AFTER_MS - (now_ms - last) + 999) // 1000
                raise TooMany("sms_too_soon", f"a code was sent less than a minute ago; try again in {wait_s} s",
                               retry_after_s=wait_s)
            sent_to_phone = and_(c.phone == phone, c.send_error.is_(None))
            if count(sent_to_phone, HOUR_MS) >= CODES_PER_PHONE_PER_HOUR or \
                    count(sent_to_phone, DAY_MS) >= CODES_PER_PHONE_PER_DAY:
                raise TooMany("sms_limit_phone", "too many codes for this number; try again later",
                               retry_after_s=3600)
            if count(c.client_ip == client_ip, HOUR_MS) >= CODES_PER_IP_PER_HOUR:
                raise TooMany("sms_limit_ip", "too many codes requested from this network; try again later",
                               retry_after_s=3600)
            code = f"{secrets.randbelow(1_000_000):06d}"
            row_id = conn.execute(insert(t.sms_codes).values(
                phone=phone, code_mac=self._code_mac(phone, code), client_ip=client_ip[:64], created_ms=now_ms,
                expires_ms=now_ms + CODE_TTL_MS)).inserted_primary_key[0]
        if not _SENDS.acquire(timeout=SEND_WAIT_S):
            self._send_failed(row_id, phone, SmsFailed(self.sms.name, "busy", f"{CONCURRENT_SENDS} messages were "
                                                       "already being sent", retryable=True), now_ms)
        try:
            receipt = self.sms.send_code(phone, code, CODE_TTL_MS // 60_000)
        except SmsFailed as e:
            self._send_failed(row_id, phone, e, now_ms)
        except Exception as e:                  # a provider's bug: the person is told the same, operators see it
            log.exception("the SMS provider %s failed unexpectedly", self.sms.name)
            self._send_failed(row_id, phone, SmsFailed(self.sms.name, "provider_error", type(e).__name__,
                                                       retryable=True, may_have_sent=True), now_ms)
        finally:
            _SENDS.release()
        with self.db.tx() as conn:
            conn.execute(update(t.sms_codes).where(c.id == row_id).values(
                provider=receipt.provider[:32], provider_request_id=receipt.request_id[:80] or None))
        log.info("login code sent to %s by %s (request %s)", mask_phone(phone), receipt.provider, receipt.request_id)
        return {"sent": True, "phone_masked": mask_phone(phone), "resend_after_s": RESEND_AFTER_MS // 1000,
                "expires_in_s": CODE_TTL_MS // 1000, "development_sms_sink": self.sms.is_development}

    def _send_failed(self, row_id: int, phone: str, e: SmsFailed, now_ms: int) -> NoReturn:
        """Record why the code was not sent, tell operators (unless the number is the person's mistake), and
        refuse with words the person can act on."""
        c = t.sms_codes.c
        values: dict[str, Any] = {"provider": e.provider[:32], "send_error": f"{e.code}: {e.message}"[:200]}
        if not e.may_have_sent:
            values["used_ms"] = now_ms           # never delivered: burned, so an earlier code still works
        with self.db.tx() as conn:
            conn.execute(update(t.sms_codes).where(c.id == row_id).values(**values))
            if not e.user_fault:
                raise_alarm(conn, "sms", "send_failed", {"provider": e.provider, "code": e.code,
                                                         "message": e.message[:200], "phone_masked": mask_phone(phone),
                                                         "retryable": e.retryable}, now_ms)
        log.warning("login code to %s not sent by %s: %s: %s", mask_phone(phone), e.provider, e.code, e.message)
        if e.user_fault:
            raise Invalid("phone_rejected", "the SMS provider will not send to this number: check it, or use "
                                            "another number")
        raise Unavailable("sms_unavailable", "the SMS could not be sent; try again in a minute",
                          retry_after_s=RESEND_AFTER_MS // 1000)

    def login(self, raw_phone: str, code: str, now_ms: int) -> dict[str, Any]:
        phone = normalized_phone(raw_phone)
        c = t.sms_codes.c
        wrong: DomainError | None = None
        with self.db.tx() as conn:           # a wrong code's attempt is committed, then refused
            row = first_row(conn, select(t.sms_codes).where(and_(c.phone == phone, c.used_ms.is_(None)))
                       .order_by(c.created_ms.desc()).limit(1))
            if row is None:
                raise Unauthenticated("no_code", "request a code first")
            if row["expires_ms"] < now_ms:
                raise Unauthenticated("code_expired", "this code has expired: request a new one")
            # every guess takes an attempt first (a conditional update), so parallel guesses cannot exceed the limit
            took = conn.execute(update(t.sms_codes).where(and_(c.id == row["id"], c.attempts < CODE_MAX_ATTEMPTS))
                                .values(attempts=c.attempts + 1)).rowcount
            if took != 1:
                raise Unauthenticated("too_many_attempts", "too many wrong codes: request a new one")
            if not hmac.compare_digest(row["code_mac"], self._code_mac(phone, code.strip())):
                left = CODE_MAX_ATTEMPTS - row["attempts"] - 1
                wrong = Unauthenticated("wrong_code", f"wrong code; {left} attempts left" if left else
                                 "wrong code; request a new one", attempts_left=left)
        if wrong is not None:
            raise wrong
        with self.db.tx() as conn:
            claimed = conn.execute(update(t.sms_codes).where(and_(c.id == row["id"], c.used_ms.is_(None)))
                                   .values(used_ms=now_ms)).rowcount
            if claimed != 1:
                raise Unauthenticated("code_used", "this code was already used: request a new one")
            # a login burns every other code sent to this number: an older one cannot be used afterwards
            conn.execute(update(t.sms_codes).where(and_(c.phone == phone, c.used_ms.is_(None))).values(used_ms=now_ms))
            user = first_row(conn, select(t.users).where(t.users.c.phone == phone))
            new_user = user is None
            if new_user:
                user_id = "u-" + uuid.uuid4().hex[:16]
                conn.execute(insert(t.users).values(user_id=user_id, phone=phone, registered=False, created_ms=now_ms))
            else:
                user_id = user["user_id"]
            token = new_token()
            conn.execute(insert(t.user_tokens).values(token_hash=token_hash(token), user_id=user_id,
                                                      created_ms=now_ms, expires_ms=now_ms + TOKEN_TTL_MS))
        return {"token": token, "user_id": user_id, "new_user": new_user, "expires_in_s": TOKEN_TTL_MS // 1000}

    def user_for_token(self, token: str, now_ms: int) -> str:
        """The user a bearer token belongs to, while it is valid."""
        with self.db.read() as conn:
            row = conn.execute(select(t.user_tokens.c.user_id, t.user_tokens.c.expires_ms)
                               .where(t.user_tokens.c.token_hash == token_hash(token))).first()
        if row is None or row[1] < now_ms:
            raise Unauthenticated("unauthenticated", "your login has expired: log in again")
        return row[0]

    def me(self, user_id: str) -> dict[str, Any]:
        """The person's own view: registration, points, money (available, held, in arrears) and newest bills, in
        one consistent read."""
        with self.db.read() as conn:
            u = first_row(conn, select(t.users).where(t.users.c.user_id == user_id))
            available, held = balance(conn, user_id)
            bills = user_bills(conn, user_id, 50)
            state = conn.execute(select(t.identities.c.state).where(t.identities.c.user_id == user_id)).scalar()
        return {"user_id": user_id, "registered": u["registered"], "points": u["points"],
                "balance_fen": available + held, "held_fen": held, "available_fen": available,
                "arrears_fen": max(0, -available), "bills": bills, "phone_masked": mask_phone(u["phone"] or ""),
                "identity_state": state or "none"}

    def logout(self, token: str) -> None:
        with self.db.tx() as conn:
            conn.execute(t.user_tokens.delete().where(t.user_tokens.c.token_hash == token_hash(token)))

    # ---------------------------------------------------------------- consent, photo, registration

    def consent(self, user_id: str, version: str, now_ms: int) -> dict[str, Any]:
        if version != CONSENT_VERSION:
            raise Conflict("consent_outdated", f"the consent text has changed (now {CONSENT_VERSION}): "
                                                    "read it again", current_version=CONSENT_VERSION)
        with self.db.tx() as conn:
            if not self._has_consent(conn, user_id):
                conn.execute(insert(t.consents).values(user_id=user_id, kind=CONSENT_KIND, version=version,
                                                       granted_ms=now_ms))
        return {"kind": CONSENT_KIND, "version": version, "granted": True}

    def withdraw_consent(self, user_id: str, now_ms: int) -> None:
        """PIPL: withdrawing the consent erases what it allowed (the document number and photos); real-name
        registration, which needs them, ends too. Money, bills and points stay."""
        with self.db.tx() as conn:
            s = t.sessions.c
            if first_row(conn, select(s.session_id)
                         .where(and_(s.user_id == user_id, s.state.in_(("starting", "active"))))):
                raise Conflict("session_open", "finish your running session first")
            conn.execute(update(t.consents).where(and_(t.consents.c.user_id == user_id,
                                                       t.consents.c.withdrawn_ms.is_(None)))
                         .values(withdrawn_ms=now_ms))
            photos = conn.execute(select(t.id_photos.c.photo_id).where(and_(
                t.id_photos.c.user_id == user_id, t.id_photos.c.deleted_ms.is_(None)))).scalars().all()
            conn.execute(t.identities.delete().where(t.identities.c.user_id == user_id))
            conn.execute(update(t.users).where(t.users.c.user_id == user_id).values(registered=False))
        for photo_id in photos:
            self._delete_photo(photo_id, now_ms)
        log.info("consent withdrawn by %s: identity data erased", user_id)

    @staticmethod
    def _has_consent(conn, user_id: str) -> bool:
        c = t.consents.c
        return first_row(conn, select(c.id).where(and_(c.user_id == user_id, c.kind == CONSENT_KIND,
                                                  c.version == CONSENT_VERSION, c.withdrawn_ms.is_(None)))) is not None

    def _need_consent(self, conn, user_id: str) -> None:
        if not self._has_consent(conn, user_id):
            raise Forbidden("consent_required", "agree to the processing of your ID information first",
                           consent_version=CONSENT_VERSION)

    def photo_path(self, photo_id: str) -> Path:
        return self.settings.photo_dir / f"{photo_id}.enc"

    def upload_photo(self, user_id: str, data: bytes, content_type: str, now_ms: int) -> dict[str, Any]:
        with self.db.read() as conn:
            self._need_consent(conn, user_id)
            ph = t.id_photos.c
            recent = conn.execute(select(func.count(), func.coalesce(func.sum(ph.stored_bytes), 0)).where(and_(
                ph.user_id == user_id, ph.created_ms > now_ms - HOUR_MS))).one()
        if recent[0] >= PHOTOS_PER_HOUR:
            raise TooMany("upload_quota", f"at most {PHOTOS_PER_HOUR} photos an hour; try again later",
                           retry_after_s=3600)
        if content_type.split(";")[0].strip().lower() not in ("image/jpeg", "image/png"):
            raise UnsupportedMedia("not_an_image", "upload the photo as image/jpeg or image/png")
        if not _DECODES.acquire(timeout=DECODE_WAIT_S):       # decoding is memory-hungry: a few at a time
            raise Unavailable("busy", "too many photos are being checked right now; try again", retry_after_s=2)
        try:
            jpeg, w, h = reencode_photo(data)
        except PhotoRejected as e:
            raise (TooLarge if e.code == "photo_too_large" else Invalid)(e.code, str(e)) from None
        finally:
            _DECODES.release()
        photo_id = "p-" + uuid.uuid4().hex
        sealed = self.pii.seal(jpeg, f"id-photo:{photo_id}").encode()
        path = self.photo_path(photo_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(sealed)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            with self.db.tx() as conn:
                conn.execute(insert(t.id_photos).values(photo_id=photo_id, user_id=user_id, width_px=w, height_px=h,
                                                        stored_bytes=len(sealed), created_ms=now_ms))
        except Exception:
            path.unlink(missing_ok=True)
            raise
        return {"photo_id": photo_id, "width_px": w, "height_px": h}

    def register(self, user_id: str, legal_name: str, doc_type: str, doc_number: str, photo_id: str,
                 now_ms: int) -> dict[str, Any]:
        today = dt.datetime.fromtimestamp(now_ms / 1000, ZoneInfo(self.settings.timezone)).date()
        try:
            name = normalize_name(legal_name)
        except ValueError as e:
            raise Invalid("bad_name", str(e)) from None
        try:
            number = normalize_document(doc_type, doc_number, today)
        except ValueError as e:
            raise Invalid("bad_id_number", str(e)) from None
        mac = hmac.new(self._doc_key, f"{doc_type}:{number}".encode(), hashlib.sha256).hexdigest()
        at_once = self.verifier.decide_at_once(doc_type)
        with self.db.tx() as conn:
            self._need_consent(conn, user_id)
            photo = first_row(conn, select(t.id_photos).where(t.id_photos.c.photo_id == photo_id))
            if photo is None or photo["user_id"] != user_id or photo["deleted_ms"] is not None:
                raise Invalid("bad_photo", "upload a photo of the document first")
            prior = first_row(conn, select(t.identities).where(t.identities.c.user_id == user_id))
            if prior is not None and prior["state"] in ("pending", "verified"):
                raise Conflict("already_submitted", f"your registration is already {prior['state']}")
            if prior is not None:
                conn.execute(t.identities.delete().where(t.identities.c.user_id == user_id))
            values = dict(user_id=user_id, doc_type=doc_type,
                          number_enc=self.pii.seal(number.encode(), f"doc:{user_id}"),
                          number_masked=mask_document(number), number_mac=mac,
                          name_enc=self.pii.seal(name.encode(), f"name:{user_id}"), name_masked=mask_name(name),
                          photo_id=photo_id, state="verified" if at_once else "pending", verifier=self.verifier.name,
                          submitted_ms=now_ms, decided_ms=now_ms if at_once else None)
            try:
                with conn.begin_nested():
                    conn.execute(insert(t.identities).values(**values))
            except IntegrityError:
                raise Conflict("document_in_use", "this document is already registered to another account") \
                    from None
            if at_once:
                conn.execute(update(t.users).where(t.users.c.user_id == user_id).values(registered=True))
        log.info("registration of %s: %s %s (%s)", user_id, doc_type, mask_document(number), values["state"])
        return self.identity_view(user_id)

    def identity_view(self, user_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = first_row(conn, select(t.identities).where(t.identities.c.user_id == user_id))
            consent = self._has_consent(conn, user_id)
        base = {"consent_given": consent, "consent_version": CONSENT_VERSION,
                "photo_retention_days": self.settings.photo_retention_days,
                "review_hint": self.verifier.review_hint, "verifier": self.verifier.name}
        if row is None:
            return {**base, "state": "none"}
        return {**base, "state": row["state"], "doc_type": row["doc_type"], "number_masked": row["number_masked"],
                "name_masked": row["name_masked"], "reject_reason": row["reject_reason"],
                "submitted_ms": row["submitted_ms"], "decided_ms": row["decided_ms"]}

    # ---------------------------------------------------------------- review (operators with the reviewer role)

    def pending_reviews(self, limit: int, state: str = "pending") -> list[dict[str, Any]]:
        """The registrations waiting for a decision, oldest first; or the latest decided ones, newest first."""
        i = t.identities.c
        q = select(i.user_id, i.doc_type, i.number_masked, i.name_masked, i.photo_id, i.submitted_ms, i.state,
                   i.decided_ms, i.reject_reason).where(i.state == state)
        q = q.order_by(i.submitted_ms) if state == "pending" else q.order_by(i.decided_ms.desc())
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(q.limit(limit)).mappings().all()]

    def review_view(self, operator_id: str, user_id: str, now_ms: int) -> dict[str, Any]:
        """A registration as the reviewer must see it to compare with the photo: the name and number in full.
        Decrypted only here, and each view is audit-logged before anything leaves."""
        with self.db.tx() as conn:
            row = first_row(conn, select(t.identities).where(t.identities.c.user_id == user_id))
            if row is None:
                raise NotFound("no_registration", "this user has not registered")
            audit(conn, operator_id, "view_identity", user_id, {"state": row["state"]}, now_ms)
            photo = row["photo_id"] and first_row(conn, select(t.id_photos.c.deleted_ms).where(
                t.id_photos.c.photo_id == row["photo_id"]))
        return {"user_id": user_id, "doc_type": row["doc_type"], "state": row["state"],
                "name": self.pii.open(row["name_enc"], f"name:{user_id}").decode(),
                "number": self.pii.open(row["number_enc"], f"doc:{user_id}").decode(),
                "number_masked": row["number_masked"], "name_masked": row["name_masked"],
                "photo_stored": bool(photo) and photo["deleted_ms"] is None, "submitted_ms": row["submitted_ms"],
                "decided_ms": row["decided_ms"], "reject_reason": row["reject_reason"]}

    def view_photo(self, operator_id: str, user_id: str, now_ms: int) -> bytes:
        """The decrypted photo; every view is written to the audit log before the bytes leave."""
        with self.db.tx() as conn:
            row = first_row(conn, select(t.identities.c.photo_id).where(t.identities.c.user_id == user_id))
            photo = row and first_row(conn, select(t.id_photos).where(t.id_photos.c.photo_id == row["photo_id"]))
            if not photo or photo["deleted_ms"] is not None:
                raise NotFound("no_photo", "no stored photo for this user (never uploaded or already deleted)")
            audit(conn, operator_id, "view_id_photo", user_id, {"photo_id": photo["photo_id"]}, now_ms)
        try:
            sealed = self.photo_path(photo["photo_id"]).read_bytes()
        except FileNotFoundError:
            raise NotFound("no_photo", "the photo file is missing") from None
        return self.pii.open(sealed.decode(), f"id-photo:{photo['photo_id']}")

    def decide(self, operator_id: str, user_id: str, approve: bool, reason: str, now_ms: int) -> dict[str, Any]:
        with self.db.tx() as conn:
            row = first_row(conn, select(t.identities).where(t.identities.c.user_id == user_id))
            if row is None:
                raise NotFound("no_registration", "this user has not registered")
            if row["state"] != "pending":
                raise Conflict("not_pending", f"this registration is already {row['state']}")
            if not approve and not reason.strip():
                raise Invalid("reason_required", "say why the registration is rejected (the user sees it)")
            conn.execute(update(t.identities).where(t.identities.c.user_id == user_id).values(
                state="verified" if approve else "rejected", decided_ms=now_ms,
                reject_reason=None if approve else reason))
            if approve:
                conn.execute(update(t.users).where(t.users.c.user_id == user_id).values(registered=True))
            audit(conn, operator_id, "approve_identity" if approve else "reject_identity", user_id,
                  {"reason": reason}, now_ms)
        return self.identity_view(user_id)

    def purge_photos(self, now_ms: int) -> int:
        """Delete ID photos ``photo_retention_days`` after the registration was decided, and photos never
        used by a registration after a day. Returns how many were deleted."""
        keep_ms = self.settings.photo_retention_days * DAY_MS
        p, i = t.id_photos.c, t.identities.c
        with self.db.read() as conn:
            decided = conn.execute(select(p.photo_id).select_from(t.id_photos.join(
                t.identities, i.photo_id == p.photo_id)).where(and_(
                    p.deleted_ms.is_(None), i.decided_ms.is_not(None), i.decided_ms < now_ms - keep_ms))
            ).scalars().all()
            unused = conn.execute(select(p.photo_id).select_from(t.id_photos.outerjoin(
                t.identities, i.photo_id == p.photo_id)).where(and_(
                    p.deleted_ms.is_(None), i.user_id.is_(None), p.created_ms < now_ms - DAY_MS))).scalars().all()
        for photo_id in {*decided, *unused}:
            self._delete_photo(photo_id, now_ms)
        return len({*decided, *unused})

    def _delete_photo(self, photo_id: str, now_ms: int) -> None:
        self.photo_path(photo_id).unlink(missing_ok=True)
        with self.db.tx() as conn:
            conn.execute(update(t.id_photos).where(t.id_photos.c.photo_id == photo_id).values(deleted_ms=now_ms))

    # ---------------------------------------------------------------- deleting an account

    def delete_account(self, user_id: str, refund_balance: bool, now_ms: int) -> dict[str, Any]:
        """Erase the person (phone, name, document, photos, tokens); keep the money records, which the law
        requires, under the pseudonymous user id. A remaining balance is never forfeited: it leaves the wallet
        as refunds through the providers to the top-ups it came from (newest first, see
        :meth:`cloud.wallet.service.Wallet.withdraw_for_deletion`); what they cannot take becomes a manual
        refund the operator pays by transfer and marks paid (``/api/v1/operator/balance-refunds``)."""
        with self.db.tx() as conn:
            users_q = select(t.users.c.user_id).where(t.users.c.user_id == user_id)
            if not self.db.is_sqlite:
                users_q = users_q.with_for_update()     # a start at the same moment waits: its hold is counted
            first_row(conn, users_q)
            s = t.sessions.c
            if first_row(conn, select(s.session_id)
                         .where(and_(s.user_id == user_id, s.state.in_(("starting", "active"))))):
                raise Conflict("session_open", "finish your running session first")
            o = t.topup_orders.c
            if first_row(conn, select(o.order_id).where(and_(o.user_id == user_id, o.state == "pending",
                                                         o.expires_ms > now_ms))):
                raise Conflict("topup_pending", "a top-up is still being paid: wait until it is paid or closed "
                               "(at most 15 minutes), so its money is paid back too")
            available, _held = balance(conn, user_id)
            if available < 0:
                raise InsufficientFunds("arrears", f"pay the {-available} fen you owe before deleting the account",
                               balance_fen=available)
            if available > 0 and not refund_balance:
                raise Conflict("balance_remaining",
                               f"your balance of {available} fen is paid back to the payments it came from; "
                               "confirm with refund_balance", balance_fen=available)
            payout: dict[str, Any] = {"refund_ids": [], "manual_refund_id": None, "manual_fen": 0}
            if available > 0:
                payout = self.payout(conn, user_id, available, now_ms)
            photos = conn.execute(select(t.id_photos.c.photo_id).where(and_(
                t.id_photos.c.user_id == user_id, t.id_photos.c.deleted_ms.is_(None)))).scalars().all()
            conn.execute(t.identities.delete().where(t.identities.c.user_id == user_id))
            conn.execute(t.user_tokens.delete().where(t.user_tokens.c.user_id == user_id))
            phone = conn.execute(select(t.users.c.phone).where(t.users.c.user_id == user_id)).scalar()
            conn.execute(t.sms_codes.delete().where(t.sms_codes.c.phone == phone))     # they hold the number too
            conn.execute(update(t.consents).where(and_(t.consents.c.user_id == user_id,
                                                       t.consents.c.withdrawn_ms.is_(None))).values(withdrawn_ms=now_ms))
            conn.execute(update(t.users).where(t.users.c.user_id == user_id).values(
                phone=f"del-{user_id[2:18]}", name="", registered=False, deleted_ms=now_ms))
        for photo_id in photos:
            self._delete_photo(photo_id, now_ms)
        log.info("account %s deleted", user_id)
        if payout["refund_ids"] and self.send_refunds is not None:
            self.send_refunds(payout["refund_ids"], now_ms)
        return {"deleted": True, "refund_id": payout["manual_refund_id"], "refund_fen": max(0, available),
                "refund_ids": payout["refund_ids"], "manual_refund_fen": payout["manual_fen"]}


def _no_payout(conn, user_id: str, available_fen: int, now_ms: int) -> dict[str, Any]:
    raise Conflict("balance_remaining", "this service cannot pay a balance back")


def normalized_phone(raw: str) -> str:
    try:
        return normalize_phone(raw)
    except ValueError as e:
        raise Invalid("bad_phone", str(e)) from None
