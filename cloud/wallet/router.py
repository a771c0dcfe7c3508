"""Money (s5): the wallet page, top-ups through the payment provider and its signed notifications, and the
operators' refunds (of a session, and of a deleted account's balance)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from cloud.deps import IdPath, MoneyOperator, Now, Svc, User
from cloud.errors import ERRORS
from cloud.wallet.schemas import (
    BalanceRefundOut,
    BalanceRefundPaidIn,
    BalanceRefundsOut,
    NotifyAckOut,
    OrderOut,
    RefundIn,
    RefundOut,
    TopupIn,
    TopupOut,
    WalletOut,
)

router = APIRouter(prefix="/api/v1", tags=["wallet"], responses=ERRORS)


@router.get("/me/wallet", response_model=WalletOut)
def wallet(user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.wallet.view(user_id)


@router.post("/me/topups", response_model=TopupOut)
def topup(body: TopupIn, user_id: User, svc: Svc, now: Now) -> dict[str, Any]:
    """Create a top-up order at the payment provider; the balance changes only when the provider's
    verified notification arrives."""
    base = svc.settings.public_url.rstrip("/")     # the configured address: never a request's Host header
    return svc.wallet.create_topup(user_id, body.amount_fen, base + "/api/v1/payments/notify",
                                   base + body.return_path, now)


@router.get("/me/topups/{order_id}", response_model=OrderOut)
def order(order_id: IdPath, user_id: User, svc: Svc) -> dict[str, Any]:
    return svc.wallet.order(user_id, order_id)


@router.post("/payments/notify", response_model=NotifyAckOut)
async def payment_notify(request: Request, svc: Svc, now: Now) -> dict[str, Any]:
    """The payment provider's signed notification (server to server). Idempotent."""
    body = await request.body()
    return await run_in_threadpool(svc.wallet.notify, dict(request.headers), body, now)


@router.post("/operator/sessions/{session_id}/refund", response_model=RefundOut, tags=["operator"])
def refund(session_id: IdPath, body: RefundIn, op: MoneyOperator, svc: Svc, now: Now) -> dict[str, Any]:
    return svc.wallet.refund(op["operator_id"], session_id, body.amount_fen, body.reason, now)


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
