"""Login codes through Tencent Cloud SMS: our TC3-HMAC-SHA256 signer against Tencent's published example, and a real
cloud sending codes through the adapter to a stand-in of Tencent's SMS API over HTTP (tests/standins/tencent_sms.py),
which checks every signature and body as Tencent does. A person logs in with the code the stand-in received; the
provider's request id is stored; each refusal becomes the right answer for the person, a stored send error and an
operator alarm (none for a number the provider calls wrong); our rate limits stay in front of the provider; a slow or
absent provider costs the person no more than the timeout."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
import requests
from sqlalchemy import select

from cloud import db as t
from cloud.accounts.providers import DevSmsSink, SmsFailed
from cloud.accounts.sms_tencent import TencentSms, TencentSmsConfig, tc3_sign
from cloud.errors import ProviderConfigError
from tests.cloudkit import CloudServer
from tests.conftest import PG_URL, _fresh_postgres_database
from tests.standins.tencent_sms import SDK_APP_ID, SECRET_ID, SECRET_KEY, SIGN_NAME, TEMPLATE_ID, TencentSmsStandIn

PHONE = "13800001111"
E164 = "+8613800001111"
FAST = (1.0, 1.0)                   # connect, read: the tests' timeout (production: 5, 10)


class Clock:
    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def tc():
    with TencentSmsStandIn() as stand_in:
        yield stand_in


def tencent(tc, tmp_path, timeout=FAST, clock=time.time, **env) -> TencentSms:
    return TencentSms(TencentSmsConfig.from_env(tc.env(tmp_path / "keys", **env)), timeout=timeout, clock=clock)


@pytest.fixture
def cloud(tc, tmp_path):
    """A cloud on SQLite, its clock moved by the test, sending through Tencent (the stand-in)."""
    clock = Clock()
    with CloudServer(tmp_path / "cloud", clock_ms=clock, sms_provider=tencent(tc, tmp_path)) as server:
        server.clock = clock
        yield server


def ask(server, phone=PHONE) -> requests.Response:
    return requests.post(server.url + "/api/v1/auth/sms-code", json={"phone": phone}, timeout=20)


def login(server, code, phone=PHONE) -> requests.Response:
    return requests.post(server.url + "/api/v1/auth/login", json={"phone": phone, "code": code}, timeout=10)


def code_rows(server, phone=PHONE) -> list[dict]:
    with server.app.state.database.read() as conn:
        return [dict(r) for r in conn.execute(select(t.sms_codes).where(t.sms_codes.c.phone == phone)
                                              .order_by(t.sms_codes.c.id)).mappings()]


def sms_alarms(server) -> list[dict]:
    with server.app.state.database.read() as conn:
        return [dict(r) for r in conn.execute(select(t.alarms).where(t.alarms.c.source == "sms")
                                              .order_by(t.alarms.c.id)).mappings()]


def sent_code(tc, call_index=-1) -> str:
    """The code our adapter put in a request the stand-in received (sent or refused)."""
    return tc.calls[call_index].body["TemplateParamSet"][0]


# ---------------------------------------------------------------------------------------------- the signer

# Tencent Cloud API 3.0, 签名方法 v3 (Signature v3): the worked example of the published documentation, a
# DescribeInstances call to CVM with these SecretId/SecretKey, timestamp and body, and each intermediate result.
EXAMPLE_SECRET_ID = "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE"
EXAMPLE_SECRET_KEY = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"
EXAMPLE_PAYLOAD = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'
EXAMPLE_CANONICAL_REQUEST = ("POST\n/\n\ncontent-type:application/json; charset=utf-8\nhost:cvm.tencentcloudapi.com\n\n"
                             "content-type;host\n35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064")
EXAMPLE_STRING_TO_SIGN = ("TC3-HMAC-SHA256\n1551113065\n2019-02-25/cvm/tc3_request\n"
                          "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031")
EXAMPLE_SIGNATURE = "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
EXAMPLE_AUTHORIZATION = ("TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/tc3_request, "
                         "SignedHeaders=content-type;host, Signature=" + EXAMPLE_SIGNATURE)


def test_the_signer_reproduces_tencents_published_example():
    sig = tc3_sign(EXAMPLE_SECRET_KEY, service="cvm", timestamp=1551113065, payload=EXAMPLE_PAYLOAD,
                   headers={"Content-Type": "application/json; charset=utf-8", "Host": "cvm.tencentcloudapi.com"})
    assert sig.canonical_request == EXAMPLE_CANONICAL_REQUEST
    # the UTC date of the timestamp: in Beijing it is already 2019-02-26 00:44
    assert sig.credential_scope == "2019-02-25/cvm/tc3_request"
    assert sig.string_to_sign == EXAMPLE_STRING_TO_SIGN
    assert sig.signature == EXAMPLE_SIGNATURE
    assert sig.authorization(EXAMPLE_SECRET_ID) == EXAMPLE_AUTHORIZATION


def test_the_signer_sorts_and_lowercases_the_signed_headers():
    sig = tc3_sign("k" * 32, service="sms", timestamp=1551113065, payload=b"{}",
                   headers={"X-TC-Action": "SendSms", "Host": "sms.tencentcloudapi.com",
                            "Content-Type": "application/json; charset=utf-8"})
    assert sig.signed_headers == "content-type;host;x-tc-action"
    assert "\nx-tc-action:sendsms\n" in sig.canonical_request
    other = tc3_sign("k" * 32, service="sms", timestamp=1551113065, payload=b"{ }",
                     headers={"X-TC-Action": "SendSms", "Host": "sms.tencentcloudapi.com",
                              "Content-Type": "application/json; charset=utf-8"})
    assert other.signature != sig.signature                      # the body is signed


# ---------------------------------------------------------------------------------------------- a person logs in

@pytest.fixture(params=["sqlite", "postgresql"])
def wired(request, tc, tmp_path, monkeypatch):
    """A cloud that picks Tencent the way an operator does: TAPSHARE_SMS_PROVIDER=tencent and TAPSHARE_TENCENT_*."""
    url, drop = "", None
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
        url, drop = _fresh_postgres_database()
    for name, value in tc.env(tmp_path / "keys").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TAPSHARE_SMS_PROVIDER", "tencent")
    with CloudServer(tmp_path / "cloud", database_url=url) as server:
        yield server
    if drop is not None:
        server.app.state.database.dispose()
        drop()


def test_a_person_logs_in_with_the_code_tencent_delivered(wired, tc, caplog):
    caplog.set_level(logging.DEBUG)
    assert requests.get(wired.url + "/api/v1/client-config", timeout=5).json()["development_sms_sink"] is False
    r = ask(wired, "+86 138-0000-1111")
    assert r.status_code == 200, r.text
    assert r.json()["development_sms_sink"] is False and r.json()["phone_masked"] == "138****1111"
    assert len(tc.sent) == 1
    sent = tc.sent[0]
    assert (sent.phone, sent.sign_name, sent.template_id) == (E164, SIGN_NAME, TEMPLATE_ID)
    code, minutes = sent.params
    assert re.fullmatch(r"[0-9]{6}", code) and minutes == "5"
    [row] = code_rows(wired)
    assert row["provider"] == "tencent" and row["send_error"] is None
    assert row["provider_request_id"] == tc.calls[0].request_id
    # no development inbox shows the code: only the phone has it
    r = requests.get(wired.url + "/api/v1/dev/sms", params={"phone": PHONE}, timeout=5)
    assert r.status_code in (403, 404) and code not in r.text

    r = login(wired, code)
    assert r.status_code == 200, r.text
    assert r.json()["new_user"] is True
    me = requests.get(wired.url + "/api/v1/me", headers={"Authorization": f"Bearer {r.json()['token']}"}, timeout=5)
    assert me.status_code == 200 and me.json()["phone_masked"] == "138****1111"
    assert sms_alarms(wired) == []
    # the send is logged, but neither the code nor the SecretKey is in any log line
    assert "login code sent to 138****1111 by tencent" in caplog.text
    assert code not in caplog.text and SECRET_KEY not in caplog.text


def test_our_rate_limits_stay_in_front_of_tencent(cloud, tc):
    assert ask(cloud).status_code == 200
    again = ask(cloud)
    assert again.status_code == 429 and again.json()["error"] == "sms_too_soon"
    assert len(tc.calls) == 1                                        # never reached Tencent
    for _ in range(4):                                               # 5 an hour per number
        cloud.clock.now += 61_000
        assert ask(cloud).status_code == 200
    cloud.clock.now += 61_000
    hourly = ask(cloud)
    assert hourly.status_code == 429 and hourly.json()["error"] == "sms_limit_phone"
    assert len(tc.calls) == 5 and len(tc.sent) == 5


# ---------------------------------------------------------------------------------------------- Tencent refuses

REFUSALS = [
    # (knob, Tencent's code, HTTP status for the person, our error, an alarm for operators)
    ("error", "FailedOperation.InsufficientBalanceInSmsPackage", 503, "sms_unavailable", True),
    ("error", "FailedOperation.SignatureIncorrectOrUnapproved", 503, "sms_unavailable", True),
    ("error", "FailedOperation.TemplateIncorrectOrUnapproved", 503, "sms_unavailable", True),
    ("error", "UnauthorizedOperation.ServiceSuspendDueToArrears", 503, "sms_unavailable", True),
    ("error", "InternalError.Timeout", 503, "sms_unavailable", True),
    ("error", "RequestLimitExceeded", 503, "sms_unavailable", True),
    ("status", "LimitExceeded.PhoneNumberDailyLimit", 503, "sms_unavailable", True),
    ("status", "LimitExceeded.PhoneNumberThirtySecondLimit", 503, "sms_unavailable", True),
    ("status", "InternalError.OtherError", 503, "sms_unavailable", True),
    ("status", "InvalidParameterValue.IncorrectPhoneNumber", 422, "phone_rejected", False),
    ("status", "FailedOperation.PhoneNumberInBlacklist", 422, "phone_rejected", False),
    ("error", "InvalidParameterValue.IncorrectPhoneNumber", 422, "phone_rejected", False),
]


@pytest.mark.parametrize(("knob", "tencent_code", "status", "error", "alarm"), REFUSALS,
                         ids=[f"{k}-{c}" for k, c, *_ in REFUSALS])
def test_each_refusal_is_answered_stored_and_alarmed(cloud, tc, knob, tencent_code, status, error, alarm):
    setattr(tc, knob, tencent_code)
    r = ask(cloud)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    if status == 503:
        assert r.headers["Retry-After"] == "60" and r.json()["retry_after_s"] == 60
    assert tc.sent == []
    code = sent_code(tc)
    [row] = code_rows(cloud)
    assert row["provider"] == "tencent" and row["provider_request_id"] is None
    assert row["send_error"].startswith(tencent_code + ":") and len(row["send_error"]) <= 200
    assert code not in row["send_error"]
    assert row["used_ms"] is not None                   # surely not sent: burned, it can never log anyone in
    assert login(cloud, code).status_code == 401
    alarms = sms_alarms(cloud)
    if alarm:
        [a] = alarms
        assert a["kind"] == "send_failed"
        assert a["detail"]["provider"] == "tencent" and a["detail"]["code"] == tencent_code
        assert a["detail"]["phone_masked"] == "138****1111" and a["detail"]["message"]
        assert code not in json.dumps(a["detail"]) and PHONE not in json.dumps(a["detail"])
    else:
        assert alarms == []                              # the person's own number: nothing for operators to fix


def test_operators_see_their_own_configuration_mistakes(cloud, tc):
    """Operators' alarms list shows a wrong sign name as Tencent reports it."""
    tc.sign_name = "别的签名"                              # what Tencent approved differs from what we send
    assert ask(cloud).status_code == 503
    r = cloud.op("GET", "/api/v1/operator/alarms")
    assert r.status_code == 200, r.text
    assert "FailedOperation.SignatureIncorrectOrUnapproved" in r.text


