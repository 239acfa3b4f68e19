"""Export over HTTP (an extension): `GET /v1/models/{model}/export?format=gguf&outtype=q8_0`.

The same export as `tunehouse export` (tunehouse/export.py), scoped like every other read: the key
finds only its own fine-tuned models (its project's, or its organization's for an admin key);
another organization's model is a 404, as OpenAI answers for objects of another organization. A
model shared with the caller's project through checkpoint permissions may be run, not taken away.

The answer is one file: the GGUF file itself, or a tar of the Hugging Face folder (adapter or
merged). It is built in a temporary folder in the home, which the router deletes once sent.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.api.aliases.service import resolve_model_name
from tunehouse.api.state import AppState
from tunehouse.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from tunehouse.export import FORMATS, GGUF_OUTTYPES, ExportError, export_checkpoint, gguf_converter
from tunehouse.store.catalog import is_base_model
from tunehouse.tenancy.auth import Principal
from tunehouse.tenancy.scope import own_checkpoint

STALE_SECONDS = 24 * 3600


@dataclass
class ExportedFile:
    path: Path
    filename: str
    media_type: str
    workdir: Path  # delete once sent


def _sweep(parent: Path) -> None:
    """Remove what an export interrupted by a crash left (older than any export still running)."""
    cutoff = time.time() - STALE_SECONDS
    for d in parent.glob("export-*"):
        try:
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def export_model(
    state: AppState, session: Session, *, principal: Principal, model: str, format: str, outtype: str
) -> ExportedFile:
    if format not in FORMATS:
        raise InvalidRequest(f"Invalid format `{format}`: one of {', '.join(FORMATS)}.", param="format")
    if format == "gguf" and outtype not in GGUF_OUTTYPES:
        raise InvalidRequest(
            f"Invalid outtype `{outtype}`: one of {', '.join(GGUF_OUTTYPES)}.", param="outtype"
        )
    if format != "gguf" and outtype != "f16":
        raise InvalidRequest("outtype is the GGUF file's type: it needs format=gguf.", param="outtype")
    # A model alias (api/aliases) exports the model it leads to, as it runs it everywhere else.
    name = resolve_model_name(state.settings, session, principal=principal, model=model)
    row = own_checkpoint(session, principal, name)
    if row is None:
        if is_base_model(state.settings, name, session=session, organization_id=principal.organization_id):
            raise InvalidRequest(
                f"`{name}` is a base model: only fine-tuned models and their checkpoints can be exported.",
                param="model",
                code="model_not_exportable",
            )
        raise ModelNotFound(model)
    session.expunge(row)
    if format == "gguf":
        try:
            gguf_converter()
        except ExportError as e:
            raise ServiceUnavailable(str(e)) from None
    parent = state.settings.home / "exports"
    parent.mkdir(parents=True, exist_ok=True)
    _sweep(parent)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=parent))
    try:
        out = export_checkpoint(state.settings, row, work / "out", format=format, outtype=outtype)
        stem = _safe(model)
        if format == "gguf":
            gguf = next(out.glob("*.gguf"))
            return ExportedFile(gguf, f"{stem}-{outtype}.gguf", "application/octet-stream", work)
        tar = work / f"{stem}.tar"
        with tarfile.open(tar, "w") as t:
            t.add(out, arcname=stem)
        return ExportedFile(tar, tar.name, "application/x-tar", work)
    except ExportError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise InvalidRequest(
            f"The export of `{model}` failed: {e}", param="model", code="export_failed"
        ) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
