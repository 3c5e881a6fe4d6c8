"""Shapes shared by the resources: OpenAI's list object and deletion answer."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class ListPublic(BaseModel, Generic[T]):
    """OpenAI's cursor-paginated list."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class DeletedPublic(BaseModel):
    """The answer to a DELETE."""

    id: str
    object: str
    deleted: bool


class StrictRequest(BaseModel):
    """A request body that names its unknown fields instead of ignoring them."""

    model_config = ConfigDict(extra="forbid")
