"""Several cloud instances on one PostgreSQL: where each machine long-polls is shared (``machines.poll_until_ms``),
background jobs are leased to one instance at a time (``job_leases``) and rate limits are counted together
(``rate_hits``).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as b:
        b.add_column(sa.Column("poll_until_ms", sa.BigInteger(), nullable=True))
    op.create_table("job_leases",
                    sa.Column("job", sa.String(length=40), nullable=False),
                    sa.Column("holder", sa.String(length=100), nullable=False),
                    sa.Column("until_ms", sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint("job"))
    op.create_table("rate_hits",
                    sa.Column("bucket", sa.String(length=40), nullable=False),
                    sa.Column("key", sa.String(length=200), nullable=False),
                    sa.Column("window_ms", sa.BigInteger(), nullable=False),
                    sa.Column("hits", sa.Integer(), nullable=False),
                    sa.Column("expires_ms", sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint("bucket", "key", "window_ms"))
    op.create_index("ix_rate_hits_expires_ms", "rate_hits", ["expires_ms"])
    # each instance's periodic look for commands whose notification it missed reads only these
    op.create_index("commands_unacked", "commands", ["expires_ms"], postgresql_where=sa.text("acked_ms IS NULL"),
                    sqlite_where=sa.text("acked_ms IS NULL"))


def downgrade() -> None:
    op.drop_index("commands_unacked", table_name="commands")
    op.drop_index("ix_rate_hits_expires_ms", table_name="rate_hits")
    op.drop_table("rate_hits")
    op.drop_table("job_leases")
    with op.batch_alter_table("machines") as b:
        b.drop_column("poll_until_ms")
