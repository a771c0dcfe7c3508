"""Schema migrations (Alembic, cloud/migrations): a database the previous release made, with data in it, is
upgraded and served; a new one is created by the same migrations; the migrated schema is exactly the models'.

The previous release's schema is its own code: tests/legacy/release_0_1_0_db.py is cloud/db.py as release
0.1.0 shipped it (commit ed0673c), kept frozen."""

import os

import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text

from cloud import db as t
from cloud.db import Database, SchemaMismatch
from cloud.security import new_token, token_hash
from tests.cloudkit import PG_URL, CloudServer
from tests.legacy import release_0_1_0_db as old

NOW_MS = 1_796_000_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cloud.db'}"
        return
    if not PG_URL:
        if os.environ.get("TAPSHARE_TEST_ALL"):
            pytest.fail("test.sh set up everything, yet there is no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
        pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
    from tests.conftest import _fresh_postgres_database
    url, drop = _fresh_postgres_database()
    yield url
    drop()


def schema_drift(db: Database) -> list:
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), t.metadata)


def fill_like_release_0_1_0(url: str) -> str:
    """What a running 0.1.0 cloud holds: a machine, a person with a top-up, one settled pour with its bill,
    points and rental record, an operator and the audit log. Returns the person's login token."""
    db = old.Database(url)
    db.create_all()
    token = new_token()
    with db.tx() as c:
        c.execute(old.machines.insert().values(machine_id="M-OLD", location="杭州市西湖区文三路 90 号东部软件园 3 号楼",
                                                price_fen_per_l=200, max_volume_ml=5000, max_duration_ms=300_000,
                                                max_idle_ms=15_000, max_credit_fen=10_000, min_dispense_ml=10,
                                                created_ms=NOW_MS, timezone="Asia/Shanghai", hotline="400-820-8820"))
        c.execute(old.users.insert().values(user_id="u-old", phone="13800138000", registered=True, points=1,
                                             created_ms=NOW_MS))
        c.execute(old.user_tokens.insert().values(token_hash=token_hash(token), user_id="u-old", created_ms=NOW_MS))
        c.execute(old.sessions.insert().values(
            session_id="s-old", machine_id="M-OLD", user_id="u-old", state="ended", price_fen_per_l=200,
            credit_limit_fen=1000, command_id="c-old", presence_hash="p" * 64, created_ms=NOW_MS,
            deadline_ms=NOW_MS + 8000, min_dispense_ml=10, max_volume_ml=5000, acked_ms=NOW_MS + 500,
            ended_ms=NOW_MS + 30_000, end_reason="stop_button", fee_fen=150, volume_ml=750))
        for kind, amount in (("topup", 1000), ("hold", -1000), ("release", 1000), ("charge", -150)):
            c.execute(old.balance_entries.insert().values(user_id="u-old", kind=kind, amount_fen=amount,
                                                          session_id=None if kind == "topup" else "s-old",
                                                          created_ms=NOW_MS))
        c.execute(old.bills.insert().values(
            session_id="s-old", user_id="u-old", machine_id="M-OLD", started_at="2026-11-30T02:13:20.000Z",
            ended_at="2026-11-30T02:13:50.000Z", duration_ms=30_000, volume_ml=750, avg_flow_ml_per_min=1500,
            amount_fen=150, price_fen_per_l=200, water_quality={"temp_c": 12.5}, points=1, end_reason="stop_button",
            created_ms=NOW_MS + 30_000))
        c.execute(old.points_entries.insert().values(user_id="u-old", delta=1, kind="earn", ref="s-old",
                                                     created_ms=NOW_MS + 30_000))
        c.execute(old.rental_records.insert().values(
            session_id="s-old", machine_id="M-OLD", user_id="u-old", started_at="2026-11-30T02:13:20.000Z",
            ended_at="2026-11-30T02:13:50.000Z", started_ms=NOW_MS, record={"volume_ml": 750, "cost_fen": 150}))
        c.execute(old.audit_log.insert().values(operator_id="admin", action="provision_machine", target="M-OLD",
                                                detail={"price_fen_per_l": 200}, at_ms=NOW_MS))
    db.dispose()
    return token


def test_a_new_database_is_made_by_the_migrations_and_matches_the_models(database_url):
    db = Database(database_url)
    db.create_all()
    db.create_all()                                  # again: nothing to do
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0009"
    assert schema_drift(db) == []
    db.dispose()


