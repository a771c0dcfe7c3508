import os
import secrets

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
