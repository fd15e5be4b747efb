"""Scheduled sends: what each schedule sends and how its last run went.

APScheduler keeps its own job rows (``apscheduler_jobs``, created by its job store);
a job only carries a schedule id, so the job never holds a path or any state of ours.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("digest_path", sa.Text(), nullable=True),
        sa.Column("directory", sa.Text(), nullable=True),
        sa.Column("cron", sa.String(120), nullable=True),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_issue_id", sa.Integer(), nullable=True),
        sa.Column("last_result", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_schedules"),
        sa.CheckConstraint("kind IN ('once', 'cron')", name="ck_schedules_kind"),
        sa.CheckConstraint(
            "status IN ('scheduled', 'running', 'done', 'missed', 'failed', 'cancelled')",
            name="ck_schedules_status",
        ),
    )
    op.create_index("ix_schedules_status", "schedules", ["status"])


def downgrade() -> None:
    op.drop_table("schedules")
