"""Accounts over real HTTP (issue 6): SMS login, consent, real-name registration, ID photos, review,
retention, deletion, production-mode refusals. The `cloud` fixture runs on SQLite and PostgreSQL."""

import logging
import os
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from cloud import db as t
from cloud.accounts.service import CODE_MAX_ATTEMPTS, CODE_TTL_MS, CONSENT_VERSION, DAY_MS, TOKEN_TTL_MS
from cloud.app import ProductionRefused, create_app
from tests.cloudkit import CloudServer, UserClient, id_photo, resident_id
from tests.util import wait_until


def post(cloud, path, **kw):
    """As the phone's browser does (it keeps the development SMS inbox's cookie)."""
    http = getattr(cloud, "http", None) or requests
    return http.post(cloud.url + path, timeout=10, **kw)


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def timed(tmp_path):
    """A cloud on SQLite whose clock the test moves."""
    clock = Clock()
    with CloudServer(tmp_path / "cloud", clock_ms=clock) as server:
        server.clock = clock
        yield server


# ---------------------------------------------------------------- SMS login

def test_login_with_an_sms_code_creates_the_account_once(cloud):
    r = post(cloud, "/api/v1/auth/sms-code", json={"phone": "+86 139-0000-1111"})
    assert r.status_code == 200 and r.json()["phone_masked"] == "139****1111"
    assert r.json()["development_sms_sink"] is True
    code = cloud.sms_code("13900001111")
    first = post(cloud, "/api/v1/auth/login", json={"phone": "13900001111", "code": code})
    assert first.status_code == 200 and first.json()["new_user"] is True
    used = post(cloud, "/api/v1/auth/login", json={"phone": "13900001111", "code": code})
    assert used.status_code == 401 and used.json()["error"] == "no_code"
    me = UserClient(cloud.url, first.json()["token"], first.json()["user_id"]).me()
    assert me["registered"] is False and me["phone_masked"] == "139****1111" and me["identity_state"] == "none"


def test_wrong_codes_are_counted_and_then_the_code_is_burned(cloud):
    post(cloud, "/api/v1/auth/sms-code", json={"phone": "13900002222"})
    code = cloud.sms_code("13900002222")
    wrong = "000000" if code != "000000" else "111111"
    for left in range(CODE_MAX_ATTEMPTS - 1, -1, -1):
        r = post(cloud, "/api/v1/auth/login", json={"phone": "13900002222", "code": wrong})
        assert r.status_code == 401 and r.json()["error"] == "wrong_code" and r.json()["attempts_left"] == left
    r = post(cloud, "/api/v1/auth/login", json={"phone": "13900002222", "code": code})
    assert r.status_code == 401 and r.json()["error"] == "too_many_attempts"


def test_code_requests_are_rate_limited(timed):
    assert post(timed, "/api/v1/auth/sms-code", json={"phone": "13900003333"}).ok
    soon = post(timed, "/api/v1/auth/sms-code", json={"phone": "13900003333"})
    assert soon.status_code == 429 and soon.json()["error"] == "sms_too_soon" and soon.json()["retry_after_s"] == 60
    for _ in range(4):
        timed.clock.now += 61_000
        assert post(timed, "/api/v1/auth/sms-code", json={"phone": "13900003333"}).ok
    timed.clock.now += 61_000
    hourly = post(timed, "/api/v1/auth/sms-code", json={"phone": "13900003333"})
    assert hourly.status_code == 429 and hourly.json()["error"] == "sms_limit_phone"
    # one network asking for many numbers
    for n in range(25):
        assert post(timed, "/api/v1/auth/sms-code", json={"phone": f"1370000{n:04d}"}).ok
    ip = post(timed, "/api/v1/auth/sms-code", json={"phone": "13699999999"})
    assert ip.status_code == 429 and ip.json()["error"] == "sms_limit_ip"


def test_codes_and_logins_expire(timed):
    post(timed, "/api/v1/auth/sms-code", json={"phone": "13900004444"})
    code = timed.sms_code("13900004444")
    timed.clock.now += CODE_TTL_MS + 1
    r = post(timed, "/api/v1/auth/login", json={"phone": "13900004444", "code": code})
    assert r.status_code == 401 and r.json()["error"] == "code_expired"
    timed.clock.now += 61_000
    user = timed.login("13900004444")
    assert user.call("GET", "/api/v1/me").ok
    timed.clock.now += TOKEN_TTL_MS + 1
    assert user.call("GET", "/api/v1/me").status_code == 401


