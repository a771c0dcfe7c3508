"""Money back to where it came from, and the day's books against the provider's (issue 19), over real HTTP with
the sandbox provider, on SQLite and PostgreSQL: withdrawals split over the top-ups newest first, an operator's
refund of a pour to the original payment, many withdrawals at once never refunding more than the balance, and
reconciliation that finds what is missing, duplicated or of another amount, with an alarm and a CLI."""

import threading
from datetime import datetime

import pytest
from sqlalchemy import select, update

from cloud import __main__ as cli
from cloud import db as t
from cloud.wallet.payments import CHINA, BillRow
from tests.test_wallet import _fund, _session, available, pay, topup
from tests.util import wait_until


def paid_topups(cloud, user, *amounts):
    orders = []
    for a in amounts:
        o = topup(cloud, user, a)
        pay(cloud, o)
        orders.append(o)
    total = sum(amounts)
    assert wait_until(lambda: available(user) == total, timeout_s=10)
    return orders


def test_a_withdrawal_goes_back_to_the_top_ups_newest_first_and_only_once(cloud):
    user = cloud.signup("13600000001")
    first, second = paid_topups(cloud, user, 2000, 1000)
    w = user.call("GET", "/api/v1/me/wallet").json()
    assert w["withdrawable_fen"] == 3000
    r = user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 1500})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["withdrawn_fen"] == 1500 and out["kept_fen"] == 0
    # newest top-up first: 1000 from the second, 500 from the first; the sandbox settles at once
    assert sorted((x["order_id"], x["amount_fen"], x["state"]) for x in out["refunds"]) == sorted([
        (second["order_id"], 1000, "success"), (first["order_id"], 500, "success")])
    assert available(user) == 1500
    sandbox = cloud.app.state.services.wallet.providers["sandbox"]
    assert sum(sandbox.query_refund(x["order_id"], x["refund_id"]).amount_fen for x in out["refunds"]) == 1500
    # the rest: only what is left can go; then nothing
    assert user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 1501}).json()["error"] == "bad_amount"
    rest = user.call("POST", "/api/v1/me/withdrawals", json={})
    assert rest.status_code == 200 and rest.json()["withdrawn_fen"] == 1500
    again = user.call("POST", "/api/v1/me/withdrawals", json={})
    assert again.status_code == 409 and again.json()["error"] == "nothing_to_withdraw"
    w = user.call("GET", "/api/v1/me/wallet").json()
    assert w["available_fen"] == 0 and w["withdrawable_fen"] == 0
    assert [o["refunded_fen"] for o in w["orders"]] == [1000, 2000]
    assert {x["state"] for x in w["refunds"]} == {"success"}
    assert [e["kind"] for e in w["entries"]][:2] == ["withdrawal", "withdrawal"]


def test_a_credit_that_came_from_no_payment_cannot_be_withdrawn(cloud):
    user = cloud.signup("13600000002")
    _fund(cloud, user, 800)          # an operator's credit: no top-up behind it
    r = user.call("POST", "/api/v1/me/withdrawals", json={})
    assert r.status_code == 409 and r.json()["error"] == "not_refundable" and r.json()["message"]
    paid_topups_extra = topup(cloud, user, 1000)
    pay(cloud, paid_topups_extra)
    assert wait_until(lambda: available(user) == 1800)
    out = user.call("POST", "/api/v1/me/withdrawals", json={}).json()
    assert out["withdrawn_fen"] == 1000 and out["kept_fen"] == 800
    assert available(user) == 800