def test_a_failed_send_counts_for_the_minute_not_the_numbers_allowance(cloud, tc):
    assert ask(cloud).status_code == 200
    cloud.clock.now += 61_000
    tc.error = "FailedOperation.InsufficientBalanceInSmsPackage"
    assert ask(cloud).status_code == 503
    soon = ask(cloud)                                   # one person cannot hammer Tencent
    assert soon.status_code == 429 and soon.json()["error"] == "sms_too_soon"
    assert len(tc.calls) == 2
    for _ in range(6):                                  # Tencent is out of credit for a while: each minute, one try
        cloud.clock.now += 61_000
        assert ask(cloud).json()["error"] == "sms_unavailable"
    assert len(tc.calls) == 8 and len(sms_alarms(cloud)) == 7
    tc.error = None                                     # topped up: the person is not locked out for the hour
    cloud.clock.now += 61_000
    assert ask(cloud).status_code == 200
    assert len(tc.sent) == 2
    assert login(cloud, tc.last_code(PHONE)).status_code == 200


def test_a_code_that_failed_later_does_not_hide_the_one_delivered_before(cloud, tc):
    assert ask(cloud).status_code == 200
    delivered = tc.last_code(PHONE)
    cloud.clock.now += 61_000
    tc.status = "LimitExceeded.PhoneNumberOneHourLimit"
    assert ask(cloud).status_code == 503
    r = login(cloud, delivered)                          # 61 s old, valid for 5 minutes
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------- slow, absent, broken

