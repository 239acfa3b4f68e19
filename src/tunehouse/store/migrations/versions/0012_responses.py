"""stored responses

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 10:30:00

Responses of /v1/responses kept for retrieve, input_items, previous_response_id and background runs.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_responses",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("input_items", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_stored_responses_organization_id", "stored_responses", ["organization_id"])
    op.create_index("ix_stored_responses_project_id", "stored_responses", ["project_id"])


def downgrade() -> None:
    op.drop_index("ix_stored_responses_project_id", table_name="stored_responses")
    op.drop_index("ix_stored_responses_organization_id", table_name="stored_responses")
    op.drop_table("stored_responses")
