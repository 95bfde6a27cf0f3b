"""image scans: the vulnerability report and SBOM of each pushed manifest

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'image_scans',
        sa.Column('digest', sa.String(length=100), primary_key=True),
        sa.Column('repository', sa.String(length=255), nullable=False, server_default=''),
        sa.Column('scanned', sa.DateTime(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False, server_default='done'),
        sa.Column('error', sa.String(length=500), nullable=False, server_default=''),
        sa.Column('fixable', sa.Integer(), nullable=False, server_default='0'),
        sa.Column('report', sa.JSON(), nullable=False),
        sa.Column('sbom', sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('image_scans')