def test_a_slow_tencent_costs_the_person_the_timeout_and_the_code_may_still_arrive(cloud, tc):
    tc.delay_s = 4.0                                    # Tencent sends, but answers after our 1 s read timeout
    started = time.monotonic()
    r = ask(cloud)
    took = time.monotonic() - started
    assert r.status_code == 503 and r.json()["error"] == "sms_unavailable"
    assert took < 3.0, took
    [row] = code_rows(cloud)
    assert row["send_error"].startswith("timeout:") and row["used_ms"] is None      # its fate is unknown
    [a] = sms_alarms(cloud)
    assert a["detail"]["code"] == "timeout" and a["detail"]["retryable"] is True
    # the message did go out: the person who got it can log in with it
    assert login(cloud, tc.last_code(PHONE)).status_code == 200


def test_tencent_down_is_answered_at_once_and_retried_after_the_minute(cloud, tc):
    tc.down()
    started = time.monotonic()
    r = ask(cloud)
    assert r.status_code == 503 and r.json()["error"] == "sms_unavailable"
    assert time.monotonic() - started < 2.0
    [row] = code_rows(cloud)
    assert row["send_error"].startswith("unreachable:") and row["used_ms"] is not None   # it never left
    assert sms_alarms(cloud)[0]["detail"]["code"] == "unreachable"
    tc.up()
    cloud.clock.now += 61_000
    assert ask(cloud).status_code == 200
    assert login(cloud, tc.last_code(PHONE)).status_code == 200