def test_a_database_of_the_previous_release_is_upgraded_with_its_data_and_served(database_url, tmp_path):
    token = fill_like_release_0_1_0(database_url)
    db = Database(database_url)
    db.create_all()
    assert schema_drift(db) == []                    # the upgraded schema is exactly this release's
    with db.read() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0009"
        assert conn.execute(select(t.bills.c.amount_fen)).scalar() == 150
        assert conn.execute(select(t.machines.c.location)).scalar().startswith("杭州市西湖区")
    db.dispose()
    with CloudServer(tmp_path / "served", database_url=database_url) as cloud:
        me = requests.get(cloud.url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        assert (me["available_fen"], me["held_fen"], me["points"]) == (850, 0, 1)
        assert [b["session_id"] for b in me["bills"]] == ["s-old"] and me["bills"][0]["location"].startswith("杭州")
        machines = cloud.op("GET", "/api/v1/operator/machines").json()["machines"]
        assert [m["machine_id"] for m in machines] == ["M-OLD"]
        records = cloud.op("GET", "/api/v1/operator/records", params={"user_id": "u-old"}).json()["records"]
        assert records[0]["record"]["cost_fen"] == 150


def test_a_database_from_before_migrations_or_from_a_newer_release_is_refused_in_words(database_url):
    db = old.Database(database_url)
    db.create_all()
    with db.tx() as conn:
        conn.execute(text("UPDATE schema_info SET version = 2"))
    db.dispose()
    with pytest.raises(SchemaMismatch, match=r"schema version 2, from before release 0\.1\.0"):
        Database(database_url).create_all()
    with old.Database(database_url).tx() as conn:
        conn.execute(text("UPDATE schema_info SET version = 3"))
    new = Database(database_url)
    new.create_all()
    with new.tx() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaMismatch, match="revision 0099, which this release does not know"):
        new.create_all()
    new.dispose()


def test_a_migration_that_fails_half_way_leaves_nothing_behind(database_url):
    """The whole upgrade is one transaction, DDL included (on SQLite too): the next start begins afresh instead
    of finding half a schema."""
    db = Database(database_url)
    with db.tx() as conn:                          # in the way of the last table migration 0001 creates
        conn.execute(text("CREATE TABLE bills (x INTEGER)"))
    with pytest.raises(Exception, match=r"(?i)bills"):
        db.create_all()
    with db.read() as conn:
        from sqlalchemy import inspect
        assert inspect(conn).get_table_names() == ["bills"]
    with db.tx() as conn:
        conn.execute(text("DROP TABLE bills"))
    db.create_all()
    assert schema_drift(db) == []
    db.dispose()


def test_a_table_can_be_rebuilt_under_rows_that_refer_to_it(tmp_path):
    """What a later migration does to change a column on SQLite (copy the table, drop, rename: SQLite cannot
    alter a column in place, PostgreSQL can) must work while other tables' rows refer to it, and keep every
    row."""
    from alembic.operations import Operations
    database_url = f"sqlite:///{tmp_path / 'cloud.db'}"
    fill_like_release_0_1_0(database_url)
    db = Database(database_url)
    db.create_all()
    with db.tx() as conn:
        conn.execute(t.commands.insert().values(command_id="c-1", machine_id="M-OLD", kind="price", body={},
                                                created_ms=NOW_MS, expires_ms=NOW_MS + 60_000))
    with db.migration_connection() as conn, \
            Operations(MigrationContext.configure(conn)).batch_alter_table("machines", recreate="always"):
        pass
    with db.read() as conn:
        assert conn.execute(select(t.machines.c.machine_id)).scalars().all() == ["M-OLD"]
        assert conn.execute(select(t.commands.c.machine_id)).scalar() == "M-OLD"
    assert schema_drift(db) == []
    db.dispose()


def test_instances_starting_at_once_migrate_one_after_the_other(database_url, tmp_path):
    """Four cloud processes start on one new database at once: each waits for the one migrating, none fails
    (on PostgreSQL even when the database's default isolation is REPEATABLE READ)."""
    import subprocess
    import sys
    if database_url.startswith("postgresql"):
        import psycopg
        admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {database_url.rsplit('/', 1)[1]} "
                         "SET default_transaction_isolation = 'repeatable read'")
    code = "import sys; from cloud.db import Database; Database(sys.argv[1]).create_all()"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], cwd=root, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    db = Database(database_url)
    assert schema_drift(db) == []
    db.dispose()
