"""The fault suite, bounded (bench/bench_faults.py runs the same faults longer and prints the report):
a network cut mid-session, answers lost after commit, replayed report/scan/start command, forged keys,
the temperature sensor unplugged mid-session, the cloud restarted mid-report, a stuck valve and a leak.
Nothing may be lost or billed twice, and every fault must be seen."""

import pytest

from bench.bench_faults import run


@pytest.mark.slow
def test_every_fault_is_survived_and_seen():
    rows = {r["fault"].split(" (")[0]: r for r in run(outage_s=3.0)}
    assert len(rows) == 8
    assert all(r["lost"] == 0 and r["twice"] == 0 for r in rows.values()), rows
    assert "401 bad_signature; 401 bad_signature" in rows["forged signature; another machine's key"]["happened"]
    assert "409 scan_again" in rows["replayed report, QR scan and start command"]["happened"]
    assert "noticed: True" in rows["temperature sensor unplugged mid-session"]["happened"]
    assert rows["cloud restarted mid-report"]["happened"].endswith("True")
    for fault in ("stuck valve", "leak during idle"):
        row = next(r for k, r in rows.items() if k.startswith(fault))
        assert row["screen"] == "out_of_service" and "alarm received: True" in row["cloud"], row
