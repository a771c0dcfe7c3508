"""A machine's price and session limits: their bounds and defaults, declared once.

The cloud stores them per machine (provisioning, an operator's change), sends them in every grant, and the
dispenser clamps every grant to its own configured limits; all three validate with the types below, so a value
one side accepts the other never refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Bound:
    """An integer setting's allowed range and its default."""

    min: int
    max: int
    default: int
    doc: str

    def field(self, **kw) -> Field:
        return Field(ge=self.min, le=self.max, **kw)


PRICE = Bound(0, 100_000, 200, "Price of a litre of water, in fen (1/100 yuan).")
LIMIT_BOUNDS: dict[str, Bound] = {
    "max_volume_ml": Bound(50, 50_000, 5_000, "Most water one session may pour."),
    "max_duration_ms": Bound(1_000, 600_000, 300_000, "Longest time the valve may stay open in one session."),
    "max_idle_ms": Bound(500, 120_000, 15_000, "Close the valve after this long with no flow (no-pulse timeout)."),
    "max_credit_fen": Bound(1, 1_000_000, 10_000, "Most money one session may spend."),
    "min_dispense_ml": Bound(0, 500, 10, "Sessions that pour less are not charged (drips, a change of mind)."),
}
MIN_DISPENSE_ML_MAX = LIMIT_BOUNDS["min_dispense_ml"].max

PricePerLitre = Annotated[int, PRICE.field()]
MaxVolumeMl = Annotated[int, LIMIT_BOUNDS["max_volume_ml"].field()]
MaxDurationMs = Annotated[int, LIMIT_BOUNDS["max_duration_ms"].field()]
MaxIdleMs = Annotated[int, LIMIT_BOUNDS["max_idle_ms"].field()]
MaxCreditFen = Annotated[int, LIMIT_BOUNDS["max_credit_fen"].field()]
MinDispenseMl = Annotated[int, LIMIT_BOUNDS["min_dispense_ml"].field()]


class Limits(BaseModel):
    """A machine's session limits, every one with its bound and default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_volume_ml: MaxVolumeMl = LIMIT_BOUNDS["max_volume_ml"].default
    max_duration_ms: MaxDurationMs = LIMIT_BOUNDS["max_duration_ms"].default
    max_idle_ms: MaxIdleMs = LIMIT_BOUNDS["max_idle_ms"].default
    max_credit_fen: MaxCreditFen = LIMIT_BOUNDS["max_credit_fen"].default
    min_dispense_ml: MinDispenseMl = LIMIT_BOUNDS["min_dispense_ml"].default


__all__ = [
    "LIMIT_BOUNDS",
    "MIN_DISPENSE_ML_MAX",
    "PRICE",
    "Bound",
    "Limits",
    "MaxCreditFen",
    "MaxDurationMs",
    "MaxIdleMs",
    "MaxVolumeMl",
    "MinDispenseMl",
    "PricePerLitre",
]
