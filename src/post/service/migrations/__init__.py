"""Alembic migrations of the service's database (run by :func:`post.service.db.migrate`)."""