@pytest.mark.parametrize("body", [{"phone": "12345"}, {"phone": "23800001111"}, {"phone": ""}, {},
                                  {"phone": "13800001111", "extra": 1}, {"phone": "1" * 30}])
def test_bad_phone_numbers_get_a_clear_error(cloud, body):
    r = post(cloud, "/api/v1/auth/sms-code", json=body)
    assert r.status_code == 422 and r.json()["error"] in ("bad_phone", "invalid_request") and r.json()["message"]


def test_logout_revokes_the_token(cloud):
    user = cloud.login("13900005555")
    assert user.call("POST", "/api/v1/auth/logout").ok
    assert user.call("GET", "/api/v1/me").status_code == 401


# ---------------------------------------------------------------- consent and registration (s4)

def test_no_id_data_is_taken_before_separate_consent(cloud):
    user = cloud.login("13900006666")
    r = user.call("PUT", "/api/v1/me/id-photo", data=id_photo(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 403 and r.json()["error"] == "consent_required"
    r = user.call("POST", "/api/v1/me/registration", json={"legal_name": "张三", "doc_type": "resident_id",
                                                            "doc_number": resident_id(), "photo_id": "p-x"})
    assert r.status_code == 403 and r.json()["error"] == "consent_required"
    assert user.call("POST", "/api/v1/me/consent", json={"version": "1999-01", "agree": True}).status_code == 409
    assert user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": False}).status_code == 422
    ok = user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True})
    assert ok.status_code == 200 and ok.json()["consent_given"] is True


def test_registration_with_a_resident_id_and_photo(cloud, caplog):
    caplog.set_level(logging.INFO, logger="tapshare")
    number = resident_id(7)
    user = cloud.signup("13900007777", id_number=number, name="李小龙")
    idv = user.call("GET", "/api/v1/me/identity").json()
    assert idv["state"] == "verified" and idv["verifier"] == "dev_auto"
    assert idv["number_masked"] == number[:2] + "*" * 14 + number[-2:] and idv["name_masked"] == "李**"
    assert user.me()["registered"] is True
    # the number is never in a response or a log line, nor in the database in clear
    for path in ("/api/v1/me", "/api/v1/me/identity"):
        assert number not in user.call("GET", path).text
    assert number not in caplog.text and "李小龙" not in caplog.text
    with cloud.app.state.database.read() as conn:
        row = conn.execute(select(t.identities)).mappings().one()
    assert number not in str(dict(row)) and "李小龙" not in str(dict(row))
    # the photo is encrypted, outside anything served
    [photo] = list(Path(cloud.settings.data_dir, "private", "id-photos").iterdir())
    assert photo.stat().st_mode & 0o077 == 0
    data = photo.read_bytes()
    assert b"\xff\xd8\xff" not in data and b"SecretCam" not in data
    assert requests.get(cloud.url + f"/static/../private/id-photos/{photo.name}", timeout=5).status_code == 404


@pytest.mark.parametrize(("doc_number", "error"), [("11010519491231002", "bad_id_number"),
                                                   ("110105194912310021", "bad_id_number"),
                                                   ("11010519491331002X", "bad_id_number")])
def test_invalid_id_numbers_are_refused(cloud, doc_number, error):
    user = cloud.login("13900008888")
    user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True})
    photo = user.call("PUT", "/api/v1/me/id-photo", data=id_photo(), headers={"Content-Type": "image/jpeg"}).json()
    r = user.call("POST", "/api/v1/me/registration", json={"legal_name": "王五", "doc_type": "resident_id",
                                                            "doc_number": doc_number, "photo_id": photo["photo_id"]})
    assert r.status_code == 422 and r.json()["error"] == error and doc_number not in r.text
    assert user.me()["registered"] is False


