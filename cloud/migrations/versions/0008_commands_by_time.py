"""Commands are kept for ``command_retention_days`` (TAPSHARE_COMMAND_RETENTION_DAYS, default 7) and then deleted
by the cloud's minute prune: an index on their creation time lets that delete find the old ones without reading
the whole table.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("commands_by_time", "commands", ["created_ms"])


def downgrade() -> None:
    op.drop_index("commands_by_time", table_name="commands")
