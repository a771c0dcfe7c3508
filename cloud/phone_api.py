"""HTTP routes of the accounts issue: SMS login, consent, registration, review, wallet and top-up, refunds,
bills, points and gifts. Wired by :func:`cloud.app.create_app`."""


import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi import Path as PathParam
from sqlalchemy import func, select

from cloud import db as t
from cloud.accounts import Accounts, DevSmsSink
from cloud.db import Database
from cloud.identity import mask_phone
from cloud.payments import MAX_TOPUP_FEN, MIN_TOPUP_FEN, Wallet
from cloud.rewards import Rewards
from cloud.schemas import (
    BalanceRefundOut,
    BalanceRefundPaidIn,
    BalanceRefundsOut,
    BillOut,
    BillsOut,
    ClientConfigOut,
    ConsentIn,
    DeleteAccountIn,
    DeleteAccountOut,
    DevSmsOut,
    GiftChangeIn,
    GiftIn,
    GiftOut,
    GiftsOut,
    IdentityOut,
    LoginIn,
    LoginOut,
    NotifyAckOut,
    OkOut,
    OrderOut,
    PendingReviewsOut,
    PhotoOut,
    PointsOut,
    RedeemIn,
    RedemptionOut,
    RedemptionsOut,
    RefundIn,
    RefundOut,
    RegisterIn,
    ReviewIn,
    SmsCodeIn,
    SmsCodeOut,
    TopupIn,
    TopupOut,
    WalletOut,
)
from cloud.service import ApiError, balance

DEV_INBOX_COOKIE = "tapshare_dev_inbox"


@dataclass
class PhoneDeps:
    database: Database
    accounts: Accounts
    wallet: Wallet
    rewards: Rewards
    now: Callable[[], int]
    production: bool
    errors: dict
    user: Any          # the FastAPI dependency giving the user id
    bearer: Callable[[str | None], str]
    operator: Callable[..., Any]
    public_url: Callable[[], str]      # the configured public address: never taken from a request's Host header
    operator_name: str = ""            # who handles personal information, and how to reach them (PIPL)
    operator_contact: str = ""


def local_time(iso_utc: str, tz: str) -> str:
    try:
        when = dt.datetime.fromisoformat(iso_utc.replace("Z", "+00:00"))
    except ValueError:
        return iso_utc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S")


