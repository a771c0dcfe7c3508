"""Signing in to the operators' console as people do (Chromium, the sign-in form) and as an attacker would (direct
HTTP): passwords, lockout after repeated failures, the TOTP second factor, CSRF, sign-out everywhere, idle and
absolute session ends, admins managing operators, and what each role is neither shown nor allowed."""

import subprocess
import sys

import pyotp
import pytest
import requests

from tests.cloudkit import CloudServer
from tests.consolekit import (
    PASSWORD,
    XSS,
    Console,
    goto,
    make_operator,
    open_console,
    shot,
)


class Clock:
    def __init__(self) -> None:
        import time
        self.ms = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cloud(tmp_path, clock):
    with CloudServer(tmp_path / "cloud", clock_ms=clock) as c:
        c.admin_name = make_operator(c, "admin", "boss", display_name="王经理")
        yield c


def test_an_admin_signs_in_through_the_form_after_a_wrong_password_and_sees_their_account(cloud, browser):
    page = open_console(browser, cloud, "boss", hash_="#/account")
    page.wait_for_selector("#acct-name")
    assert "boss (王经理)" in page.inner_text("#acct-name")
    assert "王经理 · 管理员" in page.inner_text("#who")
    shot(page, "account")
    page.click("#lang")
    page.wait_for_selector("text=Two-step verification")
    shot(page, "account")
    page.click("#signout")
    page.wait_for_selector("#signin-name")
    page.fill("#signin-name", "boss")
    page.fill("#signin-password", "not the password")
    page.click("#signin-go")
    page.wait_for_selector("#signin-error:has-text('Wrong name or password')")
    shot(page, "signin")
    assert page.errors == [f"401 {cloud.url}/api/v1/console/login"]
    page.context.close()


def test_the_session_cookie_is_httponly_strict_and_changes_need_the_csrf_token(cloud):
    r = requests.post(cloud.url + "/api/v1/console/login", json={"name": "boss", "password": PASSWORD}, timeout=10)
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    s = Console(cloud, "boss")
    assert s.call("GET", "/api/v1/operator/machines").status_code == 200          # reading needs no token
    body = {"operator_id": "viewer-1", "role": "viewer", "password": "Ling-Shui-789"}
    r = s.call("POST", "/api/v1/console/operators", csrf=False, json=body)
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    s.csrf = "0" * 40
    assert s.call("POST", "/api/v1/console/operators", json=body).json()["error"] == "csrf"
    r = s.call("PATCH", "/api/v1/operator/machines/NOPE", csrf=False, json={"price_fen_per_l": 1})
    assert r.status_code == 403 and r.json()["error"] == "csrf"           # every changing endpoint, not only ours
    s.csrf = s.get(cloud.url + "/api/v1/console/me").json()["csrf_token"]
    assert s.call("POST", "/api/v1/console/operators", json=body).status_code == 200
    assert cloud.op("GET", "/api/v1/operator/machines").status_code == 200       # scripts' bearer tokens still work


def test_five_wrong_passwords_lock_the_account_for_fifteen_minutes_and_an_admin_can_unlock_it(cloud, clock):
    name = make_operator(cloud, "operator", "op-li")
    url = cloud.url + "/api/v1/console/login"
    for _ in range(5):
        r = requests.post(url, json={"name": name, "password": "wrong-password-1"}, timeout=10)
        assert r.status_code == 401 and r.json()["error"] == "bad_credentials"
    r = requests.post(url, json={"name": name, "password": PASSWORD}, timeout=10)     # the right one, too late
    assert r.status_code == 429 and r.json()["error"] == "account_locked" and 0 < r.json()["retry_after_s"] <= 900
    for _ in range(5):                                   # a name nobody has locks the same way: nothing to learn
        assert requests.post(url, json={"name": "nobody", "password": "x"}, timeout=10).json()["error"] == \
            "bad_credentials"
    assert requests.post(url, json={"name": "nobody", "password": "x"}, timeout=10).json()["error"] == "account_locked"
    clock.ms += 15 * 60_000 + 1000
    assert requests.post(url, json={"name": name, "password": PASSWORD}, timeout=10).status_code == 200
    for _ in range(5):
        requests.post(url, json={"name": name, "password": "wrong-password-1"}, timeout=10)
    admin = Console(cloud, "boss")
    ops = {o["operator_id"]: o for o in admin.call("GET", "/api/v1/console/operators").json()["operators"]}
    assert ops[name]["locked"]
    assert admin.call("PATCH", f"/api/v1/console/operators/{name}", json={"unlock": True}).json()["locked"] is False
    assert requests.post(url, json={"name": name, "password": PASSWORD}, timeout=10).status_code == 200
    actions = [a["action"] for a in audit(cloud, name)]
    assert actions.count("console_login_failed") == 10 and actions.count("console_locked") == 2


