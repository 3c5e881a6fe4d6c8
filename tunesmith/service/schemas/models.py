"""The ``model`` object."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelPublic(BaseModel):
    """OpenAI's ``model`` object."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelListPublic(BaseModel):
    """The list of models (not paginated, as in OpenAI's API)."""

    object: Literal["list"] = "list"
    data: list[ModelPublic]
