"""Runs the migrations on the connection :func:`newsletter.migrate.upgrade` passes in."""

from alembic import context

from newsletter.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through newsletter.migrate.upgrade() or `newsletter db upgrade`"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters a table by copying it
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