def test_bad_uploads(cloud):
    user = cloud.login("13900009999")
    user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True})

    def put(data, ctype="image/jpeg"):
        return user.call("PUT", "/api/v1/me/id-photo", data=data, headers={"Content-Type": ctype})

    assert put(b"%PDF-1.4 not an image", "application/pdf").status_code == 415
    r = put(b"<html>hello</html>")
    assert r.status_code == 422 and r.json()["error"] == "not_an_image"
    r = put(id_photo(100, 80))
    assert r.status_code == 422 and r.json()["error"] == "photo_too_small"
    r = put(b"\xff\xd8\xff" + os.urandom(6 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = put(b"\xff\xd8\xff" + os.urandom(5 * 1024 * 1024 + 10))
    assert r.status_code == 413 and r.json()["error"] in ("photo_too_large", "body_too_large")
    assert put(id_photo(fmt="PNG"), "image/png").status_code == 200


def test_one_document_one_account(cloud):
    number = resident_id(11)
    cloud.signup("13900010001", id_number=number)
    other = cloud.login("13900010002")
    other.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True})
    photo = other.call("PUT", "/api/v1/me/id-photo", data=id_photo(), headers={"Content-Type": "image/jpeg"}).json()
    r = other.call("POST", "/api/v1/me/registration", json={"legal_name": "张三", "doc_type": "resident_id",
                                                             "doc_number": number, "photo_id": photo["photo_id"]})
    assert r.status_code == 409 and r.json()["error"] == "document_in_use"
    r = other.call("POST", "/api/v1/me/registration", json={"legal_name": "张三", "doc_type": "resident_id",
                                                             "doc_number": resident_id(12), "photo_id": "p-someone"})
    assert r.status_code == 422 and r.json()["error"] == "bad_photo"


def test_other_documents_go_to_manual_review_and_photo_views_are_audited(cloud):
    from cloud.__main__ import create_operator
    reviewer = create_operator(cloud.settings.url(), "rev1", "reviewer")
    operator = create_operator(cloud.settings.url(), "op1", "operator")
    user = cloud.login("13900011111")
    user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True})
    photo = user.call("PUT", "/api/v1/me/id-photo", data=id_photo(), headers={"Content-Type": "image/jpeg"}).json()
    r = user.call("POST", "/api/v1/me/registration", json={"legal_name": "John Smith", "doc_type": "passport",
                                                            "doc_number": "E12345678", "photo_id": photo["photo_id"]})
    assert r.status_code == 200 and r.json()["state"] == "pending" and "E12345678" not in r.text
    assert r.json()["review_hint"]["en"]
    assert user.me()["registered"] is False
    # only the reviewer role sees the photo
    assert cloud.op("GET", f"/api/v1/operator/identities/{user.user_id}/photo", token=operator).status_code == 403
    [pending] = cloud.op("GET", "/api/v1/operator/identities", token=reviewer).json()["pending"]
    assert pending["user_id"] == user.user_id and pending["number_masked"] == "E1*****78"
    img = cloud.op("GET", f"/api/v1/operator/identities/{user.user_id}/photo", token=reviewer)
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content[:3] == b"\xff\xd8\xff"
    assert b"SecretCam" not in img.content
    with cloud.app.state.database.read() as conn:
        views = conn.execute(select(t.audit_log).where(t.audit_log.c.action == "view_id_photo")).mappings().all()
    assert [(v["operator_id"], v["target"]) for v in views] == [("rev1", user.user_id)]
    bad = cloud.op("POST", f"/api/v1/operator/identities/{user.user_id}/review", token=reviewer,
                   json={"approve": False})
    assert bad.status_code == 422 and bad.json()["error"] == "reason_required"
    ok = cloud.op("POST", f"/api/v1/operator/identities/{user.user_id}/review", token=reviewer,
                  json={"approve": True})
    assert ok.status_code == 200 and ok.json()["state"] == "verified"
    assert user.me()["registered"] is True
    again = cloud.op("POST", f"/api/v1/operator/identities/{user.user_id}/review", token=reviewer,
                     json={"approve": True})
    assert again.status_code == 409


def test_photos_are_deleted_after_the_retention_period(timed):
    user = timed.signup("13900012222")
    files = list(Path(timed.settings.data_dir, "private", "id-photos").iterdir())
    assert len(files) == 1
    accounts = timed.app.state.services.accounts
    assert accounts.purge_photos(timed.clock.now + 29 * DAY_MS) == 0
    assert accounts.purge_photos(timed.clock.now + 31 * DAY_MS) == 1
    assert not files[0].exists()
    from cloud.__main__ import create_operator
    reviewer = create_operator(timed.settings.url(), "rev", "reviewer")
    r = timed.op("GET", f"/api/v1/operator/identities/{user.user_id}/photo", token=reviewer)
    assert r.status_code == 404 and r.json()["error"] == "no_photo"
    assert user.call("GET", "/api/v1/me/identity").json()["state"] == "verified"      # the verification stays


