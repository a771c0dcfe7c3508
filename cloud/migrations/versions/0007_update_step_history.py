"""Fleet updates: every step a machine reported, and those the cloud recorded for it, in the order they arrived
(``machine_update_steps``), beside ``machine_updates`` which keeps only the current step. A report that arrives
late (a heartbeat marked the machine healthy before its own ``switched`` report came) is kept here although it
does not move the current step; repeats of one step are one row with a count. At most
``cloud.releases.service.HISTORY_ROWS`` rows per machine and rollout.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("machine_update_steps",
                    sa.Column("step_id", sa.Integer(), autoincrement=True, nullable=False),
                    sa.Column("rollout_id", sa.Integer(), nullable=False),
                    sa.Column("machine_id", sa.String(length=64), nullable=False),
                    sa.Column("version", sa.String(length=40), nullable=False),
                    sa.Column("step", sa.String(length=16), nullable=False),
                    sa.Column("reason", sa.String(length=40), nullable=False),
                    sa.Column("detail", sa.String(length=500), nullable=False),
                    sa.Column("running_version", sa.String(length=40), nullable=False),
                    sa.Column("source", sa.String(length=16), nullable=False),
                    sa.Column("applied", sa.Boolean(), nullable=False),
                    sa.Column("repeats", sa.Integer(), nullable=False),
                    sa.Column("at_ms", sa.BigInteger(), nullable=False),
                    sa.Column("last_at_ms", sa.BigInteger(), nullable=False),
                    sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.rollout_id"]),
                    sa.PrimaryKeyConstraint("step_id"))
    op.create_index("machine_update_steps_by_machine", "machine_update_steps", ["rollout_id", "machine_id", "at_ms"])


def downgrade() -> None:
    op.drop_index("machine_update_steps_by_machine", table_name="machine_update_steps")
    op.drop_table("machine_update_steps")
