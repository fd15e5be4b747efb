"""Initial schema: subscribers, issues, the deliveries ledger and settings.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _when(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "subscribers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        _when("created_at", nullable=False),
        _when("confirmed_at"),
        _when("unsubscribed_at"),
        sa.PrimaryKeyConstraint("id", name="pk_subscribers"),
        sa.UniqueConstraint("email", name="uq_subscribers_email"),
        sa.CheckConstraint(
            "status IN ('pending', 'active', 'unsubscribed', 'bounced', 'complained')",
            name="ck_subscribers_status",
        ),
        sa.CheckConstraint("source IN ('cli', 'import', 'form')", name="ck_subscribers_source"),
    )
    op.create_index("ix_subscribers_status", "subscribers", ["status"])

    op.create_table(
        "issues",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest_path", sa.Text(), nullable=False),
        sa.Column("digest_name", sa.String(255), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        _when("created_at", nullable=False),
        _when("started_at"),
        _when("finished_at"),
        sa.Column("recipient_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("sent_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed_count", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_issues"),
        sa.CheckConstraint("status IN ('sending', 'sent', 'cancelled')", name="ck_issues_status"),
    )
    op.create_index("ix_issues_digest_name", "issues", ["digest_name"])
    op.create_index("ix_issues_content_hash", "issues", ["content_hash"])

    op.create_table(
        "deliveries",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("issue_id", sa.Integer(), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_answer", sa.Text(), nullable=True),
        sa.Column("message_id", sa.String(255), nullable=True),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        _when("claimed_at"),
        _when("next_attempt_at"),
        _when("sent_at"),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.ForeignKeyConstraint(
            ["issue_id"], ["issues.id"], name="fk_deliveries_issue_id_issues", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name="fk_deliveries_subscriber_id_subscribers",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "issue_id", "subscriber_id", name="uq_deliveries_issue_id_subscriber_id"
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'sending', 'sent', 'failed', 'bounced', 'skipped')",
            name="ck_deliveries_status",
        ),
    )
    op.create_index("ix_deliveries_issue_id_status", "deliveries", ["issue_id", "status"])
    op.create_index("ix_deliveries_subscriber_id", "deliveries", ["subscriber_id"])

    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_settings"),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("deliveries")
    op.drop_table("issues")
    op.drop_table("subscribers")
