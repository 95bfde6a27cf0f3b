"""per-project retention and immutable tag patterns

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('keep_newest', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('keep_pattern', sa.String(length=255), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('immutable_pattern', sa.String(length=255), nullable=False,
                                      server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('immutable_pattern')
        batch_op.drop_column('keep_pattern')
        batch_op.drop_column('keep_newest')
