"""Request and response models of the devices API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from cloud.schemas import In


class EnrollIn(In):
    machine_id: Annotated[str, Field(min_length=1, max_length=64)]
    enrolment_token: Annotated[str, Field(min_length=10, max_length=200)]


class EnrollOut(BaseModel):
    machine_id: str
    secret_hex: str
    note: str
