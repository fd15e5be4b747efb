"""Bounces and complaints reported after the send: one row per report and address.

A DSN, a feedback report or a provider's webhook names a delivery (by its VERP token,
its Message-ID or our header) or, for a signed webhook, an address; ``event_key`` is a
hash of the report and the delivery, unique, so the same report read twice is kept once.
Rows go with their subscriber (a purge erases them); an issue's rows outlive nothing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "bounce_events",
        sa.Column("id", big_id, nullable=False),
        sa.Column("event_key", sa.String(64), nullable=False),
        sa.Column("subscriber_id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("issue_id", sa.Integer(), nullable=True),
        sa.Column("delivery_id", big_id, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bounce_events"),
        sa.UniqueConstraint("event_key", name="uq_bounce_events_event_key"),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name="fk_bounce_events_subscriber_id_subscribers",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["issue_id"],
            ["issues.id"],
            name="fk_bounce_events_issue_id_issues",
            ondelete="SET NULL",
        ),
        sa.CheckConstraint(
            "kind IN ('hard', 'soft', 'complaint', 'delivered')", name="ck_bounce_events_kind"
        ),
        sa.CheckConstraint(
            "source IN ('mailbox', 'process', 'ses', 'postmark', 'mailgun')",
            name="ck_bounce_events_source",
        ),
    )
    op.create_index(
        "ix_bounce_events_subscriber_id_occurred_at",
        "bounce_events",
        ["subscriber_id", "occurred_at"],
    )
    op.create_index("ix_bounce_events_issue_id", "bounce_events", ["issue_id"])


def downgrade() -> None:
    op.drop_table("bounce_events")
