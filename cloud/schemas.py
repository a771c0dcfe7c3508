"""What every feature's request and response models share (each feature's own are in its ``schemas.py``; the
device messages are in the contract package)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class In(BaseModel):
    """Every request body: unknown fields refused, and no coercion (a price of "100" or true is an error)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OkOut(BaseModel):
    ok: bool = True


class HealthOut(BaseModel):
    status: str
    database: str
    instance: str = ""                     # this instance's name (TAPSHARE_INSTANCE_ID)
    listening: bool = True                 # PostgreSQL: its LISTEN connection is up (commands from other instances)
    connected_machines: int                # long-polls held by this instance
    production: bool
    development_providers: list[str]
    version: str = ""                      # the software version (the contract's), and the protocol versions spoken
    protocol_versions: list[int] = []
