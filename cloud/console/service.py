"""Operators signing in to the console: passwords (argon2id), an optional TOTP second factor, lockout after
repeated failures, sessions held in an HttpOnly cookie with a CSRF token derived from it, sign-out everywhere;
and the admins' management of operators (create, re-role, disable, reset). Every change is audit-logged in its
transaction. The bearer tokens for scripts (:mod:`cloud.operators.service`) stay as they were."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import unicodedata
from typing import Any

import pyotp
import segno
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from cloud import db as t
from cloud.cluster import SharedRateLimiter
from cloud.db import Database, audit, first_row
from cloud.errors import Conflict, Forbidden, Invalid, NotFound, TooMany, Unauthenticated, Unavailable
from cloud.security import SecretBox, new_token, token_hash

COOKIE = "tapshare_console"
CSRF_HEADER = "X-CSRF-Token"
SESSION_IDLE_MS = 60 * 60_000           # signed out after an hour without a request
SESSION_MAX_MS = 12 * 3_600_000         # and after a working day whatever happens
TOUCH_EVERY_MS = 60_000                 # last_seen written at most once a minute per session
MAX_FAILURES = 5                        # wrong passwords or codes in a row before the account locks
LOCK_MS = 15 * 60_000
GHOSTS = "console_unknown_names"         # rate_hits bucket: failed sign-ins with names nobody has
PASSWORD_MIN_CHARS = 10
TOTP_ISSUER = "Tapshare"
ROLES = {"viewer": 0, "operator": 1, "reviewer": 2, "admin": 3}
COMMON = {"password", "password1", "password123", "1234567890", "0123456789", "qwertyuiop", "iloveyou12",
          "tapshare123", "admin12345", "administrator", "1qaz2wsx3edc", "abc1234567", "aa12345678", "woaini1314",
          "qwerty12345", "1q2w3e4r5t", "a123456789", "5201314520", "1314520520", "qwe123456789", "zxcvbnm123",
          "asdfghjkl1", "p@ssw0rd123", "passw0rd12", "abcd123456", "1234qwer!@", "qq123456789", "123456789a",
          "wang123456", "zhang123456", "li12345678", "147258369a", "987654321a", "admin@123!"}
OPERATOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")
_hasher = PasswordHasher()             # argon2id, the library's defaults (RFC 9106's second recommendation)
_DUMMY = _hasher.hash("not anyone's password")   # verified against for unknown names: the same time either way
_HASHING = threading.BoundedSemaphore(4)  # 64 MiB each: a flood of sign-ins waits here, not in memory
HASH_WAIT_S = 5


def check_role(row: dict[str, Any], min_role: str, only: tuple[str, ...] = ()) -> None:
    if ROLES[row["role"]] < ROLES[min_role] or (only and row["role"] not in only):
        need = " or ".join(only) if only else f"at least {min_role}"
        raise Forbidden("forbidden", f"this needs the {need} role; you are {row['role']}")


def password_problem(password: str, operator_id: str) -> str | None:
    """Why a password may not be used (NIST SP 800-63B: length, not a known one, not the name), or ``None``."""
    if len(password) < PASSWORD_MIN_CHARS:
        return f"at least {PASSWORD_MIN_CHARS} characters"
    if len(password) > 200:
        return "at most 200 characters"
    low = _normal(password).lower()
    if low in COMMON or len(set(low)) < 4:
        return "too easy to guess"
    if operator_id.lower() in low:
        return "must not contain the operator's name"
    return None


def _ghost_key(name: str) -> str:
    """An unknown name as a key of bounded length (names are compared case-insensitively, as operators' are)."""
    return hashlib.sha256(name.casefold().encode()).hexdigest()


class ConsoleAuth:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db, self.box = db, box
        self._csrf_key = box.subkey("console-csrf")
        # guessing from one place, across names, counted by every instance together
        self.logins_by_network = SharedRateLimiter(db, "console_logins_by_network", 30, 60_000)

    # ---------------------------------------------------------------- signing in
    def login(self, name: str, password: str, totp_code: str, client_ip: str, user_agent: str, now_ms: int,
              old_token: str = "") -> tuple[str, dict[str, Any]]:
        """A new console session for the operator; the cookie's token and the operator's row. Unknown names and
        wrong passwords give the same answer in the same time; five failures in a row lock the name for 15
        minutes (each attempt is counted before the password is checked, so parallel guesses count too)."""
        with self.db.read() as conn:
            row = first_row(conn, select(t.operators).where(t.operators.c.operator_id == name))
        if row is None or row["password_hash"] is None:
            self._unknown_attempt(name, now_ms)          # a locked name answers at once, whether it exists or not
            _verify(_DUMMY, password)
            self._unknown_failed(name, now_ms)
            raise Unauthenticated("bad_credentials", "wrong name or password")
        self._attempt(name, now_ms)
        if not _verify(row["password_hash"], password):
            self._failed(name, "password", client_ip, now_ms)
            raise Unauthenticated("bad_credentials", "wrong name or password")
        if row["disabled_ms"] is not None:
            self._forgive(name)
            raise Forbidden("operator_disabled", "this operator has been disabled by an admin")
        step = None
        if row["totp_secret_enc"]:
            if not totp_code:
                self._forgive(name)                      # the password was right: asking for the code is no failure
                raise Unauthenticated("totp_required", "enter the 6-digit code from your authenticator app")
            step = self._totp_step(row["totp_secret_enc"], name, totp_code, now_ms)
            if step is None:
                self._failed(name, "totp", client_ip, now_ms)
                raise Unauthenticated("bad_totp", "wrong or already used code")
        token = new_token()
        o = t.operators.c
        with self.db.tx() as conn:
            if step is not None and not conn.execute(t.operators.update().where(and_(
                    o.operator_id == name, or_(o.totp_last_step.is_(None), o.totp_last_step < step)))
                    .values(totp_last_step=step)).rowcount:
                raise _Replayed()                      # this code (or a later one) was used already: once only
            conn.execute(t.operators.update().where(o.operator_id == name).values(failed_logins=0,
                                                                                  locked_until_ms=None))
            if old_token:                              # signing in again in this browser ends the session it had
                conn.execute(t.operator_sessions.update().where(
                    t.operator_sessions.c.session_hash == token_hash(old_token)).values(revoked_ms=now_ms))
            conn.execute(insert(t.operator_sessions).values(
                session_hash=token_hash(token), operator_id=name, created_ms=now_ms, last_seen_ms=now_ms,
                expires_ms=now_ms + SESSION_MAX_MS, client_ip=client_ip[:64], user_agent=user_agent[:200]))
            audit(conn, name, "console_login", name, {"ip": client_ip}, now_ms)
        return token, self.operator(name)

    def login_once(self, *args: Any, **kw: Any) -> tuple[str, dict[str, Any]]:
        """:meth:`login`, a replayed second-factor code counted as a failure."""
        try:
            return self.login(*args, **kw)
        except _Replayed:
            name, client_ip, now_ms = args[0], args[3], args[5]
            self._failed(name, "totp_replayed", client_ip, now_ms)
            raise Unauthenticated("bad_totp", "wrong or already used code") from None

    @staticmethod
    def _locked(until_ms: int, now_ms: int) -> TooMany:
        return TooMany("account_locked", "too many failed sign-ins: this account is locked for a while",
                       retry_after_s=max(1, (until_ms - now_ms + 999) // 1000))

    def _attempt(self, name: str, now_ms: int) -> int:
        """Count an attempt before its password is checked: refused at once while the name is locked, and the
        sixth of any number of parallel guesses locks it."""
        o = t.operators.c
        with self.db.tx() as conn:
            n = conn.execute(t.operators.update().where(and_(
                o.operator_id == name, or_(o.locked_until_ms.is_(None), o.locked_until_ms <= now_ms)))
                .values(failed_logins=o.failed_logins + 1, locked_until_ms=None).returning(o.failed_logins)).scalar()
            if n is not None and n > MAX_FAILURES:
                conn.execute(t.operators.update().where(o.operator_id == name)
                             .values(failed_logins=0, locked_until_ms=now_ms + LOCK_MS))
                audit(conn, name, "console_locked", name, {"minutes": LOCK_MS // 60_000, "parallel": True}, now_ms)
            until = conn.execute(select(o.locked_until_ms).where(o.operator_id == name)).scalar()
        if n is None or n > MAX_FAILURES:
            raise self._locked(until or now_ms + LOCK_MS, now_ms)
        return n

    def _forgive(self, name: str) -> None:
        o = t.operators.c
        with self.db.tx() as conn:
            conn.execute(t.operators.update().where(and_(o.operator_id == name, o.failed_logins > 0))
                         .values(failed_logins=o.failed_logins - 1))

    def _failed(self, name: str, what: str, client_ip: str, now_ms: int) -> None:
        """The attempt (already counted) failed: audited; the fifth in a row locks the name and ends its sessions
        (someone holding a stolen session cannot go on guessing the password or the code)."""
        o = t.operators.c
        with self.db.tx() as conn:
            n = conn.execute(select(o.failed_logins).where(o.operator_id == name)).scalar() or 0
            audit(conn, name, "console_login_failed" if what in ("password", "totp", "totp_replayed")
                  else f"console_{what}_failed", name, {"ip": client_ip, "wrong": what}, now_ms)
            if n >= MAX_FAILURES:
                conn.execute(t.operators.update().where(o.operator_id == name)
                             .values(failed_logins=0, locked_until_ms=now_ms + LOCK_MS))
                ended = self._revoke_sessions(conn, name, now_ms)
                audit(conn, name, "console_locked", name, {"ip": client_ip, "minutes": LOCK_MS // 60_000,
                                                          "sessions_ended": ended}, now_ms)

    def _unknown_attempt(self, name: str, now_ms: int) -> None:
        r = t.rate_hits.c
        with self.db.read() as conn:
            row = first_row(conn, select(r.hits, r.expires_ms).where(and_(
                r.bucket == GHOSTS, r.key == _ghost_key(name), r.window_ms == 0)))
        if row is not None and row["hits"] >= MAX_FAILURES and row["expires_ms"] > now_ms:
            raise self._locked(row["expires_ms"], now_ms)

    def _unknown_failed(self, name: str, now_ms: int) -> None:
        """A name nobody has is locked like a real one, so the lockout does not tell which names exist. Counted in
        the database (``rate_hits``, shared by every instance; the prune job forgets them ``LOCK_MS`` after the
        last failure): the fifth failure in a row locks the name for ``LOCK_MS``."""
        r, key = t.rate_hits.c, _ghost_key(name)
        with self.db.tx() as conn:
            self.db.lock(conn, f"{GHOSTS}:{key}")
            row = first_row(conn, select(r.hits, r.expires_ms).where(and_(
                r.bucket == GHOSTS, r.key == key, r.window_ms == 0)))
            n = 1 if row is None or row["expires_ms"] <= now_ms else row["hits"] + 1
            if row is None:
                conn.execute(insert(t.rate_hits).values(bucket=GHOSTS, key=key, window_ms=0, hits=n,
                                                         expires_ms=now_ms + LOCK_MS))
            else:
                conn.execute(update(t.rate_hits).where(and_(r.bucket == GHOSTS, r.key == key, r.window_ms == 0))
                             .values(hits=n, expires_ms=now_ms + LOCK_MS))

    def _check_own_password(self, row: dict[str, Any], password: str, what: str, client_ip: str,
                            now_ms: int) -> None:
        """One's password again, for changing the password or the second factor: counted and locked like a
        sign-in."""
        self._attempt(row["operator_id"], now_ms)
        if row["password_hash"] is None or not _verify(row["password_hash"], password):
            self._failed(row["operator_id"], what, client_ip, now_ms)
            raise Unauthenticated("bad_credentials", "the password is wrong")
        self._forgive(row["operator_id"])

    def session(self, token: str, now_ms: int) -> dict[str, Any]:
        """The operator of a live console session (refreshing its idle timer), or 401."""
        h = token_hash(token)
        s, o = t.operator_sessions.c, t.operators.c
        with self.db.read() as conn:
            row = first_row(conn, select(t.operators, s.last_seen_ms, s.expires_ms.label("session_expires_ms"),
                                         s.revoked_ms.label("session_revoked_ms"))
                            .join(t.operator_sessions, s.operator_id == o.operator_id).where(s.session_hash == h))
        if (row is None or row["session_revoked_ms"] is not None or row["session_expires_ms"] <= now_ms
                or row["last_seen_ms"] + SESSION_IDLE_MS <= now_ms):
            raise Unauthenticated("signed_out", "your console session has ended: sign in again")
        if row["disabled_ms"] is not None:
            raise Unauthenticated("operator_disabled", "this operator has been disabled by an admin")
        if now_ms - row["last_seen_ms"] >= TOUCH_EVERY_MS:
            with self.db.tx() as conn:
                conn.execute(t.operator_sessions.update().where(s.session_hash == h).values(last_seen_ms=now_ms))
        return row

    def csrf_token(self, session_token: str) -> str:
        """Derived from the session (nothing stored): a page of ours reads it from ``/me``, another site cannot."""
        return hmac.new(self._csrf_key, session_token.encode(), hashlib.sha256).hexdigest()[:40]

    def csrf_ok(self, session_token: str, given: str) -> bool:
        return hmac.compare_digest(self.csrf_token(session_token), given or "")

    def logout(self, token: str, operator_id: str, now_ms: int) -> None:
        with self.db.tx() as conn:
            conn.execute(t.operator_sessions.update().where(t.operator_sessions.c.session_hash == token_hash(token))
                         .values(revoked_ms=now_ms))
            audit(conn, operator_id, "console_logout", operator_id, {}, now_ms)

    def logout_everywhere(self, actor: str, operator_id: str, now_ms: int) -> int:
        """End every console session of the operator; returns how many were live."""
        with self.db.tx() as conn:
            n = self._revoke_sessions(conn, operator_id, now_ms)
            audit(conn, actor, "console_logout_everywhere", operator_id, {"sessions": n}, now_ms)
        return n

    @staticmethod
    def _revoke_sessions(conn: Any, operator_id: str, now_ms: int, keep_hash: str = "") -> int:
        s = t.operator_sessions.c
        return conn.execute(t.operator_sessions.update().where(and_(
            s.operator_id == operator_id, s.revoked_ms.is_(None), s.expires_ms > now_ms, s.session_hash != keep_hash))
            .values(revoked_ms=now_ms)).rowcount

    # ---------------------------------------------------------------- one's own account
    def operator(self, operator_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = first_row(conn, select(t.operators).where(t.operators.c.operator_id == operator_id))
        if row is None:
            raise NotFound("unknown_operator", "no such operator")
        return row

    def change_password(self, operator_id: str, current: str, new: str, token: str, now_ms: int,
                        client_ip: str = "") -> None:
        """The operator's own new password; their other sessions end."""
        row = self.operator(operator_id)
        self._check_password(new, operator_id)
        self._check_own_password(row, current, "password_change", client_ip, now_ms)
        with self.db.tx() as conn:
            conn.execute(t.operators.update().where(t.operators.c.operator_id == operator_id)
                         .values(password_hash=_hash(new), password_changed_ms=now_ms))
            n = self._revoke_sessions(conn, operator_id, now_ms, keep_hash=token_hash(token))
            audit(conn, operator_id, "console_password_changed", operator_id, {"other_sessions_ended": n}, now_ms)

    def totp_begin(self, operator_id: str, password: str, now_ms: int, client_ip: str = "") -> dict[str, Any]:
        """A new secret to add to an authenticator app, shown once; it takes effect when a code confirms it. The
        password first: a stolen session must not be able to put the attacker's phone on the account."""
        row = self.operator(operator_id)
        if row["totp_secret_enc"]:
            raise Conflict("totp_enabled", "the second factor is already on: turn it off first")
        self._check_own_password(row, password, "totp_setup", client_ip, now_ms)
        secret = pyotp.random_base32()
        with self.db.tx() as conn:
            conn.execute(t.operators.update().where(t.operators.c.operator_id == operator_id)
                         .values(totp_pending_enc=self.box.seal(secret.encode(), f"totp:{operator_id}")))
            audit(conn, operator_id, "console_totp_setup", operator_id, {}, now_ms)
        uri = pyotp.TOTP(secret).provisioning_uri(name=operator_id, issuer_name=TOTP_ISSUER)
        svg = segno.make(uri, error="m").svg_inline(scale=4, omitsize=True, dark="#111", light="#fff")
        return {"secret": secret, "otpauth_uri": uri, "qr_svg": svg}

    def totp_enable(self, operator_id: str, code: str, now_ms: int) -> None:
        row = self.operator(operator_id)
        if not row["totp_pending_enc"]:
            raise Conflict("totp_not_started", "start setting up the second factor first")
        step = self._totp_step(row["totp_pending_enc"], operator_id, code, now_ms)
        if step is None:
            raise Invalid("bad_totp", "wrong code: check the time on your phone and try the next code")
        with self.db.tx() as conn:
            conn.execute(t.operators.update().where(t.operators.c.operator_id == operator_id)
                         .values(totp_secret_enc=row["totp_pending_enc"], totp_pending_enc=None, totp_last_step=step))
            audit(conn, operator_id, "console_totp_enabled", operator_id, {}, now_ms)

    def totp_disable(self, operator_id: str, password: str, code: str, now_ms: int, client_ip: str = "") -> None:
        row = self.operator(operator_id)
        if not row["totp_secret_enc"]:
            raise Conflict("totp_off", "the second factor is not on")
        self._check_own_password(row, password, "totp_disable", client_ip, now_ms)
        step = self._totp_step(row["totp_secret_enc"], operator_id, code, now_ms)
        o = t.operators.c
        with self.db.tx() as conn:
            ok = step is not None and conn.execute(t.operators.update().where(and_(
                o.operator_id == operator_id, or_(o.totp_last_step.is_(None), o.totp_last_step < step)))
                .values(totp_secret_enc=None, totp_last_step=None)).rowcount == 1
            if ok:
                audit(conn, operator_id, "console_totp_disabled", operator_id, {}, now_ms)
        if not ok:
            self._attempt(operator_id, now_ms)
            self._failed(operator_id, "totp_disable", client_ip, now_ms)
            raise Unauthenticated("bad_totp", "wrong or already used code")

    def _totp_step(self, sealed: str, operator_id: str, code: str, now_ms: int) -> int | None:
        """The 30-second step the code belongs to (this one or its neighbours, for clock drift), or ``None``."""
        code = (code or "").strip().replace(" ", "")
        if not re.fullmatch(r"\d{6}", code):
            return None
        totp = pyotp.TOTP(self.box.open(sealed, f"totp:{operator_id}").decode())
        now_step = now_ms // 1000 // totp.interval
        for step in (now_step, now_step - 1, now_step + 1):
            if hmac.compare_digest(totp.at(step * totp.interval), code):
                return step
        return None

    @staticmethod
    def _check_password(password: str, operator_id: str) -> None:
        problem = password_problem(password, operator_id)
        if problem:
            raise Invalid("weak_password", f"choose another password: {problem}")

    # ---------------------------------------------------------------- admins manage operators
    def operators(self, now_ms: int) -> list[dict[str, Any]]:
        s = t.operator_sessions.c
        live = (select(s.operator_id, func.count().label("sessions"), func.max(s.last_seen_ms).label("last_seen_ms"))
                .where(and_(s.revoked_ms.is_(None), s.expires_ms > now_ms, s.last_seen_ms > now_ms - SESSION_IDLE_MS))
                .group_by(s.operator_id).subquery())
        o = t.operators.c
        with self.db.read() as conn:
            rows = conn.execute(select(t.operators, live.c.sessions, live.c.last_seen_ms)
                                .outerjoin(live, live.c.operator_id == o.operator_id)
                                .order_by(o.operator_id)).mappings().all()
        return [public(dict(r), now_ms) for r in rows]

    def create(self, admin_id: str, operator_id: str, display_name: str, role: str, password: str,
               now_ms: int) -> dict[str, Any]:
        if not OPERATOR_ID.fullmatch(operator_id):
            raise Invalid("bad_operator_id", "2-64 letters, digits and . _ @ -, starting with a letter or digit")
        self._check_password(password, operator_id)
        hashed = _hash(password)
        try:
            with self.db.tx() as conn:
                taken = first_row(conn, select(t.operators.c.operator_id).where(
                    func.lower(t.operators.c.operator_id) == operator_id.lower()))
                if taken:               # "Boss" and "boss" would be two people no one can tell apart in the log
                    raise Conflict("operator_exists", f"this name is taken: {taken['operator_id']}")
                self._insert_operator(conn, admin_id, operator_id, display_name, role, hashed, now_ms)
        except IntegrityError:          # two admins made the same name at once
            raise Conflict("operator_exists", "an operator with this name already exists") from None
        return public(self.operator(operator_id), now_ms)

    @staticmethod
    def _insert_operator(conn: Any, admin_id: str, operator_id: str, display_name: str, role: str, hashed: str,
                         now_ms: int) -> None:
        conn.execute(insert(t.operators).values(
            operator_id=operator_id, display_name=display_name, role=role, token_hash=None, created_ms=now_ms,
            password_hash=hashed, password_changed_ms=now_ms, failed_logins=0))
        audit(conn, admin_id, "operator_created", operator_id, {"role": role, "display_name": display_name}, now_ms)

    def change(self, admin_id: str, operator_id: str, changes: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """Re-role, rename, disable or enable, reset the password or the second factor. Disabling (or a new
        password) ends the operator's sessions and revokes its token. The last enabled admin stays one."""
        row = self.operator(operator_id)
        values: dict[str, Any] = {}
        told: dict[str, Any] = {}
        if "role" in changes and changes["role"] != row["role"]:
            values["role"] = told["role"] = changes["role"]
        if "display_name" in changes:
            values["display_name"] = told["display_name"] = changes["display_name"]
        if changes.get("disabled") is True and row["disabled_ms"] is None:
            values["disabled_ms"], told["disabled"] = now_ms, True
        elif changes.get("disabled") is False and row["disabled_ms"] is not None:
            values.update(disabled_ms=None, failed_logins=0, locked_until_ms=None)
            told["disabled"] = False
        if changes.get("password"):
            self._check_password(changes["password"], operator_id)
            values.update(password_hash=_hash(changes["password"]), password_changed_ms=now_ms,
                          failed_logins=0, locked_until_ms=None)
            told["password_reset"] = True
        if changes.get("reset_totp") and (row["totp_secret_enc"] or row["totp_pending_enc"]):
            values.update(totp_secret_enc=None, totp_pending_enc=None, totp_last_step=None)
            told["totp_reset"] = True
        if changes.get("unlock") and row["locked_until_ms"]:
            values.update(failed_logins=0, locked_until_ms=None)
            told["unlocked"] = True
        if not values:
            return public(row, now_ms)
        with self.db.tx() as conn:
            if values.get("role", "admin") != "admin" or values.get("disabled_ms") is not None:
                self._keep_an_admin(conn, operator_id, now_ms)
            conn.execute(t.operators.update().where(t.operators.c.operator_id == operator_id).values(**values))
            if told.get("disabled") or told.get("password_reset"):
                told["sessions_ended"] = self._revoke_sessions(conn, operator_id, now_ms)
            if told.get("disabled"):
                conn.execute(t.operators.update().where(and_(t.operators.c.operator_id == operator_id,
                                                             t.operators.c.revoked_ms.is_(None)))
                             .values(revoked_ms=now_ms))
            audit(conn, admin_id, "operator_changed", operator_id, told, now_ms)
        return public(self.operator(operator_id), now_ms)

    def _keep_an_admin(self, conn: Any, operator_id: str, now_ms: int) -> None:
        """Refuse to demote or disable the last admin who can still act (signs in with a password, or holds a
        live token). The admins' rows are locked first, so two admins demoting each other at once cannot both
        succeed (SQLite writes one at a time anyway)."""
        o = t.operators.c
        admins = select(o.operator_id, o.password_hash, o.token_hash, o.revoked_ms, o.expires_ms).where(and_(
            o.role == "admin", o.disabled_ms.is_(None)))
        if not self.db.is_sqlite:
            admins = admins.order_by(o.operator_id).with_for_update()
        rows = conn.execute(admins).mappings().all()
        if operator_id not in {r["operator_id"] for r in rows}:
            return                                   # not an enabled admin (any more): nothing to keep
        able = [r for r in rows if r["operator_id"] != operator_id and (
            r["password_hash"] is not None or (r["token_hash"] is not None and r["revoked_ms"] is None
                                               and (r["expires_ms"] is None or r["expires_ms"] > now_ms)))]
        if not able:
            raise Conflict("last_admin", "this is the last admin who can sign in: make another admin first")

    def set_password(self, operator_id: str, password: str, now_ms: int, actor: str = "cli") -> None:
        """From the command line (the first admin's password): checked like any other."""
        self.operator(operator_id)
        self._check_password(password, operator_id)
        with self.db.tx() as conn:
            conn.execute(t.operators.update().where(t.operators.c.operator_id == operator_id).values(
                password_hash=_hash(password), password_changed_ms=now_ms, failed_logins=0,
                locked_until_ms=None))
            self._revoke_sessions(conn, operator_id, now_ms)
            audit(conn, actor, "operator_password_set", operator_id, {}, now_ms)


def public(row: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """What the console shows of an operator: never a hash or a secret."""
    return {"operator_id": row["operator_id"], "display_name": row["display_name"], "role": row["role"],
            "created_ms": row["created_ms"], "disabled": row["disabled_ms"] is not None,
            "can_sign_in": row["password_hash"] is not None, "totp_enabled": bool(row["totp_secret_enc"]),
            "locked": bool(row["locked_until_ms"] and row["locked_until_ms"] > now_ms),
            "has_token": row["token_hash"] is not None and row["revoked_ms"] is None
            and (row["expires_ms"] is None or row["expires_ms"] > now_ms),
            "sessions": row.get("sessions") or 0, "last_seen_ms": row.get("last_seen_ms")}


class _Replayed(Exception):
    """A second-factor code whose step (or a later one) was used already."""


def _normal(password: str) -> str:
    """NFKC: a password typed with a Chinese input method in full width is the same password in half width."""
    return unicodedata.normalize("NFKC", password)


def _hashing() -> None:
    if not _HASHING.acquire(timeout=HASH_WAIT_S):
        raise Unavailable("busy", "too many sign-ins are being checked right now; try again", retry_after_s=2)


def _hash(password: str) -> str:
    _hashing()
    try:
        return _hasher.hash(_normal(password))
    finally:
        _HASHING.release()


def _verify(hashed: str, password: str) -> bool:
    _hashing()
    try:
        return _hasher.verify(hashed, _normal(password))
    except (VerificationError, InvalidHashError):
        return False
    finally:
        _HASHING.release()
