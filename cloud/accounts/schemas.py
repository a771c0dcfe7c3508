"""Request and response models of the accounts API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from cloud.schemas import In
from cloud.sessions.schemas import BillOut, RunningSessionOut


class MeOut(BaseModel):
    user_id: str
    phone_masked: str = ""
    registered: bool
    identity_state: str = "none"
    points: int
    balance_fen: int
    held_fen: int
    available_fen: int
    arrears_fen: int
    bills: list[BillOut]
    running_session: RunningSessionOut | None = None

PhoneStr = Annotated[str, Field(min_length=1, max_length=24)]


class SmsCodeIn(In):
    phone: PhoneStr


class SmsCodeOut(BaseModel):
    sent: bool
    phone_masked: str
    resend_after_s: int
    expires_in_s: int
    development_sms_sink: bool


class LoginIn(In):
    phone: PhoneStr
    code: Annotated[str, Field(min_length=1, max_length=12)]


class LoginOut(BaseModel):
    token: str
    user_id: str
    new_user: bool
    expires_in_s: int


class ConsentIn(In):
    version: Annotated[str, Field(min_length=1, max_length=16)]
    agree: bool

    @model_validator(mode="after")
    def agreed(self) -> ConsentIn:
        if not self.agree:
            raise ValueError("consent is given only by agreeing (agree: true); to refuse, do not register")
        return self


class PhotoOut(BaseModel):
    photo_id: str
    width_px: int
    height_px: int


class RegisterIn(In):
    legal_name: Annotated[str, Field(min_length=1, max_length=80)]
    doc_type: Literal["resident_id", "passport", "hk_macau_permit", "taiwan_permit"]
    doc_number: Annotated[str, Field(min_length=1, max_length=40)]
    photo_id: Annotated[str, Field(min_length=1, max_length=40)]


class IdentityOut(BaseModel):
    state: str
    consent_given: bool
    consent_version: str
    review_hint: dict[str, str]
    verifier: str
    photo_retention_days: int
    doc_type: str | None = None
    number_masked: str | None = None
    name_masked: str | None = None
    reject_reason: str | None = None
    submitted_ms: int | None = None
    decided_ms: int | None = None


class DeleteAccountIn(In):
    confirm: Literal[True]
    refund_balance: bool = False      # a remaining balance is paid back (never forfeited): say yes to that


class DeleteAccountOut(BaseModel):
    deleted: bool
    refund_id: str | None               # the manual refund for what no top-up could take back, if any
    refund_fen: int                     # the whole balance paid back
    refund_ids: list[str] = []          # refunds through the providers, to the top-ups it came from
    manual_refund_fen: int = 0


class ReviewIn(In):
    approve: bool
    reason: Annotated[str, Field(max_length=200)] = ""


class PendingReviewOut(BaseModel):
    user_id: str
    doc_type: str
    number_masked: str
    name_masked: str
    photo_id: str | None
    submitted_ms: int
    state: str = "pending"
    decided_ms: int | None = None
    reject_reason: str | None = None


class ReviewViewOut(BaseModel):
    """What a reviewer compares with the photo: the name and number in full (each view audit-logged)."""

    user_id: str
    doc_type: str
    state: str
    name: str
    number: str
    name_masked: str
    number_masked: str
    photo_stored: bool
    submitted_ms: int
    decided_ms: int | None
    reject_reason: str | None


class PendingReviewsOut(BaseModel):
    pending: list[PendingReviewOut]


class PaymentMethodOut(BaseModel):
    provider: str                       # wechatpay, alipay, sandbox
    channels: list[str]                 # jsapi, h5, native / wap, precreate / page
    development: bool


class ClientConfigOut(BaseModel):
    development_sms_sink: bool
    sandbox_payments: bool
    payment_methods: list[PaymentMethodOut]
    id_verifier: str
    timezone: str
    operator_name: str
    operator_contact: str
