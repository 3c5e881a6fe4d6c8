"""/v1/models"""

from __future__ import annotations

from fastapi import APIRouter

from tunesmith.service import catalog
from tunesmith.service.deps import Ctx, CurrentProject
from tunesmith.service.schemas.common import DeletedPublic
from tunesmith.service.schemas.models import ModelListPublic, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelListPublic)
def list_models(ctx: Ctx, project: CurrentProject):
    """Base models, then this project's fine-tuned models and checkpoints."""
    return catalog.list_models(ctx, project)


@router.get("/{model:path}", response_model=ModelPublic)
def retrieve_model(model: str, ctx: Ctx, project: CurrentProject):
    """One model."""
    return catalog.retrieve(ctx, project, model)


@router.delete("/{model:path}", response_model=DeletedPublic)
def delete_model(model: str, ctx: Ctx, project: CurrentProject):
    """Delete a fine-tuned model or checkpoint (and its weights)."""
    return catalog.remove(ctx, project, model)