def test_a_slow_tencent_holds_only_a_few_request_threads(cloud, tc, monkeypatch):
    import threading

    from cloud.accounts import service
    monkeypatch.setattr(service, "_SENDS", threading.BoundedSemaphore(1))
    monkeypatch.setattr(service, "SEND_WAIT_S", 0.2)
    tc.delay_s = 3.0
    first: list[requests.Response] = []
    slow = threading.Thread(target=lambda: first.append(ask(cloud)))
    slow.start()
    time.sleep(0.3)                                     # the first send is waiting for Tencent
    started = time.monotonic()
    busy = ask(cloud, "13900002222")
    assert busy.status_code == 503 and busy.json()["error"] == "sms_unavailable"
    assert time.monotonic() - started < 0.9
    assert code_rows(cloud, "13900002222")[0]["send_error"].startswith("busy:")
    slow.join(10)
    assert first[0].status_code == 503 and len(tc.calls) == 1
    tc.delay_s = 0
    cloud.clock.now += 61_000
    assert ask(cloud, "13900002222").status_code == 200            # the slot is free again


def test_a_gateway_error_page_is_not_read_as_tencents_answer(cloud, tc):
    tc.http_status = 502
    r = ask(cloud)
    assert r.status_code == 503 and r.json()["error"] == "sms_unavailable"
    assert code_rows(cloud)[0]["send_error"].startswith("http_502:")


def test_a_provider_bug_is_an_outage_for_the_person_and_an_alarm(tmp_path):
    class Broken:
        name, is_development = "broken", False

        def send_code(self, phone, code, ttl_min):
            raise KeyError("oops")

    with CloudServer(tmp_path / "cloud", sms_provider=Broken()) as server:
        r = ask(server)
        assert r.status_code == 503 and r.json()["error"] == "sms_unavailable"
        assert sms_alarms(server)[0]["detail"]["code"] == "provider_error"


# ---------------------------------------------------------------------------------------------- the adapter alone

