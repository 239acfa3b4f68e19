"""/v1/uploads: create, add parts, complete, cancel (OpenAI has no list or retrieve for uploads)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tunehouse.api.deps import OrgDep, StateDep
from tunehouse.api.uploads import service
from tunehouse.api.uploads.protocol import CompleteUploadRequest, CreateUploadRequest, Upload, UploadPart

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post("", response_model=Upload)
def create_upload(body: CreateUploadRequest, state: StateDep, principal: OrgDep) -> Upload:
    return service.create_upload(state, principal=principal, body=body)


@router.post("/{upload_id}/parts", response_model=UploadPart)
async def add_upload_part(upload_id: str, request: Request, state: StateDep, principal: OrgDep) -> UploadPart:
    return await service.add_part(
        state,
        principal=principal,
        upload_id=upload_id,
        content_type=request.headers.get("content-type"),
        body=request.stream(),
    )


@router.post("/{upload_id}/complete", response_model=Upload)
def complete_upload(
    upload_id: str, body: CompleteUploadRequest, state: StateDep, principal: OrgDep
) -> Upload:
    # A plain def: FastAPI runs it in its thread pool, so copying the parts blocks no other request.
    return service.complete_upload(state, principal=principal, upload_id=upload_id, body=body)


@router.post("/{upload_id}/cancel", response_model=Upload)
def cancel_upload(upload_id: str, state: StateDep, principal: OrgDep) -> Upload:
    return service.cancel_upload(state, principal=principal, upload_id=upload_id)
