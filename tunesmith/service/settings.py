"""One settings object for the service, read from the environment and validated at start.

Every knob is an environment variable so that `tunesmith serve`, `tunesmith worker`
and the worker's training child all see the same values.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith import settings as base_settings
from tunesmith.errors import ConfigError

DEFAULT_PROJECT = "default"


def _int_env(name: str, default: int, problems: list[str]) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name} must be an integer, got {raw!r}")
        return default
    if value < 0:
        problems.append(f"{name} must not be negative, got {value}")
    return value


def _float_env(name: str, default: float, problems: list[str]) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        problems.append(f"{name} must be a number, got {raw!r}")
        return default
    if value <= 0:
        problems.append(f"{name} must be positive, got {value}")
    return value


def parse_extra_models(raw: str | None, problems: list[str]) -> dict[str, Path]:
    """Parse ``TUNESMITH_EXTRA_MODELS`` (``name=/path,other=/path``) into name → folder.

    Only the administrator who starts the server can add base models this way;
    requests can never name a path.
    """
    found: dict[str, Path] = {}
    if not raw:
        return found
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            problems.append(f"TUNESMITH_EXTRA_MODELS entry {item!r} must look like name=/path/to/model")
            continue
        if not is_safe_name(name) or name.startswith("ft:"):
            problems.append(f"TUNESMITH_EXTRA_MODELS name {name!r} may use letters, digits, '.', '_' and '-' only")
            continue
        folder = Path(path).expanduser().resolve()
        if not (folder / "config.json").is_file():
            problems.append(f"TUNESMITH_EXTRA_MODELS {name}: {folder} is not a model folder (no config.json)")
            continue
        found[name] = folder
    return found


def is_safe_name(name: str) -> bool:
    """A name made of letters, digits, '.', '_' and '-', not starting with '.'."""
    return bool(name) and not name.startswith(".") and all(c.isalnum() or c in "._-" for c in name)


@dataclass(frozen=True)
class Settings:
    """The service's configuration.

    Attributes:
        home: TUNESMITH_HOME; uploaded files go to ``home/files``, job runs to ``home/runs``.
        database_url: SQLAlchemy URL (TUNESMITH_DATABASE_URL; SQLite under home by default).
        api_key: TUNESMITH_API_KEY, accepted as a key of the default project (never stored).
        default_project: the project that TUNESMITH_API_KEY belongs to.
        max_upload_bytes: TUNESMITH_MAX_UPLOAD_BYTES; a larger upload gets 413.
        validate_upload_max_bytes: fine-tune files up to this size are validated at upload.
        extra_models: TUNESMITH_EXTRA_MODELS, base models served from folders by name.
        heartbeat_s: how often a worker refreshes the heartbeat of its job.
        stale_after_s: a running job whose heartbeat is older than this is taken over.
        pause_grace_s: how long a pausing job may take to write its checkpoint before it is stopped.
        poll_s: how often an idle worker looks for a queued job.
        device: TUNESMITH_DEVICE for training and inference (None: pick the best).
        inference_threads: TUNESMITH_INFERENCE_THREADS, completion requests handled at once, so also
            the largest decode batch (they wait for the batch without holding the API's threads).
    """

    home: Path
    database_url: str
    api_key: str | None = None
    default_project: str = DEFAULT_PROJECT
    max_upload_bytes: int = 4 * 1024**3
    validate_upload_max_bytes: int = 16 * 1024**2
    extra_models: dict[str, Path] = field(default_factory=dict)
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0
    pause_grace_s: float = 120.0
    poll_s: float = 1.0
    device: str | None = None
    inference_threads: int = 32

    @property
    def files_dir(self) -> Path:
        """Content-addressed uploaded files."""
        return self.home / "files"

    @property
    def runs_dir(self) -> Path:
        """One folder per fine-tuning job."""
        return self.home / "runs"

    @classmethod
    def from_env(cls) -> "Settings":
        """Read and validate the settings from the environment.

        Raises:
            ConfigError: every invalid variable at once.
        """
        problems: list[str] = []
        home = base_settings.home()
        url = os.environ.get("TUNESMITH_DATABASE_URL") or f"sqlite:///{home / 'tunesmith.db'}"
        api_key = os.environ.get("TUNESMITH_API_KEY") or None
        if api_key is not None and len(api_key) < 8:
            problems.append("TUNESMITH_API_KEY must be at least 8 characters long")
        project = os.environ.get("TUNESMITH_DEFAULT_PROJECT", DEFAULT_PROJECT)
        if not is_safe_name(project):
            problems.append(f"TUNESMITH_DEFAULT_PROJECT {project!r} may use letters, digits, '.', '_' and '-' only")
        made = cls(
            home=home,
            database_url=url,
            api_key=api_key,
            default_project=project,
            max_upload_bytes=_int_env("TUNESMITH_MAX_UPLOAD_BYTES", cls.max_upload_bytes, problems),
            validate_upload_max_bytes=_int_env("TUNESMITH_VALIDATE_UPLOAD_MAX_BYTES",
                                               cls.validate_upload_max_bytes, problems),
            extra_models=parse_extra_models(os.environ.get("TUNESMITH_EXTRA_MODELS"), problems),
            heartbeat_s=_float_env("TUNESMITH_HEARTBEAT_S", cls.heartbeat_s, problems),
            stale_after_s=_float_env("TUNESMITH_STALE_AFTER_S", cls.stale_after_s, problems),
            pause_grace_s=_float_env("TUNESMITH_PAUSE_GRACE_S", cls.pause_grace_s, problems),
            poll_s=_float_env("TUNESMITH_POLL_S", cls.poll_s, problems),
            device=os.environ.get("TUNESMITH_DEVICE") or None,
            inference_threads=max(1, _int_env("TUNESMITH_INFERENCE_THREADS", cls.inference_threads, problems)),
        )
        if problems:
            raise ConfigError(problems, "fix these environment variables and start again")
        made.files_dir.mkdir(parents=True, exist_ok=True)
        made.runs_dir.mkdir(parents=True, exist_ok=True)
        return made


def host_name() -> str:
    """This machine's name, recorded with the worker that holds a job."""
    return socket.gethostname()
