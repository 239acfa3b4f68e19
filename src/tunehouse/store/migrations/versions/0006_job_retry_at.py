"""job retry_at

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 11:20:00

A job handed back to the queue after its process failed waits until `retry_at` before a worker
may claim it again (exponential backoff), so a passing outage does not use up its attempts.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.drop_column("retry_at")
