"""Alembic environment: migrate the connection :func:`post.service.db.migrate` hands over (online only)."""

from alembic import context

from post.service.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