def bill_views(conn, bills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bills as the phone shows them: in the machine's time zone, with any refund. Two queries for the
    whole list, not two per bill."""
    if not bills:
        return []
    m, e = t.machines.c, t.balance_entries.c
    places = {r[0]: (r[1] or "Asia/Shanghai", r[2]) for r in conn.execute(
        select(m.machine_id, m.timezone, m.location).where(m.machine_id.in_({b["machine_id"] for b in bills})))}
    refunds = dict(conn.execute(select(e.session_id, func.sum(e.amount_fen)).where(
        e.session_id.in_([b["session_id"] for b in bills]), e.kind == "refund").group_by(e.session_id)).all())
    out = []
    for bill in bills:
        tz, location = places.get(bill["machine_id"], ("Asia/Shanghai", ""))
        out.append({**bill, "timezone": tz, "location": location, "started_local": local_time(bill["started_at"], tz),
                    "ended_local": local_time(bill["ended_at"], tz),
                    "refunded_fen": int(refunds.get(bill["session_id"]) or 0)})
    return out


def bill_view(conn, bill: dict[str, Any]) -> dict[str, Any]:
    return bill_views(conn, [bill])[0]


def add_phone_routes(app: FastAPI, d: PhoneDeps) -> None:
    ERR = d.errors
    now = d.now
    User = Annotated[str, Depends(d.user)]
    Reviewer = Annotated[dict, Depends(d.operator("reviewer"))]
    Operator = Annotated[dict, Depends(d.operator("operator"))]
    MoneyOperator = Annotated[dict, Depends(d.operator("operator", only=("operator", "admin")))]   # not reviewers
    Viewer = Annotated[dict, Depends(d.operator("viewer"))]
    IdPath = Annotated[str, PathParam(max_length=64)]

    @app.get("/api/v1/client-config", response_model=ClientConfigOut, tags=["accounts"])
    def client_config() -> dict[str, Any]:
        """What the phone pages must tell people: development providers are not real ones."""
        return {"development_sms_sink": d.accounts.sms.is_development,
                "sandbox_payments": d.wallet.provider.is_development,
                "id_verifier": d.accounts.verifier.name, "timezone": d.accounts.settings.timezone,
                "operator_name": d.operator_name, "operator_contact": d.operator_contact}

    # ---------------------------------------------------------------- login
    @app.post("/api/v1/auth/sms-code", response_model=SmsCodeOut, tags=["accounts"],
              responses={**ERR, 429: {"model": ERR[400]["model"]}})
    def sms_code(body: SmsCodeIn, request: Request, response: Response) -> dict[str, Any]:
        """Send a one-time login code (rate-limited per number and per network). With the development SMS sink,
        this browser (a cookie) and only this browser may read the code it asked for."""
        ip = request.client.host if request.client else "?"
        out = d.accounts.request_code(body.phone, ip, now())
        sink = d.accounts.sms
        if isinstance(sink, DevSmsSink):
            from cloud.accounts import _phone
            key = request.cookies.get(DEV_INBOX_COOKIE) or secrets.token_urlsafe(24)
            sink.allow(_phone(body.phone), key)
            response.set_cookie(DEV_INBOX_COOKIE, key, httponly=True, samesite="strict", path="/api/v1/dev",
                                secure=d.production)
        return out

    @app.post("/api/v1/auth/login", response_model=LoginOut, responses=ERR, tags=["accounts"])
    def login(body: LoginIn) -> dict[str, Any]:
        """Log in (or sign up) with the number and its code; returns a bearer token for 30 days."""
        return d.accounts.login(body.phone, body.code, now())

    @app.post("/api/v1/auth/logout", response_model=OkOut, responses=ERR, tags=["accounts"])
    def logout(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        d.accounts.logout(d.bearer(authorization))
        return {"ok": True}

    @app.get("/api/v1/dev/sms", response_model=DevSmsOut, responses=ERR, tags=["development"])
    def dev_sms(phone: Annotated[str, Query(min_length=1, max_length=24)], request: Request) -> dict[str, Any]:
        """Development only: the messages the development SMS sink 'sent' to a number (no real SMS is sent),
        shown only to the browser that asked for them."""
        sink = d.accounts.sms
        if d.production or not isinstance(sink, DevSmsSink):
            raise ApiError(403, "not_development", "there is no development SMS sink on this server")
        from cloud.accounts import _phone
        messages = sink.messages_for(_phone(phone), request.cookies.get(DEV_INBOX_COOKIE, ""))
        return {"note": "development SMS sink: not a real SMS gateway; only the browser that asked sees a code",
                "messages": messages}

    # ---------------------------------------------------------------- registration (s4)
    @app.get("/api/v1/me/identity", response_model=IdentityOut, responses=ERR, tags=["accounts"])
    def identity(user_id: User) -> dict[str, Any]:
        return d.accounts.identity_view(user_id)

    @app.post("/api/v1/me/consent", response_model=IdentityOut, responses=ERR, tags=["accounts"])
    def consent(body: ConsentIn, user_id: User) -> dict[str, Any]:
        """Separate consent (PIPL art. 29) to process the ID number and document photo, before collection."""
        d.accounts.consent(user_id, body.version, now())
        return d.accounts.identity_view(user_id)

    @app.delete("/api/v1/me/consent", response_model=IdentityOut, responses=ERR, tags=["accounts"])
    def withdraw_consent(user_id: User) -> dict[str, Any]:
        """Withdraw the consent to process the ID document (PIPL art. 15): the document photo and number are
        erased and buying water needs a new registration; money and bills stay."""
        d.accounts.withdraw_consent(user_id, now())
        return d.accounts.identity_view(user_id)

    @app.put("/api/v1/me/id-photo", response_model=PhotoOut, tags=["accounts"],
             responses={**ERR, 415: {"model": ERR[400]["model"]}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                 "image/png": {"schema": {"type": "string", "format": "binary"}}}}})
    async def id_photo(request: Request, user_id: User) -> dict[str, Any]:
        """The photo of the document, as the raw body (image/jpeg or image/png, at most 5 MB). It is checked,
        re-encoded without metadata and stored encrypted."""
        from fastapi.concurrency import run_in_threadpool
        data = await request.body()
        return await run_in_threadpool(d.accounts.upload_photo, user_id, data,
                                       request.headers.get("content-type", ""), now())

    @app.post("/api/v1/me/registration", response_model=IdentityOut, responses=ERR, tags=["accounts"])
    def register(body: RegisterIn, user_id: User) -> dict[str, Any]:
        return d.accounts.register(user_id, body.legal_name, body.doc_type, body.doc_number, body.photo_id, now())

    @app.delete("/api/v1/me", response_model=DeleteAccountOut, responses=ERR, tags=["accounts"])
    def delete_account(body: DeleteAccountIn, user_id: User) -> dict[str, Any]:
        return d.accounts.delete_account(user_id, body.refund_balance, now())

    @app.get("/api/v1/operator/identities", response_model=PendingReviewsOut, responses=ERR, tags=["operator"])
    def pending(op: Reviewer, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
        return {"pending": d.accounts.pending_reviews(limit)}

    @app.get("/api/v1/operator/identities/{user_id}/photo", tags=["operator"], response_class=Response,
             responses={**ERR, 200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                                     "description": "the re-encoded photo"}})
    def view_photo(user_id: IdPath, op: Reviewer) -> Response:
        """The document photo (reviewer role; every view is audit-logged)."""
        jpeg = d.accounts.view_photo(op["operator_id"], user_id, now())
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/api/v1/operator/identities/{user_id}/review", response_model=IdentityOut, responses=ERR,
              tags=["operator"])
    def review(user_id: IdPath, body: ReviewIn, op: Reviewer) -> dict[str, Any]:
        return d.accounts.decide(op["operator_id"], user_id, body.approve, body.reason, now())

    # ---------------------------------------------------------------- wallet (s5)
    @app.get("/api/v1/me/wallet", response_model=WalletOut, responses=ERR, tags=["wallet"])
    def wallet(user_id: User) -> dict[str, Any]:
        e, o = t.balance_entries.c, t.topup_orders.c
        with d.database.read() as conn:
            available, held = balance(conn, user_id)
            entries = conn.execute(select(e.kind, e.amount_fen, e.session_id, e.note, e.created_ms)
                                   .where(e.user_id == user_id, e.kind.not_in(("hold", "release")))
                                   .order_by(e.entry_id.desc()).limit(50)).mappings().all()
            orders = conn.execute(select(o.order_id, o.amount_fen, o.state, o.created_ms, o.expires_ms, o.paid_ms)
                                  .where(o.user_id == user_id).order_by(o.created_ms.desc()).limit(20)).mappings().all()
        return {"balance_fen": available + held, "held_fen": held, "available_fen": available,
                "arrears_fen": max(0, -available), "entries": [dict(x) for x in entries],
                "orders": [dict(x) for x in orders], "sandbox": d.wallet.provider.is_development,
                "min_topup_fen": MIN_TOPUP_FEN, "max_topup_fen": MAX_TOPUP_FEN}

    @app.post("/api/v1/me/topups", response_model=TopupOut, responses=ERR, tags=["wallet"])
    def topup(body: TopupIn, request: Request, user_id: User) -> dict[str, Any]:
        """Create a top-up order at the payment provider; the balance changes only when the provider's
        verified notification arrives."""
        base = d.public_url()
        return d.wallet.create_topup(user_id, body.amount_fen, base + "/api/v1/payments/notify",
                                     base + body.return_path, now())

    @app.get("/api/v1/me/topups/{order_id}", response_model=OrderOut, responses=ERR, tags=["wallet"])
    def order(order_id: IdPath, user_id: User) -> dict[str, Any]:
        return d.wallet.order(user_id, order_id)

    @app.post("/api/v1/payments/notify", response_model=NotifyAckOut, tags=["wallet"], responses=ERR)
    async def payment_notify(request: Request) -> dict[str, Any]:
        """The payment provider's signed notification (server to server). Idempotent."""
        from fastapi.concurrency import run_in_threadpool
        body = await request.body()
        return await run_in_threadpool(d.wallet.notify, dict(request.headers), body, now())

    @app.post("/api/v1/operator/sessions/{session_id}/refund", response_model=RefundOut, responses=ERR,
              tags=["operator"])
    def refund(session_id: IdPath, body: RefundIn, op: MoneyOperator) -> dict[str, Any]:
        return d.wallet.refund(op["operator_id"], session_id, body.amount_fen, body.reason, now())

    @app.get("/api/v1/operator/balance-refunds", response_model=BalanceRefundsOut, responses=ERR, tags=["operator"])
    def balance_refunds(op: MoneyOperator, state: Annotated[str, Query(pattern="^(requested|paid)$")] = "requested",
                        limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
        """Balances owed back to people who deleted their account, with the top-ups to refund them through."""
        return {"refunds": d.wallet.balance_refunds(state, limit)}

    @app.post("/api/v1/operator/balance-refunds/{refund_id}/paid", response_model=BalanceRefundOut, responses=ERR,
              tags=["operator"])
    def balance_refund_paid(refund_id: IdPath, body: BalanceRefundPaidIn, op: MoneyOperator) -> dict[str, Any]:
        """The operator paid it back (the provider's refund number or the transfer's reference); audit-logged."""
        return d.wallet.balance_refund_paid(op["operator_id"], refund_id, body.reference, now())

    # ---------------------------------------------------------------- bills (s6)
    @app.get("/api/v1/me/bills", response_model=BillsOut, responses=ERR, tags=["phone"])
    def bills(user_id: User, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
        with d.database.read() as conn:
            rows = conn.execute(select(t.bills).where(t.bills.c.user_id == user_id)
                                .order_by(t.bills.c.created_ms.desc()).limit(limit)).mappings().all()
            return {"bills": bill_views(conn, [dict(b) for b in rows])}

    @app.get("/api/v1/me/bills/{session_id}", response_model=BillOut, responses=ERR, tags=["phone"])
    def bill(session_id: IdPath, user_id: User) -> dict[str, Any]:
        with d.database.read() as conn:
            row = conn.execute(select(t.bills).where(t.bills.c.session_id == session_id)).mappings().first()
            if row is None or row["user_id"] != user_id:
                raise ApiError(404, "unknown_bill", "no such bill")
            return bill_view(conn, dict(row))

    # ---------------------------------------------------------------- points and gifts (s6)
    @app.get("/api/v1/me/points", response_model=PointsOut, responses=ERR, tags=["points"])
    def points(user_id: User) -> dict[str, Any]:
        return d.rewards.history(user_id)

    @app.get("/api/v1/gifts", response_model=GiftsOut, tags=["points"])
    def gifts() -> dict[str, Any]:
        return {"gifts": d.rewards.catalog()}

    @app.post("/api/v1/gifts/{gift_id}/redeem", response_model=RedemptionOut, responses=ERR, tags=["points"])
    def redeem(gift_id: IdPath, body: RedeemIn, user_id: User) -> dict[str, Any]:
        """Redeem points for a gift, once per request id (a retried request returns the same redemption)."""
        return d.rewards.redeem(user_id, gift_id, body.request_id, now())

    @app.get("/api/v1/me/redemptions", response_model=RedemptionsOut, responses=ERR, tags=["points"])
    def redemptions(user_id: User) -> dict[str, Any]:
        return {"redemptions": d.rewards.redemptions(user_id)}

    @app.get("/api/v1/operator/gifts", response_model=GiftsOut, responses=ERR, tags=["operator"])
    def all_gifts(op: Viewer) -> dict[str, Any]:
        return {"gifts": d.rewards.catalog(include_inactive=True)}

    @app.post("/api/v1/operator/gifts", response_model=GiftOut, responses=ERR, tags=["operator"])
    def add_gift(body: GiftIn, op: Operator) -> dict[str, Any]:
        return d.rewards.add_gift(op["operator_id"], body.name_zh, body.name_en, body.points_cost, body.stock, now())

    @app.patch("/api/v1/operator/gifts/{gift_id}", response_model=GiftOut, responses=ERR, tags=["operator"])
    def change_gift(gift_id: IdPath, body: GiftChangeIn, op: Operator) -> dict[str, Any]:
        return d.rewards.change_gift(op["operator_id"], gift_id, body.model_dump(exclude_none=True), now())


def me_extra(conn, user_id: str) -> dict[str, Any]:
    """What /api/v1/me adds for accounts: the masked phone and the registration state."""
    u = conn.execute(select(t.users.c.phone).where(t.users.c.user_id == user_id)).scalar() or ""
    state = conn.execute(select(t.identities.c.state).where(t.identities.c.user_id == user_id)).scalar()
    return {"phone_masked": mask_phone(u), "identity_state": state or "none"}

