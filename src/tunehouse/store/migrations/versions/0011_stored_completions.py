"""stored chat completions

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 09:00:00

Chat completions made with `store: true` (OpenAI's stored chat completions endpoints).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_completions",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    op.create_index("ix_stored_completions_organization_id", "stored_completions", ["organization_id"])
    op.create_index("ix_stored_completions_project_id", "stored_completions", ["project_id"])


def downgrade() -> None:
    op.drop_index("ix_stored_completions_project_id", table_name="stored_completions")
    op.drop_index("ix_stored_completions_organization_id", table_name="stored_completions")
    op.drop_table("stored_completions")
