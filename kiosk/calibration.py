"""The calibration wizard's arithmetic (pure): pours into a measuring jug, each with the pulses the meter
counted and the millilitres the technician read, give a pulses-per-litre factor. Works in millilitres and
integer milli-pulses per litre, like :mod:`contract.billing`."""

from __future__ import annotations

from dataclasses import dataclass

from contract.billing import MAX_MPPL, MIN_MPPL

MIN_POURS = 3
MAX_SPREAD_PERMILLE = 50            # pours that disagree by more than 5 % are not averaged: pour again
MIN_POUR_ML = 100


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True)
class Pour:
    pulses: int
    measured_ml: int

    @property
    def milli_pulses_per_litre(self) -> int:
        return self.pulses * 1_000_000 // self.measured_ml


@dataclass(frozen=True)
class Result:
    milli_pulses_per_litre: int        # the new factor: all pulses over all millilitres
    spread_permille: int               # (largest - smallest single-pour factor) / new factor
    old_milli_pulses_per_litre: int
    change_permille: int               # how far the new factor is from the old one (signed)


def check_pour(pulses: int, measured_ml: int) -> Pour:
    if measured_ml < MIN_POUR_ML:
        raise CalibrationError(f"pour at least {MIN_POUR_ML} ml for a useful reading")
    if pulses <= 0:
        raise CalibrationError("the meter counted no pulses: is water flowing through it?")
    pour = Pour(pulses, measured_ml)
    if not MIN_MPPL <= pour.milli_pulses_per_litre <= MAX_MPPL:
        raise CalibrationError(f"{pulses} pulses for {measured_ml} ml is not a plausible meter: check the reading")
    return pour


def compute(pours: list[Pour], old_milli_pulses_per_litre: int) -> Result:
    if len(pours) < MIN_POURS:
        raise CalibrationError(f"pour at least {MIN_POURS} times (have {len(pours)})")
    factor = sum(p.pulses for p in pours) * 1_000_000 // sum(p.measured_ml for p in pours)
    singles = [p.milli_pulses_per_litre for p in pours]
    spread = (max(singles) - min(singles)) * 1000 // factor
    change = (factor - old_milli_pulses_per_litre) * 1000 // old_milli_pulses_per_litre
    return Result(factor, spread, old_milli_pulses_per_litre, change)


def acceptable(result: Result) -> str | None:
    """Why the result should not be accepted, or None."""
    if result.spread_permille > MAX_SPREAD_PERMILLE:
        return (f"the pours disagree by {result.spread_permille / 10:.1f} % (more than "
                f"{MAX_SPREAD_PERMILLE / 10:.0f} %): pour again, reading the jug at eye level")
    if not MIN_MPPL <= result.milli_pulses_per_litre <= MAX_MPPL:
        return "the factor is outside any real meter's range"
    return None