def test_unused_photos_are_deleted_after_a_day(timed):
    user = timed.login("13900012223")
    user.call("POST", "/api/v1/me/consent", json={"version": CONSENT_VERSION, "agree": True})
    assert user.call("PUT", "/api/v1/me/id-photo", data=id_photo(), headers={"Content-Type": "image/jpeg"}).ok
    assert timed.app.state.services.accounts.purge_photos(timed.clock.now + DAY_MS + 1) == 1


def test_deleting_an_account_erases_the_person_and_pays_the_balance_back(cloud):
    from tests.test_wallet import pay, topup
    number = resident_id(21)
    user = cloud.signup("13900013333", id_number=number)
    first, second = topup(cloud, user, 2000), topup(cloud, user, 1000)
    pay(cloud, first)
    pay(cloud, second)
    assert wait_until(lambda: user.me()["available_fen"] == 3000)
    with cloud.app.state.database.tx() as conn:          # an operator's goodwill credit, from no payment
        from cloud.wallet.balance import add_entry
        add_entry(conn, user.user_id, "adjustment", 150, int(time.time() * 1000), note="goodwill")
    r = user.call("DELETE", "/api/v1/me", json={"confirm": True})
    assert r.status_code == 409 and r.json()["error"] == "balance_remaining" and r.json()["balance_fen"] == 3150
    assert user.call("DELETE", "/api/v1/me", json={"confirm": True, "forfeit_balance": True}).status_code == 422
    r = user.call("DELETE", "/api/v1/me", json={"confirm": True, "refund_balance": True})
    assert r.status_code == 200 and r.json()["refund_fen"] == 3150, r.text
    assert r.json()["manual_refund_fen"] == 150 and len(r.json()["refund_ids"]) == 2
    refund_id = r.json()["refund_id"]
    assert user.call("GET", "/api/v1/me").status_code == 401
    assert list(Path(cloud.settings.data_dir, "private", "id-photos").iterdir()) == []
    with cloud.app.state.database.read() as conn:
        u = conn.execute(select(t.users).where(t.users.c.user_id == user.user_id)).mappings().one()
        kinds = [e.kind for e in conn.execute(select(t.balance_entries).where(
            t.balance_entries.c.user_id == user.user_id)).all()]
        assert conn.execute(select(t.identities)).first() is None
    assert "13900013333" not in str(dict(u)) and u["deleted_ms"] and kinds == ["topup", "topup", "adjustment", "payout"]
    # the top-ups went back through the provider, newest first, each to its final state
    refunds = cloud.op("GET", "/api/v1/operator/refunds").json()["refunds"]
    assert sorted((x["order_id"], x["amount_fen"], x["state"], x["origin"]) for x in refunds) == sorted([
        (second["order_id"], 1000, "success", "deletion"), (first["order_id"], 2000, "success", "deletion")])
    sandbox = cloud.app.state.services.wallet.providers["sandbox"]
    assert sorted(sandbox.query_refund(x["order_id"], x["refund_id"]).amount_fen for x in refunds) == [1000, 2000]
    # what came from no payment is the operator's to pay by transfer, once
    owed = cloud.op("GET", "/api/v1/operator/balance-refunds").json()["refunds"]
    assert [x["refund_id"] for x in owed] == [refund_id]
    assert [(o["order_id"], o["amount_fen"]) for o in owed[0]["orders"]] == [(None, 150)]
    paid = cloud.op("POST", f"/api/v1/operator/balance-refunds/{refund_id}/paid", json={"reference": "WX-R-1"})
    assert paid.status_code == 200 and paid.json()["state"] == "paid"
    again = cloud.op("POST", f"/api/v1/operator/balance-refunds/{refund_id}/paid", json={"reference": "WX-R-2"})
    assert again.status_code == 409 and again.json()["error"] == "already_paid"
    assert cloud.op("GET", "/api/v1/operator/balance-refunds").json()["refunds"] == []
    # the number and the document can start again
    again = cloud.signup("13900013333", id_number=number)
    assert again.user_id != user.user_id and again.me()["registered"]