def audit(cloud, target: str) -> list[dict]:
    from sqlalchemy import select

    from cloud import db as t
    with cloud.app.state.database.read() as conn:
        return [dict(r) for r in conn.execute(select(t.audit_log).where(t.audit_log.c.target == target)
                                              .order_by(t.audit_log.c.id)).mappings()]


def test_an_operator_turns_on_the_second_factor_in_the_page_and_then_needs_a_fresh_code(cloud, browser, clock):
    name = make_operator(cloud, "operator", "op-zhao")
    page = open_console(browser, cloud, name, hash_="#/account")
    page.click("#totp-start")
    page.fill("dialog [name=password]", "not my password")                  # the password first, and right
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:has-text('密码错误')")
    page.fill("dialog [name=password]", PASSWORD)
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#totp-secret")
    shot(page, "totp-setup")
    secret = page.inner_text("#totp-secret").strip()
    totp = pyotp.TOTP(secret)
    page.fill("#totp-code", "000000" if totp.at(clock.ms / 1000) != "000000" else "111111")
    page.click("#totp-confirm")
    page.wait_for_selector("#totp .field-error:not(:empty)")
    page.fill("#totp-code", totp.at(clock.ms / 1000))
    page.click("#totp-confirm")
    page.wait_for_selector("#totp-stop")
    page.click("#signout")
    clock.ms += 30_000                                   # the next code: a code is accepted once
    page.fill("#signin-name", name)
    page.fill("#signin-password", PASSWORD)
    page.click("#signin-go")
    page.wait_for_selector("#signin-totp:visible")
    assert "6 位验证码" in page.inner_text("#signin-error")
    page.fill("#signin-totp", totp.at(clock.ms / 1000))
    page.click("#signin-go")
    page.wait_for_selector("#shell:not([hidden])")
    page.context.close()
    used = totp.at(clock.ms / 1000)
    r = requests.post(cloud.url + "/api/v1/console/login", json={"name": name, "password": PASSWORD, "totp": used},
                      timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "bad_totp"               # replayed
    admin = Console(cloud, "boss")
    assert admin.call("PATCH", f"/api/v1/console/operators/{name}", json={"reset_totp": True}).json()[
        "totp_enabled"] is False


def test_sign_out_everywhere_ends_the_other_browsers_session(cloud, browser):
    a = open_console(browser, cloud, "boss", hash_="#/account")
    b = open_console(browser, cloud, "boss", hash_="#/account")
    b.wait_for_selector("#everywhere")
    b.click("#everywhere")
    b.wait_for_selector("#signin-name")
    a.click("#nav-operators")                            # the next thing the other browser does
    a.wait_for_selector("#signin-error:has-text('登录已过期')")
    a.context.close()
    b.context.close()


def test_sessions_end_after_an_idle_hour_and_after_twelve_hours_whatever_happens(cloud, clock):
    s = Console(cloud, "boss")
    clock.ms += 59 * 60_000
    assert s.call("GET", "/api/v1/console/me").status_code == 200
    clock.ms += 59 * 60_000                              # active: the idle timer restarted
    assert s.call("GET", "/api/v1/console/me").status_code == 200
    clock.ms += 61 * 60_000
    assert s.call("GET", "/api/v1/console/me").json()["error"] == "signed_out"
    s = Console(cloud, "boss")
    for _ in range(14):                                  # 12 h 50 min, never idle an hour
        clock.ms += 55 * 60_000
        r = s.call("GET", "/api/v1/console/me")
    assert r.status_code == 401


def test_an_admin_creates_disables_and_re_roles_operators_in_the_page(cloud, browser):
    page = open_console(browser, cloud, "boss", hash_="#/operators")
    page.click("#new-operator")
    page.fill("dialog [name=operator_id]", "li.na")
    page.fill("dialog [name=display_name]", XSS)
    page.select_option("dialog [name=role]", "viewer")
    page.fill("dialog [name=password]", "short")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:has-text('10')")          # the server's reason, shown
    page.fill("dialog [name=password]", "Qing-Quan-2027")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("tr[data-key='li.na']")
    assert XSS in page.inner_text("tr[data-key='li.na']")                 # shown as text, not run
    shot(page, "operators")
    viewer = Console(cloud, "li.na", "Qing-Quan-2027")
    assert viewer.call("GET", "/api/v1/console/operators").status_code == 403
    page.click("tr[data-key='li.na'] button:has-text('停用')")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("tr[data-key='li.na'] .chip:has-text('已停用')")
    assert viewer.call("GET", "/api/v1/console/me").status_code == 401                   # signed out at once
    r = requests.post(cloud.url + "/api/v1/console/login", json={"name": "li.na", "password": "Qing-Quan-2027"},
                      timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "operator_disabled"
    page.click("tr[data-key='li.na'] button:has-text('启用')")
    page.wait_for_selector("tr[data-key='li.na'] .chip:has-text('正常')")
    page.click("tr[data-key='li.na'] button:has-text('修改')")
    page.select_option("dialog [name=role]", "operator")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("tr[data-key='li.na'] td:has-text('运营员')")
    assert [a["action"] for a in audit(cloud, "li.na")][:1] == ["operator_created"]
    page.context.close()


def test_the_console_says_the_servers_refusals_in_chinese(cloud, browser):
    """A refusal is shown in the operator's language, not the server's English: the console's words for the
    server's code (with the server's words after them where they carry the detail: which rule a password broke),
    and for a code the console does not know, a sentence by the status with the server's words after it."""
    page = open_console(browser, cloud, "boss", hash_="#/operators")
    page.click("#new-operator")
    page.fill("dialog [name=operator_id]", "boss")                            # taken
    page.fill("dialog [name=display_name]", "王建国")
    page.select_option("dialog [name=role]", "viewer")
    page.fill("dialog [name=password]", "Qing-Quan-2027")
    page.click("dialog button[type=submit]")
    said = page.wait_for_selector("dialog .field-error:has-text('该用户名已被占用')").inner_text()
    assert "taken" not in said
    page.fill("dialog [name=operator_id]", "wang.jg")
    page.fill("dialog [name=password]", "short")
    page.click("dialog button[type=submit]")
    said = page.wait_for_selector("dialog .field-error:has-text('密码强度不够')").inner_text()
    assert "10" in said                                                        # the rule, from the server
    shot(page, "refusal-in-chinese")
    page.click("dialog button:has-text('取消')")
    page.route("**/api/v1/console/operators*", lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"error": "brand_new_trouble", "message": "it is off"}'))
    goto(page, "#/machines", "h1")
    goto(page, "#/operators", ".card.bad")
    assert "服务暂时不可用，请稍后再试（it is off）" in page.inner_text(".card.bad")
    page.context.close()


def test_what_a_viewer_may_not_do_is_neither_shown_nor_accepted(cloud, browser):
    name = make_operator(cloud, "viewer", "kan.kan")
    page = open_console(browser, cloud, name, hash_="#/account")
    assert page.locator("#nav-operators").count() == 0
    goto(page, "#/operators", ".card.bad")                               # typed in the address bar
    assert "无权" in page.inner_text("#view")
    page.context.close()
    s = Console(cloud, name)
    for method, path, body in [
        ("GET", "/api/v1/console/operators", None),
        ("POST", "/api/v1/console/operators", {"operator_id": "x-1", "role": "admin", "password": "Aa-1234567890"}),
        ("PATCH", f"/api/v1/console/operators/{name}", {"role": "admin"}),
        ("PATCH", "/api/v1/operator/machines/S1", {"price_fen_per_l": 1}),
        ("POST", "/api/v1/operator/machines", {"machine_id": "S9", "price_fen_per_l": 100}),
    ]:
        r = s.call(method, path, json=body)
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (path, r.text)


def test_the_last_admin_cannot_be_disabled_or_demoted_and_bad_input_is_refused_clearly(cloud):
    s = Console(cloud, "boss")
    old_admin = cloud.op("GET", "/api/v1/console/operators").json()["operators"]
    for o in old_admin:                                   # only boss stays an enabled admin
        if o["operator_id"] != "boss" and o["role"] == "admin":
            s.call("PATCH", f"/api/v1/console/operators/{o['operator_id']}", json={"disabled": True})
    for change in ({"disabled": True}, {"role": "viewer"}):
        r = s.call("PATCH", "/api/v1/console/operators/boss", json=change)
        assert r.status_code == 409 and r.json()["error"] == "last_admin"
    for body, code in [({"operator_id": "-bad", "role": "viewer", "password": "Aa-1234567890"}, "bad_operator_id"),
                       ({"operator_id": "boss", "role": "viewer", "password": "Aa-1234567890"}, "operator_exists"),
                       ({"operator_id": "new-1", "role": "viewer", "password": "password123"}, "weak_password"),
                       ({"operator_id": "new-1", "role": "king", "password": "Aa-1234567890"}, "invalid_request"),
                       ({"operator_id": "new-1", "role": "viewer"}, "invalid_request")]:
        r = s.call("POST", "/api/v1/console/operators", json=body)
        assert r.status_code in (409, 422) and r.json()["error"] == code, r.text
    r = s.post(cloud.url + "/api/v1/console/login", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = s.call("PATCH", "/api/v1/console/operators/nobody", json={"role": "viewer"})
    assert r.status_code == 404


def test_the_first_admins_password_is_set_from_the_command_line(tmp_path):
    data = tmp_path / "cloud"
    env_run = [sys.executable, "-m", "cloud"]
    token = subprocess.run([*env_run, "create-operator", "first", "--role", "admin", "--data-dir", str(data)],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert token
    weak = subprocess.run([*env_run, "set-password", "first", "--data-dir", str(data)], input="short\n",
                          capture_output=True, text=True)
    assert weak.returncode == 2 and "10 characters" in weak.stderr
    ok = subprocess.run([*env_run, "set-password", "first", "--data-dir", str(data)], input=PASSWORD + "\n",
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with CloudServer(data) as c:
        assert Console(c, "first").call("GET", "/api/v1/console/me").json()["operator"]["role"] == "admin"


def test_parallel_guesses_are_counted_before_they_are_checked(real_password_hashing, cloud):
    """25 wrong passwords at once: no more than five are tried, the rest are refused as locked."""
    from concurrent.futures import ThreadPoolExecutor
    name = make_operator(cloud, "operator", "op-par")
    url = cloud.url + "/api/v1/console/login"
    with ThreadPoolExecutor(25) as pool:
        answers = list(pool.map(lambda i: requests.post(url, json={"name": name, "password": f"wrong-{i:04d}xx"},
                                                        timeout=30).json()["error"], range(25)))
    assert answers.count("bad_credentials") <= 5 and answers.count("account_locked") >= 20, answers
    r = requests.post(url, json={"name": name, "password": PASSWORD}, timeout=10)
    assert r.status_code == 429


def test_one_code_signs_in_once_even_twice_at_the_same_moment(real_password_hashing, cloud, clock):
    from concurrent.futures import ThreadPoolExecutor
    name = make_operator(cloud, "operator", "op-otp")
    s = Console(cloud, name)
    secret = s.call("POST", "/api/v1/console/totp/setup", json={"password": PASSWORD}).json()["secret"]
    totp = pyotp.TOTP(secret)
    assert s.call("POST", "/api/v1/console/totp/enable", json={"code": totp.at(clock.ms / 1000)}).status_code == 200
    clock.ms += 30_000
    code = totp.at(clock.ms / 1000)
    url = cloud.url + "/api/v1/console/login"
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: requests.post(url, json={"name": name, "password": PASSWORD, "totp": code},
                                                      timeout=30).status_code, range(6)))
    assert codes.count(200) == 1 and set(codes) - {200} <= {401, 429}, codes      # once; the copies refused


def test_a_stolen_session_cannot_guess_the_password_or_enrol_a_phone(cloud):
    """Five wrong current passwords lock the name and end its sessions; the second factor needs the password."""
    name = make_operator(cloud, "operator", "op-stolen")
    thief = Console(cloud, name)
    r = thief.call("POST", "/api/v1/console/totp/setup", json={"password": "guess-number-1"})
    assert r.status_code == 401 and r.json()["error"] == "bad_credentials"
    assert thief.call("POST", "/api/v1/console/totp/setup", json={}).status_code == 422
    for i in range(4):
        r = thief.call("POST", "/api/v1/console/password", json={"current": f"guess-{i}-xxxx", "new": "Xin-Mi-Ma-2099"})
        assert r.status_code == 401, r.text
    assert thief.call("GET", "/api/v1/console/me").json()["error"] == "signed_out"      # locked: the session ended
    r = requests.post(cloud.url + "/api/v1/console/login", json={"name": name, "password": PASSWORD}, timeout=10)
    assert r.status_code == 429 and r.json()["error"] == "account_locked"
    actions = [a["action"] for a in audit(cloud, name)]
    assert actions.count("console_totp_setup_failed") == 1 and actions.count("console_password_change_failed") == 4
    assert "console_locked" in actions


def test_signing_in_again_ends_the_old_session_and_a_stale_csrf_token_is_renewed(cloud, browser):
    page = open_console(browser, cloud, "boss", hash_="#/account")
    old_cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "tapshare_console")
    other = page.context.new_page()                       # another tab of the same browser signs in again
    other.goto(cloud.url + "/console")
    other.wait_for_selector("#shell:not([hidden])")
    other.evaluate("""async (pw) => { await fetch('/api/v1/console/login', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({name: 'boss', password: pw})}); }""",
                   PASSWORD)
    r = requests.get(cloud.url + "/api/v1/console/me", cookies={"tapshare_console": old_cookie}, timeout=10)
    assert r.status_code == 401                           # the cookie it replaced is over
    page.click("#signout")                                # the first tab still holds the old CSRF token
    page.wait_for_selector("#signin-name")
    r = other.evaluate("async () => (await fetch('/api/v1/console/me')).status")
    assert r == 401                                       # really signed out, not just shown the form
    page.context.close()


def test_api_answers_are_not_cached_and_every_page_has_its_policy(cloud):
    s = Console(cloud, "boss")
    me = s.call("GET", "/api/v1/console/me")
    assert me.headers["cache-control"] == "no-store" and me.headers["x-content-type-options"] == "nosniff"
    for path in ("/console", "/static/console/index.html", "/static/app.html"):
        r = requests.get(cloud.url + path, timeout=10)
        assert "script-src 'self'" in r.headers["content-security-policy"], path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path


def test_two_admins_demoting_each_other_at_once_leave_one_admin(tmp_path):
    """On PostgreSQL, where two transactions really run at once."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.cloudkit import PG_URL
    from tests.conftest import _fresh_postgres_database
    if not PG_URL:
        pytest.skip("no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
    url, drop = _fresh_postgres_database()
    try:
        with CloudServer(tmp_path / "cloud", database_url=url) as c:
            with c.app.state.database.tx() as conn:           # the bootstrap admin's token has expired
                from cloud import db as t
                conn.execute(t.operators.update().where(t.operators.c.role == "admin").values(expires_ms=1))
            make_operator_direct = c.app.state.services.console.create
            now = c.settings.clock_ms()
            for n in ("a0", "b0"):
                make_operator_direct("setup", n, "", "admin", PASSWORD, now)
            for _ in range(3):
                a, b = Console(c, "a0"), Console(c, "b0")
                with ThreadPoolExecutor(2) as pool:
                    codes = list(pool.map(lambda x: x[0].call("PATCH", f"/api/v1/console/operators/{x[1]}",
                                                              json={"role": "viewer"}).status_code,
                                          [(a, "b0"), (b, "a0")]))
                # the loser is refused as the last admin (409), or, had the winner committed before the loser's
                # request was checked, as no longer an admin (403): never both demoted
                assert sorted(codes) in ([200, 403], [200, 409]), codes
                still = "a0" if codes[0] == 200 else "b0"           # who demoted the other
                assert Console(c, still).call("GET", "/api/v1/console/me").json()["operator"]["role"] == "admin"
                for o in ("a0", "b0"):                          # both admins again for the next round
                    c.app.state.services.console.change("setup", o, {"role": "admin"}, c.settings.clock_ms())
            c.app.state.database.dispose()
    finally:
        drop()
