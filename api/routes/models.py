"""/v1/models: the base models and your finished adapters (`parent` = the base)."""

from __future__ import annotations

from fastapi import APIRouter

from api import crud, storage
from api.deps import CurrentUser, SessionDep
from api.errors import APIError, error_responses, not_found
from api.schemas import DeletedObject, ListPage, ModelObject
from core.config import get_settings
from core.db.models import Model

router = APIRouter(prefix="/v1/models", tags=["models"])


def adapter_to_public(model: Model) -> ModelObject:
    return ModelObject(
        id=model.id,
        created=int(model.created_at.timestamp()),
        owned_by=model.user_id,
        parent=model.parent,
        root=model.parent,
    )


def base_models() -> list[ModelObject]:
    return [
        ModelObject(id=name, created=0, owned_by="modulora", root=name) for name in get_settings().base_models
    ]


@router.get("", response_model=ListPage[ModelObject])
def list_models(user: CurrentUser, session: SessionDep) -> ListPage[ModelObject]:
    """Base models, then your adapters."""
    adapters = [adapter_to_public(m) for m in crud.user_models(session=session, user_id=user.id)]
    return ListPage(data=base_models() + adapters)


@router.get("/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, user: CurrentUser, session: SessionDep) -> ModelObject:
    """A base model or one of your adapters."""
    for base in base_models():
        if base.id == model_id:
            return base
    model = crud.visible_model(session=session, user_id=user.id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id, param="model")
    return adapter_to_public(model)


@router.delete("/{model_id:path}", response_model=DeletedObject, responses=error_responses(403))
def delete_model(model_id: str, user: CurrentUser, session: SessionDep) -> DeletedObject:
    """Delete one of your adapters (its files too); base models cannot be deleted (403)."""
    if any(base.id == model_id for base in base_models()):
        raise APIError(
            403,
            f"model: {model_id!r} is a base model of this server; only your fine-tuned models can be deleted",
            param="model",
            code="model_not_deletable",
        )
    model = crud.visible_model(session=session, user_id=user.id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id, param="model")
    session.delete(model)
    session.commit()
    storage.remove(get_settings().home / model.path)
    return DeletedObject(id=model_id, object="model")
