"""Each machine's heartbeat is judged against the alarm rules when it arrives, and whether any condition holds
is kept with the machine (``machines.alarm_hint``), so the alarm round every few seconds reads only the machines
that may need a change (a condition, an open alarm, silence) instead of the whole fleet. NULL means "not known
yet" and such a machine is read as before.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("machines", sa.Column("alarm_hint", sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column("machines", "alarm_hint")
