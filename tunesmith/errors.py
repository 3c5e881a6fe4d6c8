"""Errors a user can act on.

Every layer raises :class:`TunesmithError` (or a subclass) for problems caused by
input, configuration or the environment. The CLI prints them without a traceback
and exits non-zero; the HTTP service maps them to OpenAI-shaped error bodies.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """A problem the user can fix.

    Args:
        message: what is wrong, naming the thing (file, line, field, setting).
        hint: what to do about it; printed after the message.
        param: the request field or CLI option at fault, when there is one.
        code: a short machine-readable code (used by the HTTP API).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.param = param
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class NotFoundError(TunesmithError):
    """A named thing (file, model, run, job) does not exist."""


class ConfigError(TunesmithError):
    """One or more invalid settings; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str], hint: str | None = None):
        self.problems = list(problems)
        super().__init__("invalid settings:\n  " + "\n  ".join(self.problems), hint, code="invalid_config")


class DataError(TunesmithError):
    """Training data that cannot be used; ``problems`` holds the line-numbered messages."""

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint, code="invalid_training_file")
        self.problems = list(problems or [])
