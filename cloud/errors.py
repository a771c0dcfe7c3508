"""The cloud's refusals. Services raise these domain errors (a code for programs, words for people, and any
extra fields); only :func:`install_handlers` knows the HTTP status each one answers with. Every refusal has
the one shape ``{"error": code, "message": text, ...}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tapshare.cloud")


class DomainError(Exception):
    """A refusal a caller can act on."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


class BadRequest(DomainError):
    """The request cannot be understood at all (e.g. a protocol version this cloud does not speak)."""


class Invalid(DomainError):
    """A well-formed request with a value that is not allowed."""


class Unauthenticated(DomainError):
    """No credentials, or unknown, expired or revoked ones."""


class Forbidden(DomainError):
    """Known caller, not allowed to do this."""


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    """The state does not allow it now (already exists, already paid, a session is open, ...)."""


class Gone(DomainError):
    """It existed but is over (an expired code, a used token)."""


class InsufficientFunds(DomainError):
    pass


class TooLarge(DomainError):
    pass


class UnsupportedMedia(DomainError):
    pass


class TooMany(DomainError):
    """Rate limited; ``retry_after_s`` says when to try again."""


class Unavailable(DomainError):
    """Not the caller's fault: try again (``retry_after_s``)."""


HTTP_STATUS: dict[type[DomainError], int] = {
    BadRequest: 400, Unauthenticated: 401, InsufficientFunds: 402, Forbidden: 403, NotFound: 404, Conflict: 409,
    Gone: 410, TooLarge: 413, UnsupportedMedia: 415, Invalid: 422, TooMany: 429, Unavailable: 503,
}


def http_status(e: DomainError) -> int:
    return next((s for cls, s in HTTP_STATUS.items() if isinstance(e, cls)), 400)


class Err(BaseModel):
    error: str
    message: str


RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})   # PostgreSQL: deadlock detected, serialization failure
# PostgreSQL, besides class 08 (connection exceptions): shut down by an administrator or a crash, not accepting
# connections yet (starting, recovering), too many connections, the database gone
UNREACHABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", "3D000"})


def database_trouble(e: DBAPIError) -> str | None:
    """``"busy"`` (undone in a deadlock or a serialization failure, SQLite's busy wait run out), ``"unavailable"``
    (the database cannot be reached) or None: anything else (a constraint, a statement timeout, a wrong query) is a
    bug, not a passing condition."""
    state = getattr(e.orig, "sqlstate", None)
    if state in RETRYABLE_SQLSTATES:
        return "busy"
    if e.connection_invalidated:
        return "unavailable"
    if not isinstance(e, OperationalError):
        return None
    if type(e.orig).__module__.startswith("psycopg"):
        # no SQLSTATE: no answer from a server at all (refused, cut, timed out while connecting)
        return "unavailable" if state is None or state.startswith("08") or state in UNREACHABLE_SQLSTATES else None
    return "busy" if "database is locked" in str(e.orig) else None


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": Err} for s in (400, 401, 403, 404, 409, 410, 413, 422)}


def install_handlers(app: FastAPI) -> None:
    """Every error, ours, the framework's and unexpected ones, in the one shape."""

    @app.exception_handler(DomainError)
    async def domain_error(_req: Request, e: DomainError) -> JSONResponse:
        status = http_status(e)
        headers = {"Retry-After": str(int(e.extra.get("retry_after_s", 1)))} if status in (429, 503) else {}
        return JSONResponse({"error": e.code, "message": e.message, **e.extra}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        """Unknown paths, wrong methods and the like."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        return JSONResponse({"error": code, "message": str(e.detail)}, status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(DBAPIError)
    async def database_error(req: Request, e: DBAPIError) -> JSONResponse:
        """A deadlock or a serialization failure (PostgreSQL chose this request to undo: two transactions took the
        same rows in opposite orders) or a database that cannot be reached is nobody's bug and passes: 503 with
        Retry-After (devices retry it from their outbox; the phone pages say it in words). Anything else from the
        database (a constraint, a statement timeout, a wrong query) is a bug: 500, logged with its traceback."""
        trouble = database_trouble(e)
        if trouble == "busy":
            log.warning("%s %s undone by the database (%s): answered 503 to be retried", req.method, req.url.path,
                        e.orig)
            return await domain_error(req, Unavailable(
                "database_busy", "the database undid this request because another one took the same rows at the "
                "same moment; nothing of it was kept: try again", retry_after_s=1))
        if trouble == "unavailable":
            log.error("%s %s: the database cannot be reached: %s", req.method, req.url.path, e.orig)
            return await domain_error(req, Unavailable("database_unavailable", "the database did not answer; try again",
                                                       retry_after_s=2))
        return await internal_error(req, e)

    @app.exception_handler(SqlTimeout)
    async def pool_exhausted(req: Request, e: SqlTimeout) -> JSONResponse:
        """Every pooled connection stayed in use for the pool's whole wait (30 s): overload, not a bug of this
        request."""
        log.error("%s %s: no database connection came free: %s", req.method, req.url.path, e)
        return await domain_error(req, Unavailable(
            "database_busy", "every connection to the database is in use; nothing of this request was done: try "
            "again", retry_after_s=2))

    @app.exception_handler(Exception)
    async def internal_error(_req: Request, e: Exception) -> JSONResponse:
        log.error("internal error: %r", e, exc_info=e)
        return JSONResponse({"error": "internal", "message": "an internal error: it was logged; try again"},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_req: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"error": "invalid_request", "message": f"{where}: {first.get('msg', 'invalid')}",
                             "details": [{"loc": list(x.get("loc", ())), "msg": x.get("msg")} for x in e.errors()]},
                            status_code=422)


class ProviderConfigError(ValueError):
    """A real provider's credentials are missing or unusable; the message names the environment variable and
    never holds key material. Settings turn it into SettingsError, which stops start-up."""
