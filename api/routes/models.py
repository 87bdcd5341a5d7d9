"""/v1/models: the base models and your finished adapters (`parent` = the base), and their
exports for other stacks (merged dense weights, llama.cpp LoRA GGUF)."""

from __future__ import annotations

import threading
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api import crud, storage
from api.deps import CurrentUser, SessionDep
from api.errors import APIError, bad_request, error_responses, not_found
from api.schemas import DeletedObject, ListPage, ModelObject
from core.config import get_settings
from core.db.models import Model

router = APIRouter(prefix="/v1/models", tags=["models"])
# One export at a time per process: a merge holds a dense copy of the base in memory.
_export_lock = threading.Lock()


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


@router.get("/{model_id:path}/export", response_class=FileResponse)
def export_model(
    model_id: str, user: CurrentUser, session: SessionDep, format: Literal["merged", "gguf-lora"] = "merged"
) -> FileResponse:
    """One of your fine-tuned models for other stacks: `merged`, a zip of a dense bf16 Hugging Face
    folder (base dequantized, adapter merged; transformers, vLLM, TGI load it); `gguf-lora`, llama.cpp's
    LoRA GGUF of a model trained on a `:gguf` base. Made on the first request (a merge loads the
    base: seconds for small models, minutes for 7B+), then served from `exports/`."""
    from modulora.export import export_for_other_stacks
    from modulora.settings import from_home

    model = crud.visible_model(session=session, user_id=user.id, model_id=model_id)
    if model is None:
        raise not_found("model", model_id, param="model")
    settings = get_settings()
    name = model.id.replace(":", "_")
    target = settings.exports_dir / model.job_id / ("merged" if format == "merged" else f"{name}.gguf")
    if not target.exists():
        with _export_lock:
            if not target.exists():
                try:
                    export_for_other_stacks(from_home(model.base), settings.home / model.path, format, target)
                except ValueError as e:
                    raise bad_request(str(e), param="format", code="export_not_supported") from None
    if format == "merged":
        return storage.zip_folder(target, f"{name}-merged", compress=False)
    return FileResponse(target, media_type="application/octet-stream", filename=target.name)


@router.get("/{model_id:path}", response_model=ModelObject)
def retrieve_model(model_id: str, user: CurrentUser, session: SessionDep) -> ModelObject:
    """A base model, one of your adapters, or one of your jobs' checkpoints (id or public name)."""
    for base in base_models():
        if base.id == model_id:
            return base
    model = crud.visible_model(session=session, user_id=user.id, model_id=model_id)
    if model is not None:
        return adapter_to_public(model)
    found = crud.visible_checkpoint(session=session, user_id=user.id, model_id=model_id)
    if found is None:
        raise not_found("model", model_id, param="model")
    checkpoint, job = found
    return ModelObject(
        id=crud.checkpoint_name(job, checkpoint.step),
        created=int(checkpoint.created_at.timestamp()),
        owned_by=job.user_id,
        parent=job.fine_tuned_model_name(),
        root=job.model,
    )


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
    storage.remove(get_settings().exports_dir / model.job_id)
    return DeletedObject(id=model_id, object="model")
