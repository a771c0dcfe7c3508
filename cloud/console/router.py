"""The operators' console: its page (``/console``, a small JavaScript app in ``cloud/static/console``), signing in
and out, one's own password and second factor, and admins managing operators. The console's other data comes
from the operators' API (:mod:`cloud.operators.router` and the other features), which takes the console's cookie
as well as bearer tokens."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Request, Response
from fastapi.responses import FileResponse

from cloud.console.schemas import (
    LoginIn,
    MeOut,
    NewOperatorIn,
    OperatorChangeIn,
    OperatorOut,
    OperatorsOut,
    PasswordIn,
    SignedOutOut,
    TotpCodeIn,
    TotpOffIn,
    TotpSetupIn,
    TotpSetupOut,
)
from cloud.console.service import COOKIE, SESSION_IDLE_MS, SESSION_MAX_MS, public
from cloud.deps import Admin, IdPath, Now, Svc, Viewer
from cloud.errors import ERRORS, TooMany, Unauthenticated
from cloud.pages import PAGE_HEADERS, STATIC
from cloud.schemas import OkOut

router = APIRouter(prefix="/api/v1/console", tags=["console"], responses=ERRORS)
pages = APIRouter(include_in_schema=False)
CONSOLE = STATIC / "console"


@pages.get("/console")
def console_page() -> FileResponse:
    return FileResponse(CONSOLE / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _session_cookie(token: str | None) -> str:
    if not token:
        raise Unauthenticated("signed_out", "sign in to the console first")
    return token


@router.post("/login", response_model=MeOut)
def login(body: LoginIn, request: Request, response: Response, svc: Svc, now: Now) -> dict[str, Any]:
    """Sign in with name and password (and the authenticator's code if the second factor is on). The session is
    an HttpOnly, SameSite=Strict cookie; changes also need the returned CSRF token in the X-CSRF-Token header."""
    wait = svc.console.logins_by_network.hit(_client_ip(request), now)
    if wait is not None:
        raise TooMany("too_many_logins", "too many sign-in attempts from this network", retry_after_s=wait)
    token, row = svc.console.login_once(body.name, body.password, body.totp, _client_ip(request),
                                        request.headers.get("user-agent", ""), now,
                                        old_token=request.cookies.get(COOKIE, ""))
    secure = svc.settings.production or svc.settings.public_url.startswith("https://")
    response.set_cookie(COOKIE, token, max_age=SESSION_MAX_MS // 1000, path="/", httponly=True, samesite="strict",
                        secure=secure)
    return {"operator": public(row, now), "csrf_token": svc.console.csrf_token(token),
            "session_expires_ms": now + SESSION_MAX_MS, "idle_timeout_ms": SESSION_IDLE_MS}


@router.get("/me", response_model=MeOut)
def me(svc: Svc, now: Now, tapshare_console: Annotated[str | None, Cookie()] = None) -> dict[str, Any]:
    """Who is signed in, and the CSRF token the page sends with every change."""
    token = _session_cookie(tapshare_console)
    row = svc.console.session(token, now)
    return {"operator": public(row, now), "csrf_token": svc.console.csrf_token(token),
            "session_expires_ms": row["session_expires_ms"], "idle_timeout_ms": SESSION_IDLE_MS}


@router.post("/logout", response_model=OkOut)
def logout(op: Viewer, response: Response, svc: Svc, now: Now,
           tapshare_console: Annotated[str | None, Cookie()] = None) -> dict[str, Any]:
    if tapshare_console:
        svc.console.logout(tapshare_console, op["operator_id"], now)
    response.delete_cookie(COOKIE, path="/")
    return {"ok": True}


@router.post("/logout-everywhere", response_model=SignedOutOut)
def logout_everywhere(op: Viewer, response: Response, svc: Svc, now: Now) -> dict[str, Any]:
    """End every console session of the signed-in operator, on every computer, this one included."""
    n = svc.console.logout_everywhere(op["operator_id"], op["operator_id"], now)
    response.delete_cookie(COOKIE, path="/")
    return {"ok": True, "sessions_ended": n}


@router.post("/password", response_model=OkOut)
def change_password(body: PasswordIn, request: Request, op: Viewer, svc: Svc, now: Now,
                    tapshare_console: Annotated[str | None, Cookie()] = None) -> dict[str, Any]:
    """One's own new password; one's other sessions end. A wrong current password counts like a failed sign-in."""
    svc.console.change_password(op["operator_id"], body.current, body.new, tapshare_console or "", now,
                                _client_ip(request))
    return {"ok": True}


@router.post("/totp/setup", response_model=TotpSetupOut)
def totp_setup(body: TotpSetupIn, request: Request, op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    """A new second-factor secret, after the password (a stolen session cannot enrol the thief's phone)."""
    return svc.console.totp_begin(op["operator_id"], body.password, now, _client_ip(request))


@router.post("/totp/enable", response_model=OkOut)
def totp_enable(body: TotpCodeIn, op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    svc.console.totp_enable(op["operator_id"], body.code, now)
    return {"ok": True}


@router.post("/totp/disable", response_model=OkOut)
def totp_disable(body: TotpOffIn, request: Request, op: Viewer, svc: Svc, now: Now) -> dict[str, Any]:
    svc.console.totp_disable(op["operator_id"], body.password, body.code, now, _client_ip(request))
    return {"ok": True}


@router.get("/operators", response_model=OperatorsOut)
def list_operators(op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    return {"operators": svc.console.operators(now)}


@router.post("/operators", response_model=OperatorOut)
def create_operator(body: NewOperatorIn, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.console.create(op["operator_id"], body.operator_id, body.display_name, body.role, body.password, now)


@router.patch("/operators/{operator_id}", response_model=OperatorOut)
def change_operator(operator_id: IdPath, body: OperatorChangeIn, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.console.change(op["operator_id"], operator_id, body.model_dump(exclude_none=True), now)


@router.post("/operators/{operator_id}/logout-everywhere", response_model=SignedOutOut)
def sign_out_operator(operator_id: IdPath, op: Admin, svc: Svc, now: Now) -> dict[str, Any]:
    svc.console.operator(operator_id)
    return {"ok": True, "sessions_ended": svc.console.logout_everywhere(op["operator_id"], operator_id, now)}
