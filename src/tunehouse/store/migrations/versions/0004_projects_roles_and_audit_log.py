"""projects roles and audit log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 08:30:00

Every organization gets a default project; its existing files, jobs and checkpoints move into it.
Existing keys become organization admin keys (project_id NULL, role owner): before projects they
saw the whole organization, and they keep doing so.
"""

import secrets
import string
import time

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_OWNED = ("files", "fine_tuning_jobs", "fine_tuning_checkpoints")


def _project_id() -> str:
    alphabet = string.ascii_letters + string.digits
    return "proj_" + "".join(secrets.choice(alphabet) for _ in range(24))


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("archived_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("organization_id", "name", name="uq_projects_org_name"),
    )
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_projects_organization_id"), ["organization_id"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("project_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=False, server_default="owner"))
        batch_op.add_column(sa.Column("last_used_at", sa.BigInteger(), nullable=True))
        batch_op.create_index(batch_op.f("ix_api_keys_project_id"), ["project_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_api_keys_project_id_projects", "projects", ["project_id"], ["id"], ondelete="CASCADE"
        )

    for table in _OWNED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("project_id", sa.String(length=64), nullable=True))
            batch_op.create_index(batch_op.f(f"ix_{table}_project_id"), ["project_id"], unique=False)
            batch_op.create_foreign_key(
                f"fk_{table}_project_id_projects", "projects", ["project_id"], ["id"], ondelete="CASCADE"
            )

    op.create_table(
        "checkpoint_permissions",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["checkpoint_id"], ["fine_tuning_checkpoints.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("checkpoint_id", "project_id", name="uq_checkpoint_permissions_ckpt_project"),
    )
    with op.batch_alter_table("checkpoint_permissions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_checkpoint_permissions_organization_id"), ["organization_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_checkpoint_permissions_checkpoint_id"), ["checkpoint_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_checkpoint_permissions_project_id"), ["project_id"], unique=False
        )

    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("organization_id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("actor_key_id", sa.String(length=64), nullable=True),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("object_id", sa.String(length=512), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_organization_id"), ["organization_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_action"), ["action"], unique=False)

    # Data: a default project per existing organization, owning what the organization had.
    conn = op.get_bind()
    orgs = sa.table("organizations", sa.column("id", sa.String))
    projects = sa.table(
        "projects",
        sa.column("id", sa.String),
        sa.column("organization_id", sa.String),
        sa.column("name", sa.String),
        sa.column("status", sa.String),
        sa.column("is_default", sa.Boolean),
        sa.column("created_at", sa.BigInteger),
    )
    for (org_id,) in conn.execute(sa.select(orgs.c.id)).all():
        project_id = _project_id()
        conn.execute(
            projects.insert().values(
                id=project_id,
                organization_id=org_id,
                name="Default project",
                status="active",
                is_default=True,
                created_at=int(time.time()),
            )
        )
        for table in _OWNED:
            t = sa.table(table, sa.column("organization_id", sa.String), sa.column("project_id", sa.String))
            conn.execute(t.update().where(t.c.organization_id == org_id).values(project_id=project_id))


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_action"))
        batch_op.drop_index(batch_op.f("ix_audit_log_organization_id"))
    op.drop_table("audit_log")
    with op.batch_alter_table("checkpoint_permissions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoint_permissions_project_id"))
        batch_op.drop_index(batch_op.f("ix_checkpoint_permissions_checkpoint_id"))
        batch_op.drop_index(batch_op.f("ix_checkpoint_permissions_organization_id"))
    op.drop_table("checkpoint_permissions")
    for table in reversed(_OWNED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_project_id_projects", type_="foreignkey")
            batch_op.drop_index(batch_op.f(f"ix_{table}_project_id"))
            batch_op.drop_column("project_id")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint("fk_api_keys_project_id_projects", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_api_keys_project_id"))
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("role")
        batch_op.drop_column("project_id")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_projects_organization_id"))
    op.drop_table("projects")
