"""The web dashboard: static pages (src/tunehouse/web/) that call the same JSON API the SDK uses,
plus one extension endpoint they need (a training line's trained-token mask).

The pages hold no data and need no key to load: the key is typed into the sign-in form, kept in
sessionStorage and sent as the Authorization header by the page's own fetch calls, so it never
appears in a URL or in the server's access log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

import tunehouse
from tunehouse.api.dashboard import service
from tunehouse.api.deps import OrgDep, SessionDep, StateDep

WEB_DIR = Path(tunehouse.__file__).parent / "web"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".LICENSE": "text/plain; charset=utf-8",
}
# Only our own files run on these pages: no inline script, nothing from another origin.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

pages = APIRouter(prefix="/dashboard", include_in_schema=False)
router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


def _file(name: str) -> FileResponse:
    path = WEB_DIR / name
    # A flat folder of known files: anything else (a path, a dotfile) is simply not there.
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(status_code=404)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@pages.get("")
def dashboard_root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@pages.get("/")
def dashboard_index() -> FileResponse:
    return _file("index.html")


@pages.get("/{name}")
def dashboard_file(name: str) -> FileResponse:
    return _file(name)


class MaskPreviewRequest(BaseModel):
    """tunehouse extension: POST /v1/fine_tuning/mask_preview."""

    model_config = ConfigDict(extra="forbid")
    file_id: str
    line: Annotated[int, Field(ge=1)] = 1
    model: str | None = None  # base model whose tokenizer and template render the line


@router.post("/mask_preview")
async def mask_preview(
    req: MaskPreviewRequest, state: StateDep, session: SessionDep, principal: OrgDep
) -> dict:
    """One line of an uploaded file, token by token, with the tokens training computes its loss on."""
    return await run_in_threadpool(
        service.mask_preview,
        state,
        session,
        principal=principal,
        file_id=req.file_id,
        line=req.line,
        model=req.model,
    )
