"""Request and response models of the cloud's HTTP API (the device messages are in the contract package)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract import (
    LIMIT_BOUNDS,
    MachineIdStr,
    MaxCreditFen,
    MaxDurationMs,
    MaxIdleMs,
    MaxVolumeMl,
    MinDispenseMl,
    PricePerLitre,
)


class In(BaseModel):
    """Every request body: unknown fields refused, and no coercion (a price of "100" or true is an error)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Err(BaseModel):
    error: str
    message: str


class OkOut(BaseModel):
    ok: bool = True


class HealthOut(BaseModel):
    status: str
    database: str
    connected_machines: int
    production: bool
    development_providers: list[str]
    version: str = ""                      # the software version (the contract's), and the protocol versions spoken
    protocol_versions: list[int] = []


# ---------------------------------------------------------------- machines

class ProvisionIn(In):
    machine_id: MachineIdStr
    location: Annotated[str, Field(max_length=200)] = ""
    price_fen_per_l: PricePerLitre
    max_volume_ml: MaxVolumeMl = LIMIT_BOUNDS["max_volume_ml"].default
    max_duration_ms: MaxDurationMs = LIMIT_BOUNDS["max_duration_ms"].default
    max_idle_ms: MaxIdleMs = LIMIT_BOUNDS["max_idle_ms"].default
    max_credit_fen: MaxCreditFen = LIMIT_BOUNDS["max_credit_fen"].default
    min_dispense_ml: MinDispenseMl = LIMIT_BOUNDS["min_dispense_ml"].default


class MachineSettingsIn(In):
    """Any of a machine's price and limits; a price change is also sent to the machine."""

    location: Annotated[str, Field(max_length=200)] | None = None
    price_fen_per_l: PricePerLitre | None = None
    max_volume_ml: MaxVolumeMl | None = None
    max_duration_ms: MaxDurationMs | None = None
    max_idle_ms: MaxIdleMs | None = None
    max_credit_fen: MaxCreditFen | None = None
    min_dispense_ml: MinDispenseMl | None = None
    timezone: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    hotline: Annotated[str, Field(max_length=40)] | None = None

    @model_validator(mode="after")
    def at_least_one(self) -> MachineSettingsIn:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one setting to change")
        if self.timezone is not None:
            from zoneinfo import ZoneInfo
            try:
                ZoneInfo(self.timezone)
            except (ValueError, KeyError, OSError) as e:
                raise ValueError(f"unknown time zone {self.timezone!r} (an IANA name such as Asia/Shanghai)") from e
        return self


class ProvisionOut(BaseModel):
    machine_id: str
    enrolment_token: str
    note: str


class EnrollIn(In):
    machine_id: Annotated[str, Field(min_length=1, max_length=64)]
    enrolment_token: Annotated[str, Field(min_length=10, max_length=200)]


class EnrollOut(BaseModel):
    machine_id: str
    secret_hex: str
    note: str


class MachineOut(BaseModel):
    machine_id: str
    location: str
    price_fen_per_l: int
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    max_credit_fen: int
    min_dispense_ml: int
    timezone: str
    hotline: str
    created_ms: int
    last_seen_ms: int | None
    heartbeat: dict[str, Any] | None
    open_session_id: str | None
    enrolled: bool
    online: bool


class CommandOut(BaseModel):
    command_id: str
    machine_id: str
    kind: str
    created_ms: int
    expires_ms: int
    delivered_ms: int | None
    acked_ms: int | None
    ack_ok: bool | None
    ack_reason: str | None


class MachinesOut(BaseModel):
    machines: list[MachineOut]


class ServiceIn(In):
    in_service: bool
    detail: Annotated[str, Field(max_length=500)] = ""


class ClearLockoutIn(In):
    reason: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z_:]+$")]


class CommandQueuedOut(BaseModel):
    machine_id: str
    command: str
    command_id: str


class AlarmOut(BaseModel):
    id: int
    machine_id: str
    event_id: str
    kind: str
    payload: dict[str, Any]
    received_ms: int
    occurred_ms: int


class SilentMachineOut(BaseModel):
    machine_id: str
    last_seen_ms: int | None