def test_deleting_waits_for_a_top_up_being_paid(cloud):
    """Money on its way would arrive at a deleted account and never be paid back: deletion waits for it."""
    from tests.test_wallet import topup
    user = cloud.signup("13900015555")
    topup(cloud, user, 1000)
    r = user.call("DELETE", "/api/v1/me", json={"confirm": True, "refund_balance": True})
    assert r.status_code == 409 and r.json()["error"] == "topup_pending"
    assert user.me()["registered"]


def test_deleting_is_refused_in_arrears(cloud):
    user = cloud.signup("13900014444")
    with cloud.app.state.database.tx() as conn:
        from cloud.wallet.balance import add_entry
        add_entry(conn, user.user_id, "charge", -30, int(time.time() * 1000), note="test")
    r = user.call("DELETE", "/api/v1/me", json={"confirm": True, "refund_balance": True})
    assert r.status_code == 402 and r.json()["error"] == "arrears"
    assert user.call("DELETE", "/api/v1/me", json={}).status_code == 422


# ---------------------------------------------------------------- production mode

class RealishSms:
    name, is_development = "gateway", False

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []          # (phone, code)

    def send_code(self, phone, code, ttl_min):
        from cloud.accounts.providers import SmsReceipt
        self.sent.append((phone, code))
        return SmsReceipt(self.name, f"req-{len(self.sent)}")


def test_production_refuses_development_providers_and_plain_http(tmp_path, monkeypatch):
    from cloud.accounts.providers import ManualReview
    from cloud.app import CloudSettings
    monkeypatch.setenv("TAPSHARE_CLOUD_KEY", "11" * 32)
    with pytest.raises(ProductionRefused, match="SMS provider is the development dev_sink"):
        create_app(CloudSettings(data_dir=tmp_path / "a", production=True, public_url="https://water.example"))
    with pytest.raises(ProductionRefused, match="https://"):
        create_app(CloudSettings(data_dir=tmp_path / "b", production=True, public_url="http://water.example",
                                 sms_provider=RealishSms(), verifier=ManualReview(),
                                 payment_provider=_RealishPay(), **OPERATOR))
    with pytest.raises(ProductionRefused, match="TAPSHARE_OPERATOR_NAME"):   # PIPL: who handles the data, and how
        create_app(CloudSettings(data_dir=tmp_path / "b2", production=True, public_url="https://water.example",
                                 sms_provider=RealishSms(), verifier=ManualReview(),
                                 payment_provider=_RealishPay()))
    with CloudServer(tmp_path / "c", production=True, public_url="https://water.example", sms_provider=RealishSms(),
                     verifier=ManualReview(), payment_provider=_RealishPay(), **OPERATOR) as server:
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        for method, path in (("POST", "/api/v1/auth/sms-code"), ("GET", "/m/X1"), ("GET", "/api/v1/dev/sms")):
            r = requests.request(method, server.url + path, json={"phone": "13800001111"}, timeout=5)
            assert r.status_code == 403 and r.json()["error"] == "https_required"
        # behind the TLS-terminating proxy (trusted on loopback) the same request works
        r = requests.post(server.url + "/api/v1/auth/sms-code", json={"phone": "13800001111"}, timeout=5,
                          headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200 and r.json()["development_sms_sink"] is False
        assert server.settings.sms_provider.sent[0][0] == "13800001111"


class _RealishPay:
    name, is_development = "acquirer", False


OPERATOR = {"operator_name": "杭州清泉水务有限公司", "operator_contact": "400-820-8820"}


def test_dev_sms_inbox_is_not_there_without_the_sink(tmp_path):
    from cloud.accounts.providers import ManualReview
    with CloudServer(tmp_path / "c", sms_provider=RealishSms(), verifier=ManualReview()) as server:
        r = requests.get(server.url + "/api/v1/dev/sms", params={"phone": "13800001111"}, timeout=5)
        assert r.status_code == 403 and r.json()["error"] == "not_development"
        cfg = requests.get(server.url + "/api/v1/client-config", timeout=5).json()
        assert cfg["development_sms_sink"] is False and cfg["id_verifier"] == "manual"
