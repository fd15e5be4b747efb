"""Tables for the signup web app: the per-address rate limit and the one-off mail queue.

``signup_attempts`` holds one row per form submission, keyed by address or client IP.
``outbound_mail`` holds confirmation messages queued in the same transaction as the
pending subscriber, so a crash between the two never loses a confirmation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "signup_attempts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("key", sa.String(320), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_signup_attempts"),
    )
    op.create_index(
        "ix_signup_attempts_key_attempted_at", "signup_attempts", ["key", "attempted_at"]
    )

    op.create_table(
        "outbound_mail",
        sa.Column("id", BIG_ID, nullable=False),
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


def downgrade() -> None:
    op.drop_table("outbound_mail")
    op.drop_table("signup_attempts")