def expect_failure(provider, code="123456") -> SmsFailed:
    with pytest.raises(SmsFailed) as e:
        provider.send_code(PHONE, code, 5)
    assert code not in str(e.value) and SECRET_KEY not in str(e.value)
    return e.value


def test_tencent_checks_our_signature_as_it_would_a_strangers(tc, tmp_path):
    """The stand-in recomputes each signature; so a wrong key, an unknown SecretId, a clock off by more than five
    minutes, or a body changed after signing are refused as Tencent refuses them."""
    wrong_key = expect_failure(tencent(tc, tmp_path, secret_key="x" * 32))
    assert (wrong_key.code, wrong_key.retryable, wrong_key.user_fault) == ("AuthFailure.SignatureFailure", False, False)
    unknown = expect_failure(tencent(tc, tmp_path, secret_id="AKIDnobody000000000000000000000000000"))
    assert unknown.code == "AuthFailure.SecretIdNotFound"
    late = expect_failure(tencent(tc, tmp_path, clock=lambda: time.time() - 301))
    assert late.code == "AuthFailure.SignatureExpire"

    class Tampering(requests.Session):
        def post(self, url, data=None, **kw):
            return super().post(url, data=data.replace(b"13800001111", b"13900002222"), **kw)

    changed = TencentSms(TencentSmsConfig.from_env(tc.env(tmp_path / "k")), timeout=FAST, session=Tampering())
    assert expect_failure(changed).code == "AuthFailure.SignatureFailure"
    assert tc.sent == []
    assert tencent(tc, tmp_path, clock=lambda: time.time() - 250).send_code(PHONE, "123456", 5).request_id


def test_tencent_checks_our_application_sign_and_template(tc, tmp_path):
    assert expect_failure(tencent(tc, tmp_path, TAPSHARE_TENCENT_SMS_SDK_APP_ID="1400999999")).code == \
        "UnauthorizedOperation.SmsSdkAppIdVerifyFail"
    assert expect_failure(tencent(tc, tmp_path, TAPSHARE_TENCENT_SMS_SIGN_NAME="别家水务")).code == \
        "FailedOperation.SignatureIncorrectOrUnapproved"
    assert expect_failure(tencent(tc, tmp_path, TAPSHARE_TENCENT_SMS_TEMPLATE_ID="999")).code == \
        "FailedOperation.TemplateIncorrectOrUnapproved"
    assert expect_failure(tencent(tc, tmp_path, TAPSHARE_TENCENT_SMS_REGION="ap-mars")).code == "UnsupportedRegion"
    tc.template_params = 1                               # a template with one parameter was approved instead
    assert expect_failure(tencent(tc, tmp_path)).code == "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"


def test_a_receipt_holds_tencents_ids(tc, tmp_path):
    receipt = tencent(tc, tmp_path).send_code(PHONE, "654321", 5)
    assert receipt.provider == "tencent" and receipt.request_id == tc.calls[0].request_id
    assert receipt.serial_no == tc.sent[0].serial_no and tc.sent[0].params == ["654321", "5"]


def test_tencents_messages_are_scrubbed_of_the_code_and_the_number(tc, tmp_path):
    tc.error, tc.error_message = "FailedOperation.ContainSensitiveWord", "content 987654 to +8613800001111 refused"
    failed = expect_failure(tencent(tc, tmp_path), code="987654")
    assert "987654" not in failed.message and "13800001111" not in failed.message
    assert "RequestId" in failed.message and failed.retryable is False


def test_network_failures_are_retryable_and_say_whether_anything_left(tc, tmp_path):
    provider = tencent(tc, tmp_path)
    tc.down()
    refused = expect_failure(provider)
    assert (refused.code, refused.retryable, refused.may_have_sent) == ("unreachable", True, False)
    tc.up()
    tc.delay_s = 2.5
    slow = expect_failure(provider)
    assert (slow.code, slow.retryable, slow.may_have_sent) == ("timeout", True, True)


# ---------------------------------------------------------------------------------------------- configuration

TENCENT_VARS = ("TAPSHARE_TENCENT_SECRET_ID", "TAPSHARE_TENCENT_SECRET_KEY_FILE", "TAPSHARE_TENCENT_SMS_SDK_APP_ID",
                "TAPSHARE_TENCENT_SMS_SIGN_NAME", "TAPSHARE_TENCENT_SMS_TEMPLATE_ID")


