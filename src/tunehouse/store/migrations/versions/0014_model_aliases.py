"""model aliases and migration imports

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 10:40:00

Model aliases per organization (`tunehouse aliases`, /v1/organization/model_aliases) and the
record of what `tunehouse migrate openai` imported, keyed by the OpenAI ids (so a second run
creates nothing twice).
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_aliases",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("organization_id", "name", name="uq_model_aliases_org_name"),
    )
    op.create_index("ix_model_aliases_organization_id", "model_aliases", ["organization_id"])
    op.create_table(
        "migration_imports",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("source_id", sa.String(length=512), nullable=False),
        sa.Column("local_id", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint(
            "organization_id", "source", "kind", "source_id", name="uq_migration_imports_key"
        ),
    )
    op.create_index("ix_migration_imports_organization_id", "migration_imports", ["organization_id"])


def downgrade() -> None:
    op.drop_index("ix_migration_imports_organization_id", table_name="migration_imports")
    op.drop_table("migration_imports")
    op.drop_index("ix_model_aliases_organization_id", table_name="model_aliases")
    op.drop_table("model_aliases")
