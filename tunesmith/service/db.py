"""The service's database: tables, a versioned schema with ordered migrations, connections.

SQLAlchemy Core keeps the SQL portable (SQLite by default, PostgreSQL through
TUNESMITH_DATABASE_URL). Every table has an integer ``seq`` (insertion order,
used for "newest first" lists and cursors) and a public string ``id``.
Timestamps are Unix seconds, as in OpenAI's objects.
"""

from __future__ import annotations

import time
from typing import Callable

from sqlalchemy import (JSON, BigInteger, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, insert, select, text)
from sqlalchemy.engine import Connection, Engine

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", BigInteger, nullable=False),
    Column("description", String(200), nullable=False),
)

projects = Table(
    "projects", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("name", String(64), unique=True, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("name", String(200), nullable=True),
    Column("key_hash", String(64), unique=True, nullable=False),
    Column("redacted", String(32), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

files = Table(
    "files", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False, index=True),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),
    Column("status_details", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
)

jobs = Table(
    "jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False, index=True),
    Column("model", String(512), nullable=False),          # as requested (base name or ft:...)
    Column("base_model", String(256), nullable=False),     # the root base model's name
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64), nullable=True),
    Column("suffix", String(64), nullable=True),
    Column("seed", Integer, nullable=False),
    Column("metadata", JSON, nullable=True),
    Column("hyperparameters", JSON, nullable=False),       # as requested ("auto" kept)
    Column("resolved", JSON, nullable=True),               # the recipe's resolved hyperparameters
    Column("method", JSON, nullable=False),                # OpenAI's method object
    Column("options", JSON, nullable=False),               # tunesmith's own settings (lora_r, ...)
    Column("status", String(32), nullable=False, index=True),
    Column("error", JSON, nullable=True),
    Column("fine_tuned_model", String(512), nullable=True, unique=True),
    Column("run_dir", Text, nullable=True),
    Column("final_dir", Text, nullable=True),
    Column("trained_tokens", BigInteger, nullable=True),
    Column("estimated_finish", BigInteger, nullable=True),
    Column("result_files", JSON, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    Column("worker_id", String(256), nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("resume", Integer, nullable=False, default=0),  # 1: continue the run from its last checkpoint
    Column("model_deleted_at", BigInteger, nullable=True),
)

job_events = Table(
    "job_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=True),
    Column("step", Integer, nullable=True),                # metrics events: the step, to drop replays
)
Index("ix_job_events_job_seq", job_events.c.job_id, job_events.c.seq)

job_metrics = Table(
    "job_metrics", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("train_loss", Float, nullable=True),
    Column("train_accuracy", Float, nullable=True),
    Column("valid_loss", Float, nullable=True),
    Column("valid_mean_token_accuracy", Float, nullable=True),
    Column("tokens", BigInteger, nullable=True),
    Column("elapsed", Float, nullable=True),
    Column("created_at", BigInteger, nullable=False),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("job_id", String(64), ForeignKey("jobs.id"), nullable=False, index=True),
    Column("project_id", String(64), ForeignKey("projects.id"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("fine_tuned_model_checkpoint", String(512), unique=True, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("deleted_at", BigInteger, nullable=True),
)


# ---------------------------------------------------------------- migrations
# Ordered, append-only. A database records every version applied; opening it applies
# the missing ones in order, inside one transaction each, so an upgrade keeps the data.
# Version 1 creates the tables above. When the schema changes, freeze version 1 by
# copying these Table definitions into it, change the tables, and append a migration
# (ALTER TABLE ... ADD COLUMN, data backfill) with the next number.

def _v1_create_tables(conn: Connection) -> None:
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t is not schema_version])


Migration = tuple[int, str, Callable[[Connection], None]]
MIGRATIONS: list[Migration] = [
    (1, "projects, api keys, files, jobs, events, metrics, checkpoints", _v1_create_tables),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    """The highest migration applied to this database (0 for a new one)."""
    schema_version.create(conn, checkfirst=True)
    found = conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc())).first()
    return found[0] if found else 0


def migrate(engine: Engine) -> int:
    """Apply the missing migrations in order; returns the schema version now in force.

    Raises:
        RuntimeError: the database was written by a newer tunesmith (its version is higher).
    """
    with engine.begin() as conn:
        version = current_version(conn)
    if version > SCHEMA_VERSION:
        from tunesmith.errors import TunesmithError

        raise TunesmithError(f"the database is at schema version {version}, newer than this tunesmith "
                             f"({SCHEMA_VERSION})", "upgrade tunesmith, or point TUNESMITH_DATABASE_URL elsewhere")
    for number, description, apply in MIGRATIONS:
        if number <= version:
            continue
        with engine.begin() as conn:
            apply(conn)
            conn.execute(insert(schema_version).values(version=number, applied_at=int(time.time()),
                                                       description=description))
    return SCHEMA_VERSION


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (the API) work while a writer (a worker) commits; the busy
    # timeout makes concurrent writers wait instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_engines: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """The (cached, migrated) engine for ``url``."""
    engine = _engines.get(url)
    if engine is None:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                   pool_size=20, max_overflow=40)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        migrate(engine)
        _engines[url] = engine
    return engine


def ping(engine: Engine) -> None:
    """Run a trivial query (raises if the database cannot be reached)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def now() -> int:
    """The current Unix time in whole seconds."""
    return int(time.time())
