from __future__ import annotations

import shutil

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.models import export, service
from tunehouse.api.models.protocol import Model, ModelDeleted, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(state: StateDep, session: SessionDep, principal: OrgDep) -> ModelList:
    return service.list_models(state, session, principal=principal)


# An extension (api/models/export.py): the model's weights as one file. Before `/{model:path}`, which
# would take the `/export` too. A plain `def`: the export runs in the thread pool, not the event loop.
@router.get("/{model:path}/export", response_class=FileResponse)
def export_model(
    model: str,
    state: StateDep,
    session: SessionDep,
    principal: OrgDep,
    format: str = "adapter",
    outtype: str = "f16",
) -> FileResponse:
    out = export.export_model(
        state, session, principal=principal, model=model, format=format, outtype=outtype
    )
    return FileResponse(
        out.path,
        media_type=out.media_type,
        filename=out.filename,
        background=BackgroundTask(shutil.rmtree, out.workdir, ignore_errors=True),
    )


# `:path` because fine-tuned names contain colons and clients may percent-encode slashes.
@router.get("/{model:path}", response_model=Model)
def retrieve_model(model: str, state: StateDep, session: SessionDep, principal: OrgDep) -> Model:
    return service.retrieve_model(state, session, principal=principal, model=model)


@router.delete("/{model:path}", response_model=ModelDeleted)
def delete_model(model: str, state: StateDep, session: SessionDep, principal: OrgDep) -> ModelDeleted:
    return service.delete_model(state, session, principal=principal, model=model)
