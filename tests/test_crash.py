"""SIGKILL a running dispenser at 200 random points; boot recovery must lose nothing and bill nothing twice."""

import pytest

from tests.crashkit import run_many


@pytest.mark.slow
def test_200_kills_lose_nothing(tmp_path):
    results = run_many(tmp_path, rounds=200, workers=2)
    problems = [p for r in results for p in r.problems]
    assert problems == []
    assert len(results) == 200
    mid = sum(r.killed_mid_session for r in results)
    ended = sum(len(r.ended) for r in results)
    recovered = sum(len(r.recovered) for r in results)
    # the kills must really land inside sessions, and sessions must really complete between kills
    print(f"killed mid-session {mid}, recovered {recovered}, completed between kills {ended}")
    assert mid >= 80 and recovered >= 80 and ended >= 25, (mid, recovered, ended)
