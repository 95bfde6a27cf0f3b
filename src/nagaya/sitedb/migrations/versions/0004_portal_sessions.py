"""portal sessions and login failures in the database (several server processes share them)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'portal_sessions',
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('user', sa.String(length=64), nullable=False),
        sa.Column('groups', sa.JSON(), nullable=False),
        sa.Column('is_admin', sa.Boolean(), nullable=False),
        sa.Column('csrf', sa.String(length=64), nullable=False),
        sa.Column('created', sa.Float(), nullable=False),
        sa.Column('seen', sa.Float(), nullable=False),
        sa.Column('flash', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id_hash'),
    )
    op.create_index('ix_portal_sessions_seen', 'portal_sessions', ['seen'])
    op.create_table(
        'login_failures',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('username', sa.String(length=128), nullable=False),
        sa.Column('address', sa.String(length=64), nullable=False),
        sa.Column('time', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_login_failures_who', 'login_failures', ['username', 'address', 'time'])


def downgrade() -> None:
    op.drop_index('ix_login_failures_who', table_name='login_failures')
    op.drop_table('login_failures')
    op.drop_index('ix_portal_sessions_seen', table_name='portal_sessions')
    op.drop_table('portal_sessions')
