"""The dashboard's one extension endpoint: a training line rendered token by token, with the
tokens the loss is computed on marked (the same mask training uses, `data.chat.tokenize_chat`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session

from tunehouse.api.files.service import file_path, get_file_row
from tunehouse.api.state import AppState
from tunehouse.data.analysis import context_length_for
from tunehouse.data.chat import TemplateError, tokenize_chat
from tunehouse.errors import InvalidRequest
from tunehouse.store.catalog import resolve_base_model
from tunehouse.tenancy.auth import Principal

MAX_PREVIEW_TOKENS = 4096


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _read_line(path: Path, line: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, start=1):
            if n == line:
                return text
    raise InvalidRequest(f"The file has no line {line}.", param="line")


def mask_preview(
    state: AppState, session: Session, *, principal: Principal, file_id: str, line: int, model: str | None
) -> dict:
    path = file_path(state, get_file_row(session, principal=principal, file_id=file_id))
    text = _read_line(path, line)
    try:
        example = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"Line {line} is not valid JSON: {e.msg}.", param="line") from None
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
        raise InvalidRequest(
            f"Line {line} has no `messages` list (a preview shows chat lines, not preference pairs).",
            param="line",
        )
    base = resolve_base_model(
        state.settings,
        model or state.settings.default_model,
        session=session,
        organization_id=principal.organization_id,
    )
    tokenizer = _tokenizer(str(base.path))
    try:
        tokenized = tokenize_chat(tokenizer, example, max_length=context_length_for(base.path))
    except (TemplateError, KeyError, TypeError, ValueError) as e:
        raise InvalidRequest(f"Line {line} cannot be rendered: {e}", param="line") from None
    ids, trained = tokenized.input_ids[:MAX_PREVIEW_TOKENS], tokenized.trained[:MAX_PREVIEW_TOKENS]
    return {
        "object": "fine_tuning.mask_preview",
        "file_id": file_id,
        "line": line,
        "model": base.name,
        "n_tokens": tokenized.n_tokens,
        "n_trained": tokenized.n_trained,
        "truncated": tokenized.truncated,
        "tokens": [{"text": tokenizer.decode([i]), "trained": t} for i, t in zip(ids, trained, strict=True)],
    }
