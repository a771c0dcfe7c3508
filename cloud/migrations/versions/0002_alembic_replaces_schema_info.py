"""Alembic's ``alembic_version`` now tells the schema's version: the ``schema_info`` table of release 0.1.0
goes.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("schema_info")


def downgrade() -> None:
    op.create_table("schema_info", sa.Column("version", sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint("version"))
    op.execute("INSERT INTO schema_info (version) VALUES (3)")
