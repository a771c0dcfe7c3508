"""Money (s5): the wallet page, top-ups through the payment providers (WeChat Pay, Alipay, or the development
sandbox) and their signed notifications, withdrawals of the balance to the payments it came from, the WeChat
web authorisation JSAPI payments need, and the operators' refunds and daily reconciliations."""

from __future__ import annotations

import secrets
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse

from cloud.deps import IdPath, MoneyOperator, Now, Svc, User, Viewer
from cloud.errors import ERRORS
from cloud.wallet.schemas import (
    BalanceRefundOut,
    BalanceRefundPaidIn,
    BalanceRefundsOut,
    NotifyAckOut,
    OrderOut,
    PayerLinkIn,
    PayerLinkOut,
    ProviderRefundsOut,
    ReconcileIn,
    ReconciliationOut,
    RefundIn,
    RefundOut,
    TopupIn,
    TopupOut,
    WalletOut,
    WithdrawIn,
    WithdrawOut,
)

router = APIRouter(prefix="/api/v1", tags=["wallet"], responses=ERRORS)


@router.get("/me/wallet", response_model=WalletOut)
def wallet(user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.wallet.view(user_id, now)


@router.post("/me/topups", response_model=TopupOut)
def topup(body: TopupIn, request: Request, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Create a top-up order at the chosen payment provider (``provider``, ``channel``: see ``methods`` in the
    wallet); the balance changes only when the provider's verified notification arrives."""
    base = svc.settings.public_url.rstrip("/")
    return svc.wallet.create_topup(user_id, body.amount_fen, base + body.return_path, now,
                                   provider=body.provider, channel=body.channel,
                                   client_ip=request.client.host if request.client else "")


@router.get("/me/topups/{order_id}", response_model=OrderOut)
def order(order_id: IdPath, user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.wallet.order(user_id, order_id)


@router.post("/me/withdrawals", response_model=WithdrawOut)
def withdraw(body: WithdrawIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Take (part of) the balance back to the payments it came from (refunds, newest top-up first, each
    followed to its end on the wallet page). Without ``amount_fen``: all that can go back."""
    return svc.wallet.withdraw(user_id, body.amount_fen, now)


PAYER_COOKIE = "tapshare_payer_link"


@router.post("/me/payer-link", response_model=PayerLinkOut)
def payer_link(body: PayerLinkIn, response: Response, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Paying inside WeChat needs the payer's openid: the page opens this WeChat authorisation address once
    (silent, snsapi_base) and WeChat brings the person back through ``/api/v1/payments/wechatpay/oauth``. The
    link works only in the browser that asked (a cookie), for 10 minutes."""
    redirect = svc.settings.public_url.rstrip("/") + "/api/v1/payments/wechatpay/oauth"
    key = secrets.token_urlsafe(18)
    response.set_cookie(PAYER_COOKIE, key, max_age=600, httponly=True, samesite="lax",
                        secure=svc.settings.public_url.startswith("https://"), path="/api/v1/payments/wechatpay")
    return {"url": svc.wallet.payer_link(user_id, body.provider, body.resume_fen, redirect, now, browser_key=key)}


@router.get("/payments/wechatpay/oauth", include_in_schema=False)
def wechat_oauth_return(request: Request, svc: Svc, now: Now, code: Annotated[str, Query(max_length=200)] = "",
                        state: Annotated[str, Query(max_length=400)] = "") -> RedirectResponse:
    """WeChat's redirect after the authorisation: the code becomes the openid, kept for this person."""
    back = svc.wallet.payer_return("wechatpay", code, state, now, request.cookies.get(PAYER_COOKIE, ""))
    out = RedirectResponse(back, status_code=303)
    out.delete_cookie(PAYER_COOKIE, path="/api/v1/payments/wechatpay")
    return out


async def _notify(provider: str, request: Request, svc: Svc, now: int) -> Response:
    body = await request.body()
    ack = await run_in_threadpool(svc.wallet.notify, provider, dict(request.headers), body, now)
    return Response(ack.body, status_code=ack.status_code, media_type=ack.media_type)


@router.post("/payments/notify/{provider}", response_model=NotifyAckOut)
async def payment_notify(provider: IdPath, request: Request, svc: Svc, now: Now) -> Response:
    """A payment provider's signed notification (server to server), verified by that provider's published
    rule and answered in its format (WeChat Pay: 204; Alipay: ``success``) only once committed. Idempotent.
    Anything not genuine or not matching is refused with an error, and the provider sends it again later."""
    return await _notify(provider, request, svc, now)


@router.post("/payments/notify", response_model=NotifyAckOut, include_in_schema=False)
async def payment_notify_sandbox(request: Request, svc: Svc, now: Now) -> Response:
    """The sandbox's notifications (its earlier orders were told this address)."""
    return await _notify("sandbox", request, svc, now)


@router.post("/operator/sessions/{session_id}/refund", response_model=RefundOut, tags=["operator"])
def refund(session_id: IdPath, body: RefundIn, op: MoneyOperator, svc: Svc, now: Now) -> dict[str, Any]:
    """Refund (part of) a settled session's charge: to the person's balance (``to: balance``), or on to the
    payments the balance came from (``to: original``)."""
    return svc.wallet.refund(op["operator_id"], session_id, body.amount_fen, body.reason, now, to=body.to)


@router.get("/operator/refunds", response_model=ProviderRefundsOut, tags=["operator"])
def provider_refunds(op: Viewer, svc: Svc,
                     state: Annotated[str, Query(pattern="^(all|requested|processing|success|closed|abnormal|failed)$")]
                     = "all", limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    """Refunds through the providers, each to its final state (newest first)."""
    return {"refunds": svc.wallet.provider_refunds(state, limit)}


@router.post("/operator/reconciliations", response_model=ReconciliationOut, tags=["operator"])
def reconcile(body: ReconcileIn, op: MoneyOperator, svc: Svc, now: Now) -> dict[str, Any]:
    """Fetch a provider's trade bill for a day (UTC+8) and compare it with our orders and refunds: missing on
    either side, duplicated, or of another amount. A mismatch raises an operator alarm. Runs by itself every
    day for yesterday once the bills are out."""
    return svc.wallet.reconcile(body.provider, body.day(), now)


@router.get("/operator/reconciliations/{provider}/{bill_date}", response_model=ReconciliationOut, tags=["operator"])
def reconciliation(provider: IdPath, bill_date: date, op: Viewer, svc: Svc) -> dict[str, Any]:
    return svc.wallet.reconciliation(provider, bill_date)


@router.get("/operator/balance-refunds", response_model=BalanceRefundsOut, tags=["operator"])
def balance_refunds(op: MoneyOperator, svc: Svc,
                    state: Annotated[str, Query(pattern="^(requested|paid)$")] = "requested",
                    limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    """Balances owed back to people who deleted their account, with the top-ups to refund them through."""
    return {"refunds": svc.wallet.balance_refunds(state, limit)}


@router.post("/operator/balance-refunds/{refund_id}/paid", response_model=BalanceRefundOut, tags=["operator"])
def balance_refund_paid(refund_id: IdPath, body: BalanceRefundPaidIn, op: MoneyOperator, svc: Svc,
                        now: Now) -> dict[str, Any]:
    """The operator paid it back (the provider's refund number or the transfer's reference); audit-logged."""
    return svc.wallet.balance_refund_paid(op["operator_id"], refund_id, body.reference, now)
