from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from tunehouse.api.deps import OrgDep, SessionDep, StateDep
from tunehouse.api.files import service
from tunehouse.api.files.protocol import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject)
async def create_file(request: Request, state: StateDep, principal: OrgDep) -> FileObject:
    return await service.upload_file(
        state, principal=principal, content_type=request.headers.get("content-type"), body=request.stream()
    )


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    principal: OrgDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    return service.list_files(
        session, principal=principal, purpose=purpose, after=after, limit=limit, order=order
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, principal: OrgDep) -> FileObject:
    return service.to_wire(service.get_file_row(session, principal=principal, file_id=file_id))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, state: StateDep, session: SessionDep, principal: OrgDep) -> FileDeleted:
    return service.delete_file(state, session, principal=principal, file_id=file_id)


@router.get("/{file_id}/content")
def file_content(file_id: str, state: StateDep, session: SessionDep, principal: OrgDep) -> FileResponse:
    row = service.get_file_row(session, principal=principal, file_id=file_id)
    return FileResponse(
        service.file_path(state, row), media_type="application/octet-stream", filename=row.filename
    )
