"""Alembic's environment for the cloud's schema: always run by :meth:`cloud.db.Database.create_all` on a
connection it passes in (inside its transaction and lock), never from a command line with its own engine."""

from alembic import context

from cloud.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
