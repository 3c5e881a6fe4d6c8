"""Projects and their API keys.

Every object belongs to one project; a key opens one project. Keys are shown once
when created (``sk-…``) and stored only as a SHA-256 hash: they are long random
secrets, so a fast hash is enough (no password stretching needed). The key in
TUNESMITH_API_KEY, when the server starts with one, opens the default project.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Engine

from tunesmith.errors import NotFoundError, TunesmithError
from tunesmith.service import db
from tunesmith.service.ids import new_id
from tunesmith.service.settings import Settings, is_safe_name

KEY_PREFIX = "sk-"
_default_projects: dict[tuple[str, str], "Project"] = {}  # (database, name) → project: rows never change


@dataclass(frozen=True)
class Project:
    """The project a request acts for."""

    id: str
    name: str


@dataclass(frozen=True)
class KeyInfo:
    """A stored key, without its secret."""

    id: str
    project: str
    name: str | None
    redacted: str
    created_at: int
    revoked_at: int | None


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_project_name(name: str) -> None:
    """Raises TunesmithError unless ``name`` is a valid project name."""
    if not is_safe_name(name) or len(name) > 64:
        raise TunesmithError(f"invalid project name {name!r}",
                             "use up to 64 letters, digits, '.', '_' or '-' (it becomes part of model names)",
                             param="project")


def ensure_project(conn: Connection, name: str) -> Project:
    """The project called ``name``, created if it does not exist yet."""
    check_project_name(name)
    row = conn.execute(select(db.projects).where(db.projects.c.name == name)).first()
    if row is None:
        project_id = new_id("proj")
        conn.execute(insert(db.projects).values(id=project_id, name=name, created_at=db.now()))
        return Project(project_id, name)
    return Project(row.id, row.name)


def create_key(engine: Engine, project: str, name: str | None = None) -> tuple[str, KeyInfo]:
    """Make a new secret key for ``project`` (created if needed).

    Returns:
        the secret (shown once) and what is stored about it.
    """
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    redacted = f"{secret[:6]}…{secret[-4:]}"
    with engine.begin() as conn:
        found = ensure_project(conn, project)
        key_id = new_id("key", 12)
        created = db.now()
        conn.execute(insert(db.api_keys).values(id=key_id, project_id=found.id, name=name,
                                                key_hash=hash_key(secret), redacted=redacted,
                                                created_at=created))
    return secret, KeyInfo(key_id, found.name, name, redacted, created, None)


def list_keys(engine: Engine, project: str | None = None) -> list[KeyInfo]:
    """Every stored key (optionally of one project), oldest first."""
    query = (select(db.api_keys, db.projects.c.name.label("project_name"))
             .join(db.projects, db.projects.c.id == db.api_keys.c.project_id)
             .order_by(db.api_keys.c.seq))
    if project is not None:
        query = query.where(db.projects.c.name == project)
    with engine.connect() as conn:
        return [KeyInfo(r.id, r.project_name, r.name, r.redacted, r.created_at, r.revoked_at)
                for r in conn.execute(query)]


def revoke_key(engine: Engine, key_id: str) -> KeyInfo:
    """Revoke a key by its id (``key-…``); it stops working at once.

    Raises:
        NotFoundError: no key with that id.
    """
    with engine.begin() as conn:
        done = conn.execute(update(db.api_keys).where(db.api_keys.c.id == key_id)
                            .where(db.api_keys.c.revoked_at.is_(None)).values(revoked_at=db.now()))
        if done.rowcount == 0:
            exists = conn.execute(select(db.api_keys.c.id).where(db.api_keys.c.id == key_id)).first()
            if exists is None:
                raise NotFoundError(f"no key with id {key_id!r}", "see the ids with: tunesmith keys list")
    return next(k for k in list_keys(engine) if k.id == key_id)


def authenticate(engine: Engine, settings: Settings, token: str) -> Project | None:
    """The project ``token`` opens, or None when it opens nothing (unknown or revoked)."""
    if settings.api_key is not None and hmac.compare_digest(token.encode(), settings.api_key.encode()):
        cache_key = (str(engine.url), settings.default_project)
        if cache_key not in _default_projects:
            with engine.begin() as conn:
                _default_projects[cache_key] = ensure_project(conn, settings.default_project)
        return _default_projects[cache_key]
    query = (select(db.projects.c.id, db.projects.c.name)
             .join(db.api_keys, db.api_keys.c.project_id == db.projects.c.id)
             .where(db.api_keys.c.key_hash == hash_key(token))
             .where(db.api_keys.c.revoked_at.is_(None)))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return Project(row.id, row.name) if row else None


def project_by_id(conn: Connection, project_id: str) -> Project:
    """The project with this id (it exists: rows reference it)."""
    row = conn.execute(select(db.projects).where(db.projects.c.id == project_id)).one()
    return Project(row.id, row.name)
