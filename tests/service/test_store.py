"""The store without a server: schema versions, keys, and the atomic job claim."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, insert, select

from tunesmith.errors import TunesmithError
from tunesmith.service import db
from tunesmith.service.context import ServiceContext
from tunesmith.service.projects import authenticate, create_key, ensure_project, list_keys, revoke_key
from tunesmith.service.settings import Settings
from tunesmith.service.worker import Worker


@pytest.fixture
def ctx(tmp_path):
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'state.db'}")
    return ServiceContext(settings, db.get_engine(settings.database_url))


def test_schema_is_versioned_and_reopening_keeps_data(ctx, tmp_path):
    secret, _ = create_key(ctx.engine, "acme")
    fresh = create_engine(ctx.settings.database_url)  # a second process opening the same database
    assert db.migrate(fresh) == db.SCHEMA_VERSION
    with fresh.connect() as conn:
        versions = [r.version for r in conn.execute(select(db.schema_version))]
    assert versions == [m[0] for m in db.MIGRATIONS]
    assert authenticate(fresh, ctx.settings, secret).name == "acme"


def test_a_database_from_a_newer_tunesmith_is_refused(ctx):
    with ctx.engine.begin() as conn:
        conn.execute(insert(db.schema_version).values(version=db.SCHEMA_VERSION + 1, applied_at=0,
                                                      description="from the future"))
    with pytest.raises(TunesmithError, match="newer than this tunesmith"):
        db.migrate(ctx.engine)


def test_keys_are_hashed_and_revocable(ctx):
    secret, info = create_key(ctx.engine, "acme", name="ci")
    assert secret.startswith("sk-") and len(secret) > 40
    with ctx.engine.connect() as conn:
        stored = conn.execute(select(db.api_keys.c.key_hash)).scalar_one()
    assert secret not in stored and len(stored) == 64
    assert authenticate(ctx.engine, ctx.settings, secret).name == "acme"
    assert authenticate(ctx.engine, ctx.settings, secret + "x") is None
    revoke_key(ctx.engine, info.id)
    assert authenticate(ctx.engine, ctx.settings, secret) is None
    assert [k.revoked_at is not None for k in list_keys(ctx.engine)] == [True]
    with pytest.raises(TunesmithError):
        create_key(ctx.engine, "bad name!")


def test_concurrent_workers_claim_each_job_exactly_once(ctx):
    with ctx.engine.begin() as conn:
        project = ensure_project(conn, "acme")
        for index in range(40):
            conn.execute(insert(db.jobs).values(
                id=f"ftjob-{index:03d}", project_id=project.id, model="tiny", base_model="tiny",
                training_file="file-x", seed=1, hyperparameters={}, method={}, options={}, status="queued",
                result_files=[], created_at=index, attempts=0, resume=0))
    claimed: dict[str, list[str]] = {}
    workers = [Worker(ctx, worker_id=f"test:{n}") for n in range(4)]

    def drain(worker: Worker) -> None:
        claimed[worker.id] = []
        while (job_id := worker.claim()) is not None:
            claimed[worker.id].append(job_id)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job for jobs in claimed.values() for job in jobs]
    assert sorted(everything) == [f"ftjob-{i:03d}" for i in range(40)]  # all claimed, none twice
    for jobs in claimed.values():
        assert jobs == sorted(jobs)  # each worker took the oldest first
    with ctx.engine.connect() as conn:
        rows = list(conn.execute(select(db.jobs.c.status, db.jobs.c.worker_id, db.jobs.c.attempts)))
    assert all(r.status == "running" and r.attempts == 1 for r in rows)
    assert {r.worker_id for r in rows} <= {w.id for w in workers}


def test_a_new_migration_is_applied_once_and_keeps_the_data(ctx, monkeypatch):
    from sqlalchemy import text

    secret, _ = create_key(ctx.engine, "acme")

    def add_note_column(conn) -> None:
        conn.execute(text("ALTER TABLE projects ADD COLUMN note VARCHAR(200)"))

    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, (2, "project notes", add_note_column)])
    monkeypatch.setattr(db, "SCHEMA_VERSION", 2)
    assert db.migrate(ctx.engine) == 2
    assert db.migrate(ctx.engine) == 2  # already there: nothing runs twice
    with ctx.engine.connect() as conn:
        assert [r.version for r in conn.execute(select(db.schema_version))] == [1, 2]
        assert conn.execute(text("SELECT name, note FROM projects")).all() == [("acme", None)]
    assert authenticate(ctx.engine, ctx.settings, secret).name == "acme"
