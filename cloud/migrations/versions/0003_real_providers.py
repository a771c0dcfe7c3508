"""Real payment and SMS providers: refunds through the provider to the payment they came from, payers' ids at a
provider (WeChat's openid), daily reconciliation reports, operator alarms that are not a machine's, and the
provider's request id for each login code.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("alarms",
                    sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
                    sa.Column("source", sa.String(length=32), nullable=False),
                    sa.Column("kind", sa.String(length=64), nullable=False),
                    sa.Column("detail", sa.JSON(), nullable=False),
                    sa.Column("created_ms", sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint("id"))
    op.create_index("alarms_by_time", "alarms", ["created_ms"], unique=False)
    op.create_table("reconciliations",
                    sa.Column("provider", sa.String(length=32), nullable=False),
                    sa.Column("bill_date", sa.String(length=10), nullable=False),
                    sa.Column("state", sa.String(length=16), nullable=False),
                    sa.Column("report", sa.JSON(), nullable=False),
                    sa.Column("checked_ms", sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint("provider", "bill_date"))
    op.create_table("payer_accounts",
                    sa.Column("user_id", sa.String(length=64), nullable=False),
                    sa.Column("provider", sa.String(length=32), nullable=False),
                    sa.Column("payer_id", sa.String(length=128), nullable=False),
                    sa.Column("created_ms", sa.BigInteger(), nullable=False),
                    sa.ForeignKeyConstraint(["user_id"], ["users.user_id"]),
                    sa.PrimaryKeyConstraint("user_id", "provider"))
    op.create_table("provider_refunds",
                    sa.Column("refund_id", sa.String(length=40), nullable=False),
                    sa.Column("order_id", sa.String(length=40), nullable=False),
                    sa.Column("user_id", sa.String(length=64), nullable=False),
                    sa.Column("provider", sa.String(length=32), nullable=False),
                    sa.Column("amount_fen", sa.BigInteger(), nullable=False),
                    sa.Column("origin", sa.String(length=16), nullable=False),
                    sa.Column("reason", sa.String(length=200), nullable=False),
                    sa.Column("state", sa.String(length=16), nullable=False),
                    sa.Column("provider_refund_id", sa.String(length=64), nullable=True),
                    sa.Column("requested_by", sa.String(length=64), nullable=False),
                    sa.Column("created_ms", sa.BigInteger(), nullable=False),
                    sa.Column("updated_ms", sa.BigInteger(), nullable=False),
                    sa.Column("done_ms", sa.BigInteger(), nullable=True),
                    sa.Column("attempts", sa.Integer(), nullable=False),
                    sa.Column("last_error", sa.String(length=200), nullable=True),
                    sa.ForeignKeyConstraint(["order_id"], ["topup_orders.order_id"]),
                    sa.ForeignKeyConstraint(["user_id"], ["users.user_id"]),
                    sa.PrimaryKeyConstraint("refund_id"))
    op.create_index(op.f("ix_provider_refunds_order_id"), "provider_refunds", ["order_id"], unique=False)
    op.create_index(op.f("ix_provider_refunds_user_id"), "provider_refunds", ["user_id"], unique=False)
    op.create_index("provider_refunds_state", "provider_refunds", ["state", "updated_ms"], unique=False)
    with op.batch_alter_table("sms_codes") as b:
        b.add_column(sa.Column("provider", sa.String(length=32), nullable=True))
        b.add_column(sa.Column("provider_request_id", sa.String(length=80), nullable=True))
        b.add_column(sa.Column("send_error", sa.String(length=200), nullable=True))
    with op.batch_alter_table("topup_orders") as b:
        b.add_column(sa.Column("channel", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("refunded_fen", sa.BigInteger(), server_default="0", nullable=False))
    op.create_index("orders_paid", "topup_orders", ["state", "paid_ms"], unique=False)


def downgrade() -> None:
    op.drop_index("orders_paid", table_name="topup_orders")
    with op.batch_alter_table("topup_orders") as b:
        b.drop_column("refunded_fen")
        b.drop_column("channel")
    with op.batch_alter_table("sms_codes") as b:
        b.drop_column("send_error")
        b.drop_column("provider_request_id")
        b.drop_column("provider")
    op.drop_table("provider_refunds")
    op.drop_table("payer_accounts")
    op.drop_table("reconciliations")
    op.drop_table("alarms")
