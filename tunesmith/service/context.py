"""What every service function needs: the settings and the database engine."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from tunesmith.service import db
from tunesmith.service.settings import Settings


@dataclass(frozen=True)
class ServiceContext:
    """Settings plus a migrated database engine."""

    settings: Settings
    engine: Engine

    @classmethod
    def from_env(cls) -> "ServiceContext":
        """Read the settings from the environment and open (and migrate) the database."""
        settings = Settings.from_env()
        return cls(settings, db.get_engine(settings.database_url))
