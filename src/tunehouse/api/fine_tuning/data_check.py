"""tunehouse extension: the full data report for uploaded files, before any job is created."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.api.files.service import file_path, get_file_row
from tunehouse.api.fine_tuning.protocol import DataCheckRequest
from tunehouse.api.state import AppState
from tunehouse.data.analysis import check_files, context_length_for
from tunehouse.errors import NotFound
from tunehouse.store.catalog import resolve_base_model
from tunehouse.tenancy.auth import Principal
from tunehouse.training import throughput
from tunehouse.usage.prices import price_for


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _path(state: AppState, session: Session, principal: Principal, file_id: str, param: str) -> Path:
    try:
        return file_path(state, get_file_row(session, principal=principal, file_id=file_id))
    except NotFound:
        raise NotFound(f"No such File object: {file_id}", param=param) from None


def check(state: AppState, session: Session, *, principal: Principal, req: DataCheckRequest) -> dict:
    train = _path(state, session, principal, req.training_file, "training_file")
    valid = (
        _path(state, session, principal, req.validation_file, "validation_file")
        if req.validation_file
        else None
    )
    base = resolve_base_model(
        state.settings,
        req.model or state.settings.default_model,
        session=session,
        organization_id=principal.organization_id,
    )
    report = check_files(
        train,
        validation=valid,
        tokenizer=_tokenizer(str(base.path)),
        context_length=context_length_for(base.path),
        method=req.method,
        n_epochs=req.n_epochs,
        overlap_is_error=req.overlap_is_error,
        tokens_per_second=throughput.tokens_per_second(state.settings.home, base.name),
        price_per_million=price_for(state.settings, base.name).training,  # TUNEHOUSE_PRICES
    )
    body = report.to_dict()
    error = report.job_error()
    return {
        "object": "fine_tuning.data_check",
        "model": base.name,
        "training_file": req.training_file,
        "validation_file": req.validation_file,
        "error": {"code": error[0], "message": error[1], "param": report.error_param} if error else None,
        **body,
    }
