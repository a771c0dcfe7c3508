from hypothesis import given
from hypothesis import strategies as st

from contract.billing import Calibration

mppl = st.integers(min_value=1_000, max_value=10_000_000)       # 1 to 10,000 pulses per litre
pulses = st.integers(min_value=0, max_value=10_000_000)
price = st.integers(min_value=1, max_value=100_000)
credit = st.integers(min_value=0, max_value=1_000_000)


def test_known_values():
    cal = Calibration.from_pulses_per_litre(450.0)
    assert cal.volume_ml(450) == 1000
    assert cal.cost_fen(450, 200) == 200          # a litre at 2 yuan
    assert cal.cost_fen(449, 200) == 199          # 0.99778 l -> 199.56 fen, rounded down
    assert cal.volume_ml(1) == 2                  # 2.22 ml
    assert cal.cost_fen(1, 200) == 0              # 0.44 fen rounds down to nothing
    assert cal.max_pulses_for_credit(200, 200) == 452   # 452 pulses: 200.9 fen, billed 200
    assert cal.cost_fen(453, 200) == 201
    assert cal.max_pulses_for_credit(100, 0) is None   # free water has no credit limit


@given(mppl, pulses, pulses, price)
def test_volume_and_cost_are_monotonic(m, a, b, p):
    cal = Calibration(m)
    lo, hi = sorted((a, b))
    assert cal.volume_ml(lo) <= cal.volume_ml(hi)
    assert cal.cost_fen(lo, p) <= cal.cost_fen(hi, p)


@given(mppl, pulses, price)
def test_cost_is_the_exact_volume_times_price_rounded_down(m, n, p):
    cal = Calibration(m)
    exact_fen_times_mppl = n * p * 1000
    assert cal.cost_fen(n, p) * m <= exact_fen_times_mppl < (cal.cost_fen(n, p) + 1) * m


@given(mppl, credit, price)
def test_credit_limit_is_the_last_affordable_pulse(m, c, p):
    cal = Calibration(m)
    limit = cal.max_pulses_for_credit(c, p)
    assert limit is not None and limit >= 0
    assert cal.cost_fen(limit, p) <= c                 # never bill beyond credit
    assert cal.cost_fen(limit + 1, p) > c              # and the next pulse would


@given(mppl, st.integers(min_value=0, max_value=100_000))
def test_volume_limit_is_the_last_pulse_within_volume(m, ml):
    cal = Calibration(m)
    limit = cal.max_pulses_for_volume(ml)
    assert cal.volume_ml(limit) <= ml
    assert cal.volume_ml(limit + 1) > ml


@given(mppl, pulses, pulses, price)
def test_billing_in_pieces_never_beats_billing_once(m, a, b, p):
    cal = Calibration(m)
    # rounding once over the whole session is never less than the sum of rounded pieces
    assert cal.cost_fen(a + b, p) >= cal.cost_fen(a, p) + cal.cost_fen(b, p)
