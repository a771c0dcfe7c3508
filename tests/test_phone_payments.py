"""Paying and being paid back, in real headless Chromium against the real cloud on loopback (issue 19): the person
picks WeChat Pay, Alipay or (development) the sandbox on the wallet page; the providers are local stand-ins of
their HTTP APIs (tests/standins), which check our signatures as the providers do and notify the cloud signed as
the providers do. Inside WeChat the page gets the openid through WeChat's web authorisation and pays through the
JSAPI bridge; other phone browsers go to WeChat's H5 page or Alipay's WAP page; a computer shows a QR code. The
balance goes back to the payments it came from from the wallet page. Screenshots: ``tests/screenshots/phone``."""

import pytest

from tests.cloudkit import CloudServer
from tests.test_phone_pages import OPERATOR, _page, browser, shot  # noqa: F401  (browser is a fixture)
from tests.util import wait_until


@pytest.fixture
def sandbox_cloud(tmp_path):
    with CloudServer(tmp_path / "cloud", **OPERATOR) as cloud:
        yield cloud


@pytest.mark.parametrize(("lang", "width"), [("zh", 320), ("en", 430)])
def test_a_person_tops_up_in_the_sandbox_and_takes_the_balance_back(sandbox_cloud, browser, lang, width):  # noqa: F811
    cloud = sandbox_cloud
    user = cloud.user("13500000001", balance_fen=0)
    page, errors = _page(browser, cloud, user, lang, width)
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("#withdraw-none")                      # nothing to take back yet, and it says so
    assert page.query_selector("button.method") is None           # one way to pay: no choice to make
    for fen in ("2000", "1000"):
        page.click(f"button.amt[data-fen='{fen}']")
        page.wait_for_selector("#pay")
        page.click("#pay")
        page.wait_for_selector("#paid", timeout=15_000)
    page.wait_for_selector("#withdraw-go")
    assert "30.00" in page.inner_text("#withdraw-go")
    page.click("#withdraw-go")                                    # a second tap confirms
    assert "30.00" in page.inner_text("#withdraw-go")
    shot(page, f"p1-withdraw-confirm-{lang}-{width}")
    page.click("#withdraw-go")
    page.wait_for_selector("#withdraw-done")
    assert page.inner_text("#available") == "¥0.00"
    rows = page.inner_text("#refunds")
    assert rows.count("已到账" if lang == "zh" else "Received") == 2 and "¥20.00" in rows and "¥10.00" in rows
    shot(page, f"p2-withdrawn-{lang}-{width}")
    w = user.call("GET", "/api/v1/me/wallet").json()
    assert w["available_fen"] == 0 and sorted(r["amount_fen"] for r in w["refunds"]) == [1000, 2000]
    sandbox = cloud.app.state.services.wallet.providers["sandbox"]
    assert wait_until(lambda: all(sandbox.query_refund(r["order_id"], r["refund_id"]) for r in w["refunds"]))
    assert errors == []
    page.close()
