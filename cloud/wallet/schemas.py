"""Request and response models of the wallet API."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from cloud.errors import Invalid
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


ReturnPath = Annotated[str, Field(max_length=300, pattern=r"^/[A-Za-z0-9_./#?=&{}%-]*$")]
ProviderName = Annotated[str, Field(max_length=32, pattern=r"^[a-z0-9_]*$")]


class TopupIn(In):
    amount_fen: Annotated[int, Field(ge=1, le=10_000_000)]
    return_path: ReturnPath = "/app#/wallet?order={order_id}"
    provider: ProviderName = ""         # empty: the first one offered
    channel: Annotated[str, Field(max_length=16, pattern=r"^(|jsapi|h5|native|wap|precreate|page)$")] = ""


class TopupOut(BaseModel):
    order_id: str
    amount_fen: int
    state: str
    provider: str
    channel: str
    pay_kind: str                       # redirect (open pay_url), jsapi (WeixinJSBridge), qr (show qr_text)
    pay_url: str
    qr_text: str
    qr_svg: str                         # the QR code to show, as inline SVG (empty unless pay_kind is qr)
    jsapi_params: dict[str, str]
    expires_ms: int
    sandbox: bool


class OrderOut(BaseModel):
    order_id: str
    amount_fen: int
    state: str
    created_ms: int
    expires_ms: int
    paid_ms: int | None
    provider: str
    refunded_fen: int


class MethodOut(BaseModel):
    provider: str
    channels: list[str]
    development: bool


class ProviderRefundOut(BaseModel):
    refund_id: str
    order_id: str
    provider: str
    amount_fen: int
    state: str                          # requested, processing, success, closed, abnormal, failed
    created_ms: int
    done_ms: int | None


class OperatorRefundOut(ProviderRefundOut):
    user_id: str
    origin: str
    attempts: int
    last_error: str | None
    requested_by: str


class ProviderRefundsOut(BaseModel):
    refunds: list[OperatorRefundOut]


class WithdrawIn(In):
    amount_fen: Annotated[int | None, Field(ge=1, le=10_000_000)] = None


class WithdrawOut(BaseModel):
    withdrawn_fen: int
    kept_fen: int
    refunds: list[ProviderRefundOut]


class PayerLinkIn(In):
    provider: Literal["wechatpay"] = "wechatpay"
    resume_fen: Annotated[int, Field(ge=0, le=10_000_000)] = 0      # the top-up to go on with once back


class PayerLinkOut(BaseModel):
    url: str


class ReconcileIn(In):
    provider: ProviderName
    bill_date: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]     # the provider's day (UTC+8)

    def day(self) -> date:
        try:
            return date.fromisoformat(self.bill_date)
        except ValueError:
            raise Invalid("bad_date", f"no such day: {self.bill_date}") from None


class ReconciliationOut(BaseModel):
    provider: str
    bill_date: str
    state: str                          # matched, mismatch
    checked_ms: int
    missing_here: list[dict[str, Any]]  # in the provider's bill, not paid/refunded here that day
    missing_there: list[dict[str, Any]]     # paid/refunded here, not in the bill
    duplicated: list[dict[str, Any]]
    wrong_amount: list[dict[str, Any]]
    bill_payments: int
    bill_refunds: int
    bill_payments_fen: int
    bill_refunds_fen: int
    our_payments: int
    our_refunds: int


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
    refunds: list[ProviderRefundOut]
    withdrawable_fen: int               # what can go back to the payments it came from now
    methods: list[MethodOut]
    sandbox: bool
    min_topup_fen: int
    max_topup_fen: int


class NotifyAckOut(BaseModel):
    """What the sandbox is told; WeChat Pay is answered 204 and Alipay the text ``success``."""

    code: str
    message: str = ""


class RefundIn(In):
    amount_fen: Annotated[int, Field(ge=1, le=10_000_000)]
    reason: Annotated[str, Field(min_length=1, max_length=200)]
    to: Literal["balance", "original"] = "balance"


class RefundOut(BaseModel):
    session_id: str
    refunded_fen: int
    charged_fen: int
    to: str
    to_original_fen: int
    to_balance_fen: int
    provider_refunds: list[ProviderRefundOut]
