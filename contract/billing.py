"""Billing math: pulses are the source of truth; money is integer fen; no floats touch money.

The calibration factor is held as an integer number of *milli-pulses per litre* (450.0 pulses/L is
``450_000``), so every conversion below is exact integer arithmetic.

**The rounding rule** (one rule, applied once, to the session's whole billed pulse count):

* ``volume_ml = floor(pulses * 1000 / pulses_per_litre)``
* ``cost_fen  = floor(pulses * price_fen_per_l / pulses_per_litre)`` -- the exact volume in litres
  times the price, rounded *down* to a whole fen. The customer never pays for a fraction of a fen
  they did not receive; the cost is computed from pulses, not from the rounded millilitres, so
  rounding errors never accumulate.

Both are monotonic in ``pulses``; :func:`max_pulses_for_credit` gives the largest pulse count whose
cost stays within a credit, which is where the valve must close.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_MPPL, MAX_MPPL = 100_000, 20_000_000     # 100 to 20,000 pulses per litre: any real hall-effect meter


@dataclass(frozen=True)
class Calibration:
    """A flow meter's calibration, as integer milli-pulses per litre."""

    milli_pulses_per_litre: int

    def __post_init__(self) -> None:
        if not isinstance(self.milli_pulses_per_litre, int) or self.milli_pulses_per_litre <= 0:
            raise ValueError(f"milli_pulses_per_litre must be a positive int, got {self.milli_pulses_per_litre!r}")

    @classmethod
    def from_pulses_per_litre(cls, pulses_per_litre: float) -> Calibration:
        return cls(round(pulses_per_litre * 1000))

    @property
    def pulses_per_litre(self) -> float:
        return self.milli_pulses_per_litre / 1000

    def volume_ml(self, pulses: int) -> int:
        """Whole millilitres in ``pulses`` (rounded down)."""
        return pulses * 1_000_000 // self.milli_pulses_per_litre

    def volume_ul(self, pulses: int) -> int:
        """Microlitres in ``pulses`` (rounded down), for smooth displays and flow rates."""
        return pulses * 1_000_000_000 // self.milli_pulses_per_litre

    def cost_fen(self, pulses: int, price_fen_per_l: int) -> int:
        """What ``pulses`` of water cost at ``price_fen_per_l`` (rounded down to a whole fen)."""
        return pulses * price_fen_per_l * 1000 // self.milli_pulses_per_litre

    def max_pulses_for_credit(self, credit_fen: int, price_fen_per_l: int) -> int | None:
        """The largest pulse count whose cost is at most ``credit_fen``; ``None`` if water is free.

        cost(P) <= C  <=>  P * price * 1000 < (C + 1) * mppl  <=>  P <= ((C + 1) * mppl - 1) // (price * 1000)
        """
        if price_fen_per_l <= 0:
            return None
        return ((credit_fen + 1) * self.milli_pulses_per_litre - 1) // (price_fen_per_l * 1000)

    def max_pulses_for_volume(self, volume_ml: int) -> int:
        """The largest pulse count whose volume is at most ``volume_ml``."""
        return ((volume_ml + 1) * self.milli_pulses_per_litre - 1) // 1_000_000

    def pulses_for_volume_ml(self, volume_ml: float) -> float:
        """Pulses expected for a volume (for plausibility checks and simulation, not for money)."""
        return volume_ml * self.milli_pulses_per_litre / 1_000_000


# ---------------------------------------------------------------- the fee and points rules, as both sides apply them

def fee_fen(billed_pulses: int, milli_pulses_per_litre: int, price_fen_per_l: int) -> int:
    """The fee rule: floor(pulses x price / pulses-per-litre), in whole fen (see the module docstring)."""
    return Calibration(milli_pulses_per_litre).cost_fen(billed_pulses, price_fen_per_l)


def volume_ml(billed_pulses: int, milli_pulses_per_litre: int) -> int:
    return Calibration(milli_pulses_per_litre).volume_ml(billed_pulses)


POINTS_PER_YUAN = 1


def points_for_fee(fee_fen: int) -> int:
    """Growth points (s6): one per whole yuan of a bill (1.99 yuan earns 1; a free pour none). The cloud
    awards them; the kiosk's receipt shows the same number."""
    return max(0, fee_fen) // 100 * POINTS_PER_YUAN