class AlarmsOut(BaseModel):
    alarms: list[AlarmOut]
    silent_machines: list[SilentMachineOut]


class RecordOut(BaseModel):
    session_id: str
    machine_id: str
    user_id: str
    started_at: str
    ended_at: str
    started_ms: int
    record: dict[str, Any]


class RecordsOut(BaseModel):
    records: list[RecordOut]


# ---------------------------------------------------------------- phones

class MachineInfoOut(BaseModel):
    machine_id: str
    location: str
    price_fen_per_l: int
    online: bool
    temp_c: float | None
    tds_ppm: int | None
    busy: bool
    state: str


class ScanOut(BaseModel):
    presence_token: str
    machine: MachineInfoOut


class StartIn(In):
    presence_token: Annotated[str, Field(min_length=10, max_length=200)]
    expected_price_fen_per_l: PricePerLitre


class StartOut(BaseModel):
    session_id: str
    state: str
    machine_id: str
    price_fen_per_l: int
    credit_limit_fen: int


class BillOut(BaseModel):
    session_id: str
    machine_id: str
    started_at: str
    ended_at: str
    duration_ms: int
    volume_ml: int
    avg_flow_ml_per_min: int
    amount_fen: int
    price_fen_per_l: int
    water_quality: dict[str, Any]
    points: int
    end_reason: str
    timezone: str = "Asia/Shanghai"
    started_local: str = ""
    ended_local: str = ""
    location: str = ""
    refunded_fen: int = 0


class SessionOut(BaseModel):
    session_id: str
    machine_id: str
    state: str
    price_fen_per_l: int
    credit_limit_fen: int
    progress: dict[str, Any] | None
    void_reason: str | None
    end_reason: str | None
    fee_fen: int | None
    volume_ml: int | None
    charged: bool
    bill: BillOut | None


class RunningSessionOut(BaseModel):
    """The session that holds part of the balance now: the phone shows it on every page."""
    session_id: str
    machine_id: str
    location: str
    state: str
    credit_limit_fen: int


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


# ---------------------------------------------------------------- accounts (issue 6)

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
    refund_id: str | None
    refund_fen: int


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


class PendingReviewsOut(BaseModel):
    pending: list[PendingReviewOut]


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


class BillsOut(BaseModel):
    bills: list[BillOut]


class PointsEntryOut(BaseModel):
    delta: int
    kind: str
    ref: str | None
    note: str
    created_ms: int


class PointsOut(BaseModel):
    points: int
    rule: str
    history: list[PointsEntryOut]


class GiftOut(BaseModel):
    gift_id: str
    name_zh: str
    name_en: str
    points_cost: int
    stock: int
    active: bool


class GiftsOut(BaseModel):
    gifts: list[GiftOut]


class GiftIn(In):
    name_zh: Annotated[str, Field(min_length=1, max_length=100)]
    name_en: Annotated[str, Field(min_length=1, max_length=100)]
    points_cost: Annotated[int, Field(ge=1, le=1_000_000)]
    stock: Annotated[int, Field(ge=0, le=1_000_000)]


class GiftChangeIn(In):
    name_zh: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    name_en: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    points_cost: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    stock: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    active: bool | None = None

    @model_validator(mode="after")
    def at_least_one(self) -> GiftChangeIn:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one field to change")
        return self


class RedeemIn(In):
    request_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class RedemptionOut(BaseModel):
    redemption_id: str
    gift_id: str
    points: int
    pickup_code: str
    created_ms: int
    name_zh: str
    name_en: str
    repeated: bool


class RedemptionsOut(BaseModel):
    redemptions: list[RedemptionOut]


class ClientConfigOut(BaseModel):
    development_sms_sink: bool
    sandbox_payments: bool
    id_verifier: str
    timezone: str
    operator_name: str
    operator_contact: str


class DevSmsOut(BaseModel):
    note: str
    messages: list[dict[str, Any]]


class DevUserIn(In):
    phone: Annotated[str, Field(pattern=r"^1[3-9][0-9]{9}$")]
    balance_fen: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    registered: bool = True


class DevUserOut(BaseModel):
    user_id: str
    token: str
