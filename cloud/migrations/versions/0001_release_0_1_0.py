"""The schema of release 0.1.0 (its ``schema_info`` version 3): every table as that release created them.

A database that release made has these tables but no ``alembic_version``; :meth:`cloud.db.Database.create_all`
stamps it at this revision and upgrades it from here.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # parents before the tables that refer to them
    for create in (
            _audit_log, _gifts, _machine_events, _machines, _nonces, _operators, _rental_records, _reports,
            _schema_info, _sms_codes, _users, _balance_entries, _balance_refunds, _commands, _consents,
            _enrolment_tokens, _id_photos, _identities, _points_entries, _redemptions, _sessions,
            _topup_orders, _user_tokens, _bills):
        create()


def _audit_log() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=128), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('at_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def _gifts() -> None:
    op.create_table('gifts',
    sa.Column('gift_id', sa.String(length=40), nullable=False),
    sa.Column('name_zh', sa.String(length=100), nullable=False),
    sa.Column('name_en', sa.String(length=100), nullable=False),
    sa.Column('points_cost', sa.Integer(), nullable=False),
    sa.Column('stock', sa.Integer(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('gift_id')
    )


def _machine_events() -> None:
    op.create_table('machine_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('received_ms', sa.BigInteger(), nullable=False),
    sa.Column('occurred_ms', sa.BigInteger(), nullable=False),
    sa.Column('alarm', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('events_by_machine', 'machine_events', ['machine_id', 'received_ms'], unique=False)


def _machines() -> None:
    op.create_table('machines',
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('secret_enc', sa.Text(), nullable=True),
    sa.Column('location', sa.String(length=200), nullable=False),
    sa.Column('price_fen_per_l', sa.Integer(), nullable=False),
    sa.Column('max_volume_ml', sa.Integer(), nullable=False),
    sa.Column('max_duration_ms', sa.Integer(), nullable=False),
    sa.Column('max_idle_ms', sa.Integer(), nullable=False),
    sa.Column('max_credit_fen', sa.Integer(), nullable=False),
    sa.Column('min_dispense_ml', sa.Integer(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('last_seen_ms', sa.BigInteger(), nullable=True),
    sa.Column('heartbeat', sa.JSON(), nullable=True),
    sa.Column('open_session_id', sa.String(length=64), nullable=True),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('hotline', sa.String(length=40), nullable=False),
    sa.PrimaryKeyConstraint('machine_id')
    )


def _nonces() -> None:
    op.create_table('nonces',
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('seen_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('machine_id', 'nonce')
    )
    op.create_index(op.f('ix_nonces_seen_ms'), 'nonces', ['seen_ms'], unique=False)


def _operators() -> None:
    op.create_table('operators',
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=True),
    sa.Column('revoked_ms', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('operator_id'),
    sa.UniqueConstraint('token_hash')
    )


def _rental_records() -> None:
    op.create_table('rental_records',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.String(length=40), nullable=False),
    sa.Column('ended_at', sa.String(length=40), nullable=False),
    sa.Column('started_ms', sa.BigInteger(), nullable=False),
    sa.Column('record', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('session_id')
    )
    op.create_index('records_by_machine', 'rental_records', ['machine_id', 'started_ms'], unique=False)
    op.create_index('records_by_user', 'rental_records', ['user_id', 'started_ms'], unique=False)


def _reports() -> None:
    op.create_table('reports',
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('body_sha256', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.String(length=300), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('received_ms', sa.BigInteger(), nullable=False),
    sa.Column('occurred_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('machine_id', 'event_id')
    )
    op.create_index('reports_by_kind', 'reports', ['machine_id', 'kind', 'received_ms'], unique=False)


def _schema_info() -> None:
    op.create_table('schema_info',
    sa.Column('version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('version')
    )


def _sms_codes() -> None:
    op.create_table('sms_codes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('phone', sa.String(length=20), nullable=False),
    sa.Column('code_mac', sa.String(length=64), nullable=False),
    sa.Column('client_ip', sa.String(length=64), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('used_ms', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('sms_by_ip', 'sms_codes', ['client_ip', 'created_ms'], unique=False)
    op.create_index('sms_by_phone', 'sms_codes', ['phone', 'created_ms'], unique=False)


def _users() -> None:
    op.create_table('users',
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('phone', sa.String(length=20), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('registered', sa.Boolean(), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('deleted_ms', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('user_id'),
    sa.UniqueConstraint('phone')
    )


def _balance_entries() -> None:
    op.create_table('balance_entries',
    sa.Column('entry_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=True),
    sa.Column('note', sa.String(length=200), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('entry_id')
    )
    op.create_index('balance_by_user', 'balance_entries', ['user_id'], unique=False)


def _balance_refunds() -> None:
    op.create_table('balance_refunds',
    sa.Column('refund_id', sa.String(length=40), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('orders', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('paid_ms', sa.BigInteger(), nullable=True),
    sa.Column('paid_by', sa.String(length=64), nullable=True),
    sa.Column('reference', sa.String(length=100), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('refund_id')
    )
    op.create_index('balance_refunds_state', 'balance_refunds', ['state', 'created_ms'], unique=False)
    op.create_index(op.f('ix_balance_refunds_user_id'), 'balance_refunds', ['user_id'], unique=False)


def _commands() -> None:
    op.create_table('commands',
    sa.Column('command_id', sa.String(length=64), nullable=False),
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.Column('delivered_ms', sa.BigInteger(), nullable=True),
    sa.Column('acked_ms', sa.BigInteger(), nullable=True),
    sa.Column('ack_ok', sa.Boolean(), nullable=True),
    sa.Column('ack_reason', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.machine_id'], ),
    sa.PrimaryKeyConstraint('command_id')
    )
    op.create_index('commands_pending', 'commands', ['machine_id', 'acked_ms', 'expires_ms'], unique=False)


def _consents() -> None:
    op.create_table('consents',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('version', sa.String(length=16), nullable=False),
    sa.Column('granted_ms', sa.BigInteger(), nullable=False),
    sa.Column('withdrawn_ms', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_consents_user_id'), 'consents', ['user_id'], unique=False)


def _enrolment_tokens() -> None:
    op.create_table('enrolment_tokens',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.Column('used_ms', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.machine_id'], ),
    sa.PrimaryKeyConstraint('token_hash')
    )


def _id_photos() -> None:
    op.create_table('id_photos',
    sa.Column('photo_id', sa.String(length=40), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('width_px', sa.Integer(), nullable=False),
    sa.Column('height_px', sa.Integer(), nullable=False),
    sa.Column('stored_bytes', sa.Integer(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('deleted_ms', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('photo_id')
    )
    op.create_index(op.f('ix_id_photos_user_id'), 'id_photos', ['user_id'], unique=False)


def _identities() -> None:
    op.create_table('identities',
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('doc_type', sa.String(length=20), nullable=False),
    sa.Column('number_enc', sa.Text(), nullable=False),
    sa.Column('number_masked', sa.String(length=40), nullable=False),
    sa.Column('number_mac', sa.String(length=64), nullable=False),
    sa.Column('name_enc', sa.Text(), nullable=False),
    sa.Column('name_masked', sa.String(length=80), nullable=False),
    sa.Column('photo_id', sa.String(length=40), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('verifier', sa.String(length=64), nullable=False),
    sa.Column('reject_reason', sa.String(length=200), nullable=True),
    sa.Column('submitted_ms', sa.BigInteger(), nullable=False),
    sa.Column('decided_ms', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('user_id'),
    sa.UniqueConstraint('number_mac')
    )
    op.create_index('identities_by_state', 'identities', ['state', 'submitted_ms'], unique=False)


def _points_entries() -> None:
    op.create_table('points_entries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('delta', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=64), nullable=True),
    sa.Column('note', sa.String(length=200), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_points_entries_user_id'), 'points_entries', ['user_id'], unique=False)


def _redemptions() -> None:
    op.create_table('redemptions',
    sa.Column('redemption_id', sa.String(length=40), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('gift_id', sa.String(length=40), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.Column('pickup_code', sa.String(length=16), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['gift_id'], ['gifts.gift_id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('redemption_id'),
    sa.UniqueConstraint('user_id', 'request_id', name='redemption_once')
    )


def _sessions() -> None:
    op.create_table('sessions',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('price_fen_per_l', sa.Integer(), nullable=False),
    sa.Column('credit_limit_fen', sa.BigInteger(), nullable=False),
    sa.Column('command_id', sa.String(length=64), nullable=False),
    sa.Column('presence_hash', sa.String(length=64), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('deadline_ms', sa.BigInteger(), nullable=False),
    sa.Column('min_dispense_ml', sa.Integer(), nullable=False),
    sa.Column('max_volume_ml', sa.Integer(), nullable=False),
    sa.Column('acked_ms', sa.BigInteger(), nullable=True),
    sa.Column('ended_ms', sa.BigInteger(), nullable=True),
    sa.Column('end_reason', sa.String(length=32), nullable=True),
    sa.Column('void_reason', sa.String(length=200), nullable=True),
    sa.Column('progress', sa.JSON(), nullable=True),
    sa.Column('fee_fen', sa.BigInteger(), nullable=True),
    sa.Column('volume_ml', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['machine_id'], ['machines.machine_id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('session_id'),
    sa.UniqueConstraint('presence_hash')
    )
    op.create_index('sessions_by_machine', 'sessions', ['machine_id', 'created_ms'], unique=False)
    op.create_index('sessions_by_state', 'sessions', ['state', 'deadline_ms'], unique=False)
    op.create_index('sessions_by_user', 'sessions', ['user_id', 'state'], unique=False)


def _topup_orders() -> None:
    op.create_table('topup_orders',
    sa.Column('order_id', sa.String(length=40), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('provider', sa.String(length=32), nullable=False),
    sa.Column('provider_txn_id', sa.String(length=64), nullable=True),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.Column('paid_ms', sa.BigInteger(), nullable=True),
    sa.Column('closed_ms', sa.BigInteger(), nullable=True),
    sa.Column('notifications', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('order_id')
    )
    op.create_index(op.f('ix_topup_orders_user_id'), 'topup_orders', ['user_id'], unique=False)
    op.create_index('orders_pending', 'topup_orders', ['state', 'expires_ms'], unique=False)


def _user_tokens() -> None:
    op.create_table('user_tokens',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ),
    sa.PrimaryKeyConstraint('token_hash')
    )


def _bills() -> None:
    op.create_table('bills',
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('machine_id', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.String(length=40), nullable=False),
    sa.Column('ended_at', sa.String(length=40), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('volume_ml', sa.Integer(), nullable=False),
    sa.Column('avg_flow_ml_per_min', sa.Integer(), nullable=False),
    sa.Column('amount_fen', sa.BigInteger(), nullable=False),
    sa.Column('price_fen_per_l', sa.Integer(), nullable=False),
    sa.Column('water_quality', sa.JSON(), nullable=False),
    sa.Column('points', sa.Integer(), nullable=False),
    sa.Column('end_reason', sa.String(length=32), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['session_id'], ['sessions.session_id'], ),
    sa.PrimaryKeyConstraint('session_id')
    )
    op.create_index(op.f('ix_bills_user_id'), 'bills', ['user_id'], unique=False)


def downgrade() -> None:
    raise NotImplementedError("the first schema has no older one to go back to")
