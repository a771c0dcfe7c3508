"""Request and response models of the wallet API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from cloud.schemas import In


class BalanceRefundOut(BaseModel):
    refund_id: str
    user_id: str
    amount_fen: int
    state: str
    created_ms: int
    paid_ms: int | None
    paid_by: str | None
    reference: str | None
    orders: list[dict[str, Any]]


class BalanceRefundsOut(BaseModel):
    refunds: list[BalanceRefundOut]


class BalanceRefundPaidIn(In):
    reference: Annotated[str, Field(min_length=1, max_length=100)]


class TopupIn(In):
    amount_fen: Annotated[int, Field(ge=1, le=10_000_000)]
    return_path: Annotated[str, Field(max_length=300, pattern=r"^/[A-Za-z0-9_./#?=&{}%-]*$")] = \
        "/app#/wallet?order={order_id}"


class TopupOut(BaseModel):
    order_id: str
    amount_fen: int
    state: str
    pay_url: str
    expires_ms: int
    sandbox: bool


class OrderOut(BaseModel):
    order_id: str
    amount_fen: int
    state: str
    created_ms: int
    expires_ms: int
    paid_ms: int | None


class EntryOut(BaseModel):
    kind: str
    amount_fen: int
    session_id: str | None
    note: str
    created_ms: int


class WalletOut(BaseModel):
    balance_fen: int
    held_fen: int
    available_fen: int
    arrears_fen: int
    entries: list[EntryOut]
    orders: list[OrderOut]
    sandbox: bool
    min_topup_fen: int
    max_topup_fen: int


class NotifyAckOut(BaseModel):
    """What the payment provider is told: SUCCESS stops its retries."""

    code: str
    credited: bool
    duplicate: bool = False


class RefundIn(In):
    amount_fen: Annotated[int, Field(ge=1, le=10_000_000)]
    reason: Annotated[str, Field(min_length=1, max_length=200)]


class RefundOut(BaseModel):
    session_id: str
    refunded_fen: int
    charged_fen: int
