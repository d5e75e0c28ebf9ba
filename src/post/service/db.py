"""The service's state in a SQL database: tenants, hashed API keys, prompt files, transfer jobs.

SQLAlchemy 2 ORM over SQLite by default (one file in the data directory, WAL mode so the server
and its worker processes can share it) or any URL SQLAlchemy takes, e.g. PostgreSQL for several
replicas. The schema is versioned with Alembic: :func:`migrate` upgrades a database to the
newest revision in ``post/service/migrations/versions`` and is run by every command that opens
the database (a no-op when it is current).

Times are seconds since the epoch (floats), so comparisons behave the same on every backend.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from sqlalchemy import Boolean, Engine, Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from post.errors import PostError

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


def new_id(prefix: str) -> str:
    """A random public id such as ``p-3f9a...`` (96 bits: ids are not guessable)."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Prompt(Base):
    """A stored prompt file: ``kind`` student (uploaded, for the student) or target (a job's output)."""

    __tablename__ = "prompts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    sha256: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    n_tokens: Mapped[int] = mapped_column(Integer)
    classes: Mapped[str] = mapped_column(Text)  # JSON list, the task's class order
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    delta: Mapped[float | None] = mapped_column(Float, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Job(Base):
    """A transfer job. Recorded (queued) before anything runs; leased by one server at a time."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    options: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the user's alpha, if given
    steps: Mapped[int] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_prompt_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def open_engine(url: str) -> Engine:
    """An engine for ``url`` (SQLite: the file's directory is created, WAL mode, 30 s busy timeout)."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PostError(f"cannot create {path.parent} ({e.strerror}); choose another --data-dir.") from None
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except Exception as e:  # a bad URL or a missing driver
        raise PostError(f"--db {url.split('@')[-1]!r} can't be opened ({type(e).__name__}: {e}); give a "
                        "SQLAlchemy URL such as sqlite:///service.db or postgresql+psycopg://HOST/DB.") from None


def migrate(engine: Engine) -> str:
    """Upgrade the database to the newest schema revision; returns that revision."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines on every open are noise
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        return str(MigrationContext.configure(conn).get_current_revision())


def open_db(url: str) -> sessionmaker[Session]:
    """Open (and migrate) the database at ``url``; returns a session factory."""
    engine = open_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