def test_an_operator_refunds_a_bad_pour_to_the_original_payment(cloud):
    from cloud.__main__ import create_operator
    operator = create_operator(cloud.settings.url(), "op-o", "operator")
    device = cloud.provision("RF1")
    user = cloud.signup("13600000003")
    paid_topups(cloud, user, 1000)
    sid = _session(cloud, device, user, pulses=450)           # 1 litre: 2.00
    assert available(user) == 800
    r = cloud.op("POST", f"/api/v1/operator/sessions/{sid}/refund", token=operator,
                 json={"amount_fen": 200, "reason": "水有异味 water tasted wrong", "to": "original"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["to_original_fen"] == 200 and body["to_balance_fen"] == 0
    assert [x["state"] for x in body["provider_refunds"]] == ["success"]
    assert available(user) == 800          # the refund went to the payment, not the balance
    refunds = cloud.op("GET", "/api/v1/operator/refunds").json()["refunds"]
    assert [(x["origin"], x["amount_fen"], x["requested_by"]) for x in refunds] == [("session", 200, "op-o")]
    assert cloud.op("POST", f"/api/v1/operator/sessions/{sid}/refund", token=operator,
                    json={"amount_fen": 1, "reason": "again", "to": "original"}).json()["error"] == "bad_refund"
    assert cloud.op("POST", f"/api/v1/operator/sessions/{sid}/refund", token=operator,
                    json={"amount_fen": 1, "reason": "x", "to": "elsewhere"}).status_code == 422


def test_many_withdrawals_at_once_never_refund_more_than_the_balance(cloud):
    user = cloud.signup("13600000004")
    paid_topups(cloud, user, 1000, 1000, 1000)
    answers = []

    def go():
        answers.append(user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 700}))
    threads = [threading.Thread(target=go) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ok = [a for a in answers if a.status_code == 200]
    assert len(ok) == 4 and all(a.json()["error"] == "bad_amount" for a in answers if a.status_code != 200)
    assert available(user) == 3000 - 4 * 700
    with cloud.app.state.database.read() as conn:
        per_order = conn.execute(select(t.topup_orders.c.amount_fen, t.topup_orders.c.refunded_fen)).all()
        refunded = sum(conn.execute(select(t.provider_refunds.c.amount_fen)).scalars())
    assert refunded == 2800 and all(r <= a for a, r in per_order)


def _day_of(ms: int):
    return datetime.fromtimestamp(ms / 1000, CHINA).date()


def test_reconciliation_matches_then_finds_each_kind_of_difference_and_raises_an_alarm(cloud, capsys):
    user = cloud.signup("13600000005")
    a, b, c = paid_topups(cloud, user, 1000, 2000, 3000)
    user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 500})
    wallet = cloud.app.state.services.wallet
    with cloud.app.state.database.read() as conn:
        paid_ms = conn.execute(select(t.topup_orders.c.paid_ms)).scalars().first()
    day = _day_of(paid_ms)
    r = cloud.op("POST", "/api/v1/operator/reconciliations", json={"provider": "sandbox", "bill_date": str(day)})
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["state"] == "matched" and rep["bill_payments"] == 3 and rep["bill_payments_fen"] == 6000
    assert rep["bill_refunds"] == 1 and rep["bill_refunds_fen"] == 500
    assert cloud.op("GET", f"/api/v1/operator/reconciliations/sandbox/{day}").json()["state"] == "matched"
    assert cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"] == []

    # our books and the bill part: one order we think unpaid, one we credited the bill lacks, one with another
    # amount, and a line the provider printed twice
    sandbox = wallet.providers["sandbox"]
    real_bill = sandbox.bill

    def bill(d):
        rows = [x for x in real_bill(d) if x.order_id != b["order_id"]]
        rows = [BillRow(x.kind, x.order_id, x.provider_txn_id, x.amount_fen + (1 if x.order_id == c["order_id"]
                                                                               and x.kind == "payment" else 0),
                        x.refund_id, x.at_ms) for x in rows]
        return [*rows, rows[0]]
    sandbox.bill = bill
    with cloud.app.state.database.tx() as conn:
        conn.execute(update(t.topup_orders).where(t.topup_orders.c.order_id == a["order_id"]).values(state="closed"))
    rep = cloud.op("POST", "/api/v1/operator/reconciliations",
                   json={"provider": "sandbox", "bill_date": str(day)}).json()
    assert rep["state"] == "mismatch"
    assert [x["order_id"] for x in rep["missing_here"]] == [a["order_id"]]
    assert rep["missing_here"][0]["ours"]["state"] == "closed"
    assert [x["order_id"] for x in rep["missing_there"]] == [b["order_id"]]
    assert [(x["order_id"], x["bill_fen"], x["ours_fen"]) for x in rep["wrong_amount"]] == [
        (c["order_id"], 3001, 3000)]
    assert len(rep["duplicated"]) == 1
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
    assert [(x["source"], x["kind"]) for x in alarms] == [("reconciliation", "mismatch")]
    assert alarms[0]["detail"] | {} == {"provider": "sandbox", "bill_date": str(day), "missing_here": 1,
                                        "missing_there": 1, "duplicated": 1, "wrong_amount": 1}
    # a bill that is not out yet: said so, nothing stored over the last report
    from cloud.wallet.payments import ProviderError

    def not_ready(d):
        raise ProviderError("sandbox", "NO_STATEMENT_EXIST", "the bill is not out yet", retryable=True)
    sandbox.bill = not_ready
    r = cloud.op("POST", "/api/v1/operator/reconciliations", json={"provider": "sandbox", "bill_date": str(day)})
    assert r.status_code == 503 and r.json()["error"] == "bill_not_ready"
    assert cloud.op("GET", f"/api/v1/operator/reconciliations/sandbox/{day}").json()["state"] == "mismatch"
    bad = cloud.op("POST", "/api/v1/operator/reconciliations", json={"provider": "sandbox", "bill_date": "2026-13-01"})
    assert bad.status_code == 422
    assert cloud.op("POST", "/api/v1/operator/reconciliations",
                    json={"provider": "paypal", "bill_date": str(day)}).json()["error"] == "unknown_provider"


@pytest.mark.parametrize("cloud", ["sqlite"], indirect=True)
def test_the_reconcile_command_prints_the_day_and_exits_by_the_result(cloud, capsys, monkeypatch):
    user = cloud.signup("13600000006")
    paid_topups(cloud, user, 1000)
    with cloud.app.state.database.read() as conn:
        day = _day_of(conn.execute(select(t.topup_orders.c.paid_ms)).scalar())
    # the command runs in its own process in real life, with its own sandbox (which knows no orders): so here
    # every one of our payments is missing from its bill, and the command says so and exits 1
    code = cli.main(["reconcile", "--data-dir", str(cloud.settings.data_dir), "--date", str(day)])
    out = capsys.readouterr()
    assert code == 1 and "sandbox" in out.out and "MISMATCH" in out.out and "'missing_there': 1" in out.out
    assert cli.main(["reconcile", "--data-dir", str(cloud.settings.data_dir), "--date", "05/12/2026"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


@pytest.mark.parametrize("cloud", ["sqlite"], indirect=True)
def test_withdrawals_are_at_least_a_yuan_and_five_a_day(cloud):
    user = cloud.signup("13600000007")
    paid_topups(cloud, user, 2000)
    r = user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 1})
    assert r.status_code == 422 and "at least" in r.json()["message"]
    for _ in range(5):
        assert user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 100}).status_code == 200
    r = user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 100})
    assert r.status_code == 429 and r.json()["error"] == "too_many_withdrawals"
    assert available(user) == 1500
