"""Fleet updates: uploaded release bundles (``releases``), rollouts of one to a set or a percentage of machines
(``rollouts``) and each machine's step in its rollout (``machine_updates``).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("releases",
                    sa.Column("version", sa.String(length=40), nullable=False),
                    sa.Column("sha256", sa.String(length=64), nullable=False),
                    sa.Column("size_bytes", sa.BigInteger(), nullable=False),
                    sa.Column("key_id", sa.String(length=16), nullable=False),
                    sa.Column("manifest", sa.JSON(), nullable=False),
                    sa.Column("notes", sa.String(length=2000), nullable=False),
                    sa.Column("uploaded_by", sa.String(length=64), nullable=False),
                    sa.Column("uploaded_ms", sa.BigInteger(), nullable=False),
                    sa.Column("withdrawn_ms", sa.BigInteger(), nullable=True),
                    sa.PrimaryKeyConstraint("version"))
    op.create_table("rollouts",
                    sa.Column("rollout_id", sa.Integer(), autoincrement=True, nullable=False),
                    sa.Column("version", sa.String(length=40), nullable=False),
                    sa.Column("created_by", sa.String(length=64), nullable=False),
                    sa.Column("created_ms", sa.BigInteger(), nullable=False),
                    sa.Column("state", sa.String(length=16), nullable=False),
                    sa.Column("machine_ids", sa.JSON(), nullable=True),
                    sa.Column("percent", sa.Integer(), nullable=True),
                    sa.Column("max_rollback_pct", sa.Integer(), nullable=False),
                    sa.Column("stop_reason", sa.String(length=200), nullable=True),
                    sa.Column("updated_ms", sa.BigInteger(), nullable=False),
                    sa.ForeignKeyConstraint(["version"], ["releases.version"]),
                    sa.PrimaryKeyConstraint("rollout_id"))
    op.create_table("machine_updates",
                    sa.Column("rollout_id", sa.Integer(), nullable=False),
                    sa.Column("machine_id", sa.String(length=64), nullable=False),
                    sa.Column("version", sa.String(length=40), nullable=False),
                    sa.Column("step", sa.String(length=16), nullable=False),
                    sa.Column("reason", sa.String(length=40), nullable=False),
                    sa.Column("detail", sa.String(length=500), nullable=False),
                    sa.Column("running_version", sa.String(length=40), nullable=False),
                    sa.Column("updated_ms", sa.BigInteger(), nullable=False),
                    sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.rollout_id"]),
                    sa.PrimaryKeyConstraint("rollout_id", "machine_id"))
    op.create_index("machine_updates_by_rollout", "machine_updates", ["rollout_id", "step"])
    op.create_index("machine_updates_by_machine", "machine_updates", ["machine_id"])


def downgrade() -> None:
    op.drop_index("machine_updates_by_machine", table_name="machine_updates")
    op.drop_index("machine_updates_by_rollout", table_name="machine_updates")
    op.drop_table("machine_updates")
    op.drop_table("rollouts")
    op.drop_table("releases")
