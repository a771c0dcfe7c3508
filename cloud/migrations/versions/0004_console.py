"""The operators' console: passwords, second factors, lockout and disabling of operators; their console sessions;
operator alarms with a life (open, acknowledged, resolved) and notifications; machines' sites and
samples of their heartbeats for charts; gifts marked picked up; indexes for the
console's searches, reports and audit log. Operators made only for the console have no bearer token.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OPERATOR_COLUMNS = [
    sa.Column("display_name", sa.String(length=100), server_default="", nullable=False),
    sa.Column("password_hash", sa.Text(), nullable=True),
    sa.Column("totp_secret_enc", sa.Text(), nullable=True),
    sa.Column("totp_pending_enc", sa.Text(), nullable=True),
    sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
    sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False),
    sa.Column("locked_until_ms", sa.BigInteger(), nullable=True),
    sa.Column("disabled_ms", sa.BigInteger(), nullable=True),
    sa.Column("password_changed_ms", sa.BigInteger(), nullable=True),
]


def upgrade() -> None:
    with op.batch_alter_table("operators") as b:
        b.alter_column("token_hash", existing_type=sa.String(length=64), nullable=True)
        for column in OPERATOR_COLUMNS:
            b.add_column(column)
    with op.batch_alter_table("machines") as b:
        b.add_column(sa.Column("site", sa.String(length=100), server_default="", nullable=False))
    op.create_table("operator_sessions",
                    sa.Column("session_hash", sa.String(length=64), nullable=False),
                    sa.Column("operator_id", sa.String(length=64), nullable=False),
                    sa.Column("created_ms", sa.BigInteger(), nullable=False),
                    sa.Column("last_seen_ms", sa.BigInteger(), nullable=False),
                    sa.Column("expires_ms", sa.BigInteger(), nullable=False),
                    sa.Column("revoked_ms", sa.BigInteger(), nullable=True),
                    sa.Column("client_ip", sa.String(length=64), nullable=False),
                    sa.Column("user_agent", sa.String(length=200), nullable=False),
                    sa.ForeignKeyConstraint(["operator_id"], ["operators.operator_id"]),
                    sa.PrimaryKeyConstraint("session_hash"))
    op.create_index("operator_sessions_by_operator", "operator_sessions", ["operator_id", "revoked_ms"], unique=False)
    op.create_table("operator_alarms",
                    sa.Column("alarm_id", sa.Integer(), autoincrement=True, nullable=False),
                    sa.Column("rule", sa.String(length=32), nullable=False),
                    sa.Column("machine_id", sa.String(length=64), nullable=True),
                    sa.Column("open_key", sa.String(length=160), nullable=True),
                    sa.Column("severity", sa.String(length=8), nullable=False),
                    sa.Column("state", sa.String(length=16), nullable=False),
                    sa.Column("detail", sa.JSON(), nullable=False),
                    sa.Column("opened_ms", sa.BigInteger(), nullable=False),
                    sa.Column("last_ms", sa.BigInteger(), nullable=False),
                    sa.Column("acked_ms", sa.BigInteger(), nullable=True),
                    sa.Column("acked_by", sa.String(length=64), nullable=True),
                    sa.Column("ack_note", sa.String(length=500), nullable=True),
                    sa.Column("resolved_ms", sa.BigInteger(), nullable=True),
                    sa.Column("resolved_by", sa.String(length=64), nullable=True),
                    sa.Column("resolve_note", sa.String(length=500), nullable=True),
                    sa.Column("emailed_ms", sa.BigInteger(), nullable=True),
                    sa.Column("webhooked_ms", sa.BigInteger(), nullable=True),
                    sa.Column("notify_attempts", sa.Integer(), server_default="0", nullable=False),
                    sa.Column("notify_error", sa.String(length=300), nullable=True),
                    sa.PrimaryKeyConstraint("alarm_id"),
                    sa.UniqueConstraint("open_key"))
    op.create_index("operator_alarms_by_state", "operator_alarms", ["state", "opened_ms"], unique=False)
    op.create_index("operator_alarms_by_machine", "operator_alarms", ["machine_id", "opened_ms"], unique=False)
    op.create_table("machine_samples",
                    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
                    sa.Column("machine_id", sa.String(length=64), nullable=False),
                    sa.Column("at_ms", sa.BigInteger(), nullable=False),
                    sa.Column("temp_c", sa.Float(), nullable=True),
                    sa.Column("tds_ppm", sa.Integer(), nullable=True),
                    sa.Column("outbox_depth", sa.Integer(), nullable=False),
                    sa.Column("dead_letters", sa.Integer(), nullable=False),
                    sa.PrimaryKeyConstraint("id"))
    op.create_index("samples_by_machine", "machine_samples", ["machine_id", "at_ms"], unique=False)
    with op.batch_alter_table("redemptions") as b:
        b.add_column(sa.Column("picked_up_ms", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("picked_up_by", sa.String(length=64), nullable=True))
    op.create_index("sessions_by_time", "sessions", ["created_ms"], unique=False)
    op.create_index("sessions_by_user_time", "sessions", ["user_id", "created_ms"], unique=False)
    op.create_index("balance_by_session", "balance_entries", ["session_id"], unique=False)
    op.create_index("balance_refunds_by_session", "balance_entries", ["session_id"], unique=False,
                    postgresql_where=sa.text("kind = 'refund'"), sqlite_where=sa.text("kind = 'refund'"))
    op.create_index("sessions_settled_by_time", "sessions", ["created_ms"], unique=False,
                    postgresql_include=["machine_id", "fee_fen", "volume_ml"],
                    postgresql_where=sa.text("state = 'ended'"), sqlite_where=sa.text("state = 'ended'"))
    op.create_index("users_by_created", "users", ["created_ms"], unique=False)
    op.create_index("audit_by_time", "audit_log", ["at_ms"], unique=False)
    op.create_index("audit_by_operator", "audit_log", ["operator_id", "at_ms"], unique=False)


def downgrade() -> None:
    op.drop_index("audit_by_operator", table_name="audit_log")
    op.drop_index("audit_by_time", table_name="audit_log")
    op.drop_index("users_by_created", table_name="users")
    op.drop_index("sessions_settled_by_time", table_name="sessions")
    op.drop_index("balance_refunds_by_session", table_name="balance_entries")
    op.drop_index("balance_by_session", table_name="balance_entries")
    op.drop_index("sessions_by_user_time", table_name="sessions")
    op.drop_index("sessions_by_time", table_name="sessions")
    with op.batch_alter_table("redemptions") as b:
        b.drop_column("picked_up_by")
        b.drop_column("picked_up_ms")
    op.drop_table("machine_samples")
    op.drop_table("operator_alarms")
    op.drop_table("operator_sessions")
    with op.batch_alter_table("machines") as b:
        b.drop_column("site")
    with op.batch_alter_table("operators") as b:
        for column in reversed(OPERATOR_COLUMNS):
            b.drop_column(column.name)
        b.alter_column("token_hash", existing_type=sa.String(length=64), nullable=False)
