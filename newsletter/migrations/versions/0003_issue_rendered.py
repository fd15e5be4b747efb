"""Keep each issue's rendered email with it, so a resumed send mails the very same message.

Without it a resume would re-render the digest file, which may have been edited,
moved or deleted since the send started.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issues") as batch:
        batch.add_column(sa.Column("rendered", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("issues") as batch:
        batch.drop_column("rendered")
