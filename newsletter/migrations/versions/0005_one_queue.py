"""One queue for every message: one-off mail becomes deliveries without an issue.

Confirmations used to wait in ``outbound_mail`` as finished messages and go out through
an engine of their own. Now a delivery either belongs to an issue (its message is built
from the issue's template) or is one-off mail of a ``kind`` (``issue_id`` NULL; the
worker builds a "confirm" message when it sends it), and one engine sends both. Rows of
``outbound_mail`` move over when their subscriber still exists (a queued one gets a fresh
link when it goes out); going back down drops one-off mail.

Schedules record which sender runs them (``claimed_by``), so a worker takes over a run
only when that sender is dead. APScheduler's own job table is no longer used: the
``schedules`` table is the one record of what runs when.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("issue_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "INSERT INTO deliveries (issue_id, subscriber_id, email, status, attempts, last_answer,"
        " next_attempt_at, sent_at, created_at, kind)"
        " SELECT NULL, s.id, o.recipient, o.status, o.attempts, o.last_answer,"
        " o.next_attempt_at, o.sent_at, o.created_at, 'confirm'"
        " FROM outbound_mail o JOIN subscribers s ON s.email = o.recipient"
    )
    op.drop_table("outbound_mail")
    with op.batch_alter_table("schedules") as batch:
        batch.add_column(sa.Column("claimed_by", sa.Text(), nullable=True))
    op.execute("DROP TABLE IF EXISTS apscheduler_jobs")


def downgrade() -> None:
    op.create_table(
        "outbound_mail",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_answer", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbound_mail"),
        sa.CheckConstraint(
            "status IN ('queued', 'sent', 'failed')", name="ck_outbound_mail_status"
        ),
    )
    op.create_index(
        "ix_outbound_mail_status_next_attempt_at", "outbound_mail", ["status", "next_attempt_at"]
    )
    op.create_index("ix_outbound_mail_recipient", "outbound_mail", ["recipient"])
    op.execute("DELETE FROM deliveries WHERE issue_id IS NULL")
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("claimed_by")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("created_at")
        batch.drop_column("kind")
        batch.alter_column("issue_id", existing_type=sa.Integer(), nullable=False)
