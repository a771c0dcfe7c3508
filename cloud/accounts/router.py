"""People's accounts: what the phone pages must say about this server, SMS login, the person's own view
(``/me``), PIPL consent, real-name registration with the document photo, account deletion, and the reviewers'
queue of registrations."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud.accounts.providers import DevSmsSink
from cloud.accounts.schemas import (
    ClientConfigOut,
    ConsentIn,
    DeleteAccountIn,
    DeleteAccountOut,
    IdentityOut,
    LoginIn,
    LoginOut,
    MeOut,
    PendingReviewsOut,
    PhotoOut,
    RegisterIn,
    ReviewIn,
    ReviewViewOut,
    SmsCodeIn,
    SmsCodeOut,
)
from cloud.accounts.service import normalized_phone
from cloud.deps import Bearer, IdPath, Now, Reviewer, Svc, User
from cloud.errors import ERRORS, Err
from cloud.schemas import OkOut

router = APIRouter(prefix="/api/v1", tags=["accounts"], responses=ERRORS)
DEV_INBOX_COOKIE = "tapshare_dev_inbox"


@router.get("/client-config", response_model=ClientConfigOut)
def client_config(svc: Svc) -> dict[str, Any]:
    """What the phone pages must tell people: development providers are not real ones, and who handles their
    personal information."""
    a = svc.accounts
    return {"development_sms_sink": a.sms.is_development, "sandbox_payments": "sandbox" in svc.wallet.providers,
            "payment_methods": svc.wallet.methods(),
            "id_verifier": a.verifier.name, "timezone": a.settings.timezone,
            "operator_name": svc.settings.operator_name, "operator_contact": svc.settings.operator_contact}


# ---------------------------------------------------------------- login
@router.post("/auth/sms-code", response_model=SmsCodeOut, responses={429: {"model": Err}})
def sms_code(body: SmsCodeIn, request: Request, response: Response, svc: Svc, now: Now) -> dict[str, Any]:
    """Send a one-time login code (rate-limited per number and per network). With the development SMS sink,
    this browser (a cookie) and only this browser may read the code it asked for."""
    ip = request.client.host if request.client else "?"
    out = svc.accounts.request_code(body.phone, ip, now)
    sink = svc.accounts.sms
    if isinstance(sink, DevSmsSink):
        key = request.cookies.get(DEV_INBOX_COOKIE) or secrets.token_urlsafe(24)
        sink.allow(normalized_phone(body.phone), key)
        response.set_cookie(DEV_INBOX_COOKIE, key, httponly=True, samesite="strict", path="/api/v1/dev",
                            secure=svc.settings.production)
    return out


@router.post("/auth/login", response_model=LoginOut)
def login(body: LoginIn, svc: Svc, now: Now) -> dict[str, Any]:
    """Log in (or sign up) with the number and its code; returns a bearer token for 30 days."""
    return svc.accounts.login(body.phone, body.code, now)


@router.post("/auth/logout", response_model=OkOut)
def logout(token: Bearer, svc: Svc) -> dict[str, Any]:
    svc.accounts.logout(token)
    return {"ok": True}


# ---------------------------------------------------------------- the person's own view
@router.get("/me", response_model=MeOut, tags=["phone"])
def me(user_id: User, svc: Svc) -> dict[str, Any]:
    return {**svc.accounts.me(user_id), "running_session": svc.sessions.running_session(user_id)}


@router.delete("/me", response_model=DeleteAccountOut)
def delete_account(body: DeleteAccountIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.accounts.delete_account(user_id, body.refund_balance, now)


# ---------------------------------------------------------------- registration (s4)
@router.get("/me/identity", response_model=IdentityOut)
def identity(user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.accounts.identity_view(user_id)


@router.post("/me/consent", response_model=IdentityOut)
def consent(body: ConsentIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Separate consent (PIPL art. 29) to process the ID number and document photo, before collection."""
    svc.accounts.consent(user_id, body.version, now)
    return svc.accounts.identity_view(user_id)


@router.delete("/me/consent", response_model=IdentityOut)
def withdraw_consent(user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Withdraw the consent to process the ID document (PIPL art. 15): the document photo and number are
    erased and buying water needs a new registration; money and bills stay."""
    svc.accounts.withdraw_consent(user_id, now)
    return svc.accounts.identity_view(user_id)


@router.put("/me/id-photo", response_model=PhotoOut, responses={415: {"model": Err}},
            openapi_extra={"requestBody": {"required": True, "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}}}}})
async def id_photo(request: Request, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """The photo of the document, as the raw body (image/jpeg or image/png, at most 5 MB). It is checked,
    re-encoded without metadata and stored encrypted."""
    data = await request.body()
    return await run_in_threadpool(svc.accounts.upload_photo, user_id, data,
                                   request.headers.get("content-type", ""), now)


@router.post("/me/registration", response_model=IdentityOut)
def register(body: RegisterIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.accounts.register(user_id, body.legal_name, body.doc_type, body.doc_number, body.photo_id, now)


# ---------------------------------------------------------------- reviewers
@router.get("/operator/identities", response_model=PendingReviewsOut, tags=["operator"])
def pending(op: Reviewer, svc: Svc, limit: Annotated[int, Query(ge=1, le=500)] = 100,
            state: Literal["pending", "verified", "rejected"] = "pending") -> dict[str, Any]:
    """The queue of registrations waiting for review (oldest first), or the latest decided ones."""
    return {"pending": svc.accounts.pending_reviews(limit, state)}


@router.get("/operator/identities/{user_id}", response_model=ReviewViewOut, tags=["operator"])
def review_view(user_id: IdPath, op: Reviewer, svc: Svc, now: Now) -> dict[str, Any]:
    """A registration with the name and number in full, to compare with the photo (every view audit-logged)."""
    return svc.accounts.review_view(op["operator_id"], user_id, now)


@router.get("/operator/identities/{user_id}/photo", tags=["operator"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the re-encoded photo"}})
def view_photo(user_id: IdPath, op: Reviewer, svc: Svc, now: Now) -> Response:
    """The document photo (reviewer role; every view is audit-logged)."""
    jpeg = svc.accounts.view_photo(op["operator_id"], user_id, now)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@router.post("/operator/identities/{user_id}/review", response_model=IdentityOut, tags=["operator"])
def review(user_id: IdPath, body: ReviewIn, op: Reviewer, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.accounts.decide(op["operator_id"], user_id, body.approve, body.reason, now)
