"""job kind

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 15:00:00

Every row of the jobs table has a kind (jobs/kinds.py) that says which code runs its phases; the
jobs that exist are fine-tuning jobs.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=32), nullable=False, server_default="fine_tuning")
        )


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs", schema=None) as batch_op:
        batch_op.drop_column("kind")
