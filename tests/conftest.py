import os
import secrets
import shutil

import pytest

from tests.cloudkit import PG_URL, CloudServer


def _fresh_postgres_database() -> tuple[str, callable]:
    import psycopg
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = "t_" + secrets.token_hex(6)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return PG_URL.rsplit("/", 1)[0] + "/" + name, drop


@pytest.fixture(autouse=True)
def cheap_password_hashing(request, monkeypatch):
    """Operators' passwords hashed with argon2id at its lowest cost (about 1 ms, not 100 ms per hash and per
    sign-in): the console's tests make and sign in hundreds of operators, and what they prove (who may sign in,
    lockouts, second factor, sessions) does not depend on the cost. The library's defaults, which the cloud uses,
    are kept where the cost is the point: a test that asks for ``real_password_hashing`` (guesses racing while
    a hash is being checked), the command line, and the cloud run as a separate process."""
    if "real_password_hashing" in request.fixturenames:
        return
    from argon2 import PasswordHasher

    from cloud.console import service
    cheap = PasswordHasher(time_cost=1, memory_cost=256, parallelism=1)
    monkeypatch.setattr(service, "_hasher", cheap)
    monkeypatch.setattr(service, "_DUMMY", cheap.hash("not anyone's password"))


@pytest.fixture
def real_password_hashing():
    """The cloud's own argon2id parameters (see cheap_password_hashing)."""
    from cloud.console import service
    assert service._hasher.memory_cost == 65536           # the library's default: what production uses


@pytest.fixture(params=["sqlite", "postgresql"])
def cloud(request, tmp_path):
    """A real cloud server on loopback, on SQLite and on PostgreSQL."""
    drop = None
    url = ""
    if request.param == "postgresql":
        if not PG_URL:
            if os.environ.get("TAPSHARE_TEST_ALL"):
                pytest.fail("test.sh set up everything, yet there is no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
            pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
        url, drop = _fresh_postgres_database()
    with CloudServer(tmp_path / "cloud", database_url=url) as server:
        yield server
    if drop is not None:
        server.app.state.database.dispose()
        drop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright, one per test module (the console's tests; the phone pages' own)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        if os.environ.get("TAPSHARE_TEST_ALL"):
            pytest.fail("test.sh set up everything, yet chromium is missing (see scripts/test-setup.sh)")
        pytest.skip("no chromium: apt-get install chromium fonts-noto-cjk")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def factory():
    """gpiozero's mock pins (the only mocked hardware), also the default factory while the test runs."""
    from gpiozero import Device

    from hal.sim import mock_factory
    f = mock_factory()
    Device.pin_factory = f
    yield f
    f.reset()
