"""Request and response models of the console's sign-in and operator management."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from cloud.schemas import In

Role = Literal["viewer", "operator", "reviewer", "admin"]
Password = Annotated[str, Field(min_length=1, max_length=200)]
Code = Annotated[str, Field(max_length=12)]


class LoginIn(In):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    password: Password
    totp: Code = ""


class OperatorOut(BaseModel):
    operator_id: str
    display_name: str
    role: Role
    created_ms: int
    disabled: bool
    can_sign_in: bool
    totp_enabled: bool
    locked: bool
    has_token: bool
    sessions: int = 0
    last_seen_ms: int | None = None


class MeOut(BaseModel):
    operator: OperatorOut
    csrf_token: str
    session_expires_ms: int
    idle_timeout_ms: int


class PasswordIn(In):
    current: Password
    new: Password


class TotpSetupOut(BaseModel):
    secret: str
    otpauth_uri: str
    qr_svg: str


class TotpSetupIn(In):
    password: Password


class TotpCodeIn(In):
    code: Code


class TotpOffIn(In):
    password: Password
    code: Code


class SignedOutOut(BaseModel):
    ok: bool = True
    sessions_ended: int


class OperatorsOut(BaseModel):
    operators: list[OperatorOut]


class NewOperatorIn(In):
    operator_id: Annotated[str, Field(min_length=2, max_length=64)]
    display_name: Annotated[str, Field(max_length=100)] = ""
    role: Role
    password: Password


class OperatorChangeIn(In):
    """Any of: a new role or name, disabled or enabled, a new password, the second factor reset, unlocked."""

    role: Role | None = None
    display_name: Annotated[str, Field(max_length=100)] | None = None
    disabled: bool | None = None
    password: Password | None = None
    reset_totp: bool = False
    unlock: bool = False