def test_configuration_names_every_missing_variable():
    with pytest.raises(ProviderConfigError) as e:
        TencentSmsConfig.from_env({})
    for var in TENCENT_VARS:
        assert f"{var}: missing" in str(e.value)
    assert "REGION" not in str(e.value) and "ENDPOINT" not in str(e.value)       # they have defaults


def test_configuration_defaults_and_no_secret_in_its_repr(tc, tmp_path):
    env = tc.env(tmp_path)
    del env["TAPSHARE_TENCENT_SMS_REGION"], env["TAPSHARE_TENCENT_SMS_ENDPOINT"]
    config = TencentSmsConfig.from_env(env)
    assert (config.region, config.endpoint) == ("ap-guangzhou", "https://sms.tencentcloudapi.com")
    assert (config.secret_id, config.secret_key, config.sdk_app_id) == (SECRET_ID, SECRET_KEY, SDK_APP_ID)
    assert SECRET_KEY not in repr(config) and SECRET_KEY not in repr(TencentSms(config))


@pytest.mark.parametrize(("var", "value", "says"), [
    ("TAPSHARE_TENCENT_SECRET_ID", "AKID with spaces", "letters and digits"),
    ("TAPSHARE_TENCENT_SECRET_KEY_FILE", "/nonexistent/key", "cannot read /nonexistent/key"),
    ("TAPSHARE_TENCENT_SMS_SDK_APP_ID", "14001x", "digits only"),
    ("TAPSHARE_TENCENT_SMS_SIGN_NAME", "【清泉水务】", "without 【】"),
    ("TAPSHARE_TENCENT_SMS_TEMPLATE_ID", "SMS_123", "digits only"),
    ("TAPSHARE_TENCENT_SMS_REGION", "Guangzhou", "ap-guangzhou"),
    ("TAPSHARE_TENCENT_SMS_ENDPOINT", "http://sms.example.com", "https://"),
    ("TAPSHARE_TENCENT_SMS_ENDPOINT", "https://sms.tencentcloudapi.com/v3", "without a path"),
])
def test_configuration_problems_name_the_variable(tc, tmp_path, var, value, says):
    env = {**tc.env(tmp_path), var: value}
    with pytest.raises(ProviderConfigError) as e:
        TencentSmsConfig.from_env(env)
    assert f"{var}: " in str(e.value) and says in str(e.value)
    assert SECRET_KEY not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"two words\n", b"short\n", "密钥密钥密钥密钥密钥密钥".encode()])
def test_a_bad_key_file_is_named_but_never_shown(tc, tmp_path, content):
    env = tc.env(tmp_path)
    with open(env["TAPSHARE_TENCENT_SECRET_KEY_FILE"], "wb") as f:
        f.write(content)
    with pytest.raises(ProviderConfigError) as e:
        TencentSmsConfig.from_env(env)
    assert "TAPSHARE_TENCENT_SECRET_KEY_FILE" in str(e.value)
    for word in (b"two", b"words", b"short"):
        if word in content:
            assert word.decode() not in str(e.value).replace("TAPSHARE", "")


def test_settings_refuse_to_start_with_a_broken_tencent_configuration(tmp_path, monkeypatch):
    from cloud.app import CloudSettings, create_app
    from cloud.settings import SettingsError
    for var in TENCENT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TAPSHARE_TENCENT_SECRET_ID", "AKIDsomething0000000000000000000000")
    with pytest.raises(SettingsError, match="TAPSHARE_TENCENT_SECRET_KEY_FILE: missing"):
        create_app(CloudSettings(data_dir=tmp_path / "c", sms_provider_name="tencent"))


# ---------------------------------------------------------------------------------------------- development sink

def test_the_development_sink_keeps_the_same_text_and_gives_a_receipt(tmp_path):
    sink = DevSmsSink()
    receipt = sink.send_code(PHONE, "123456", 5)
    assert receipt.provider == "dev_sink" and receipt.request_id
    assert sink.messages(PHONE)[0]["text"] == \
        "【Tapshare】您的登录验证码是 123456，5 分钟内有效。Your login code is 123456."
    with CloudServer(tmp_path / "cloud") as server:
        server.login(PHONE)
        [row] = code_rows(server)
        assert row["provider"] == "dev_sink" and row["provider_request_id"].startswith("dev-")
