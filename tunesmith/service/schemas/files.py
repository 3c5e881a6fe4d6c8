"""The ``file`` object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class FilePublic(BaseModel):
    """OpenAI's ``file`` object (``status`` is always ``processed`` once stored)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
