"""Registered base models: `tunehouse models add|list|remove` and the admin API
(/v1/organization/base_models) both go through here.

Adding a model checks it, top to bottom, before anything is kept: a GGUF file is converted into a
Hugging Face folder first (`catalog.convert_gguf`); the folder's config.json must be one transformers
reads and builds as a causal LM (the architecture is whatever its AutoConfig says); the machine must
have the memory to serve it; it must hold weights and a tokenizer; its chat template (or the one
given) must render a conversation. Then the folder is copied under the server's home
(`<home>/base_models/<id>`), under a temporary name renamed at the end, and its row is written in
the same step: a failure at any point leaves neither files nor row behind.

The memory figures are estimates from the parameter count (counted on a model built on the `meta`
device, no weights loaded) and the dtype the server computes in:
- serve: the weights, plus the KV cache of one sequence at the full context, plus 10%;
- train_lora: the frozen weights plus 30% (adapters, their optimizer state and activations);
- train_full: 16 bytes a parameter (fp32 weights, gradients and both Adam moments) plus 20%.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.config import Settings
from tunehouse.errors import InvalidRequest, NotFound
from tunehouse.hardware import resolve_dtype
from tunehouse.store.catalog import DEFAULT_MODEL, convert_gguf
from tunehouse.store.gguf_file import CorruptGGUF, check_gguf
from tunehouse.store.job_status import ACTIVE
from tunehouse.store.tables import Checkpoint, Job, RegisteredBaseModel

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What a model folder holds that the copy leaves out: version control, caches, other formats.
COPY_IGNORE = shutil.ignore_patterns(".git", ".cache", ".huggingface", "*.gguf", "original", "*.partial")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_SAMPLE_CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye."},
]
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelRejected(InvalidRequest):
    """A model that cannot be added, and why (the CLI prints it; the API answers 400)."""

    default_code = "invalid_base_model"


@dataclass
class ModelFacts:
    """What `inspect_model` read from a model folder."""

    architecture: str
    model_type: str
    context_length: int
    parameters: int
    dtype: str  # of the stored weights
    memory: dict[str, int] = field(default_factory=dict)  # bytes: serve, train_lora, train_full
    chat_template: str | None = None  # the template given with --chat-template, where one was


def registry_dir(settings: Settings) -> Path:
    return settings.home / "base_models"


def machine_memory_bytes() -> int:
    """The most memory one model can use here: this machine's RAM, or its largest GPU's memory if
    that is more."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = 0
    try:
        import torch

        if torch.cuda.is_available():
            gpu = max(
                torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
            )
    except Exception:  # noqa: BLE001 - no usable GPU: RAM decides
        gpu = 0
    return max(ram, gpu)


def _config_context(config) -> int | None:
    """The model's own context length from its config (the text config's, for multimodal ones)."""
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def inspect_model(
    folder: Path, *, settings: Settings, chat_template: str | None = None, check_memory: bool = True
) -> ModelFacts:
    """Check a Hugging Face model folder as `add_model` needs it; raises ModelRejected naming what
    is wrong."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not folder.is_dir():
        raise ModelRejected(f"{folder} is neither a model folder nor a .gguf file.", param="path")
    if not (folder / "config.json").is_file():
        raise ModelRejected(
            f"{folder} is not a Hugging Face model folder: it has no config.json.", param="path"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except ValueError as e:  # an unknown model_type, custom code, a malformed field
        raise ModelRejected(
            f"Unsupported architecture in {folder / 'config.json'}: transformers cannot read it ({e}).",
            param="path",
        ) from None
    except OSError as e:
        raise ModelRejected(f"{folder / 'config.json'} cannot be read: {e}", param="path") from None
    model_type = getattr(config, "model_type", "") or ""
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = ", ".join(getattr(config, "architectures", None) or []) or model_type or "unknown"
        raise ModelRejected(
            f"Unsupported architecture {archs} (model_type {model_type!r}): transformers cannot load "
            "it as a causal language model, which fine-tuning and chat need.",
            param="path",
        )
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure to build it is the model's fault
        raise ModelRejected(
            f"transformers cannot build {model_type!r} from {folder / 'config.json'} as a causal LM: {e}",
            param="path",
        ) from None
    architecture = type(skeleton).__name__
    parameters = sum(p.numel() for p in skeleton.parameters())
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    stored = str(stored).removeprefix("torch.")
    context = _config_context(config)
    # Memory, in the dtype this server computes in (bf16 where the hardware has it).
    compute = str(resolve_dtype(settings.dtype, "auto")).removeprefix("torch.")
    per_param = _BYTES.get(compute, 4)
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (
        (getattr(text, "hidden_size", 0) or 0) // heads if heads else 0
    )
    kv_cache = 2 * layers * kv_heads * head_dim * (context or 2048) * per_param
    weights = parameters * per_param
    memory = {
        "serve": int((weights + kv_cache) * 1.1),
        "train_lora": int(weights * 1.3),
        "train_full": int(parameters * 16 * 1.2),
    }
    if check_memory:
        have = machine_memory_bytes()
        if memory["serve"] > have:
            raise ModelRejected(
                f"The model is too large for this machine: {architecture} with {parameters / 1e9:.1f}B "
                f"parameters needs about {_gib(memory['serve'])} to serve in {compute}, and the "
                f"largest memory here (RAM or one GPU) is {_gib(have)}.",
                param="path",
                code="model_too_large",
            )
    if not any(next(folder.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelRejected(
            f"{folder} has no weights: no *.safetensors or pytorch_model*.bin file.", param="path"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - missing or broken tokenizer files
        raise ModelRejected(f"{folder} has no tokenizer transformers can load: {e}", param="path") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ModelRejected(
            f"{folder} has no chat template (tokenizer_config.json or chat_template.jinja), which chat "
            "fine-tuning and serving need: give one with --chat-template FILE (API: chat_template).",
            param="chat_template",
            code="missing_chat_template",
        )
    try:
        rendered = tokenizer.apply_chat_template(_SAMPLE_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that does not render is refused whatever it raises
        raise ModelRejected(
            f"The chat template does not render a system/user/assistant conversation: {e}",
            param="chat_template",
            code="invalid_chat_template",
        ) from None
    if not isinstance(rendered, str) or "Hello?" not in rendered:
        raise ModelRejected(
            "The chat template leaves the messages' content out of what it renders.",
            param="chat_template",
            code="invalid_chat_template",
        )
    return ModelFacts(
        architecture=architecture,
        model_type=model_type,
        context_length=context or int(min(getattr(tokenizer, "model_max_length", 2048) or 2048, 10**7)),
        parameters=parameters,
        dtype=stored,
        memory=memory,
        chat_template=chat_template,
    )


def _check_name(session: Session, settings: Settings, name: str) -> None:
    if not NAME_RE.match(name):
        raise ModelRejected(
            f"Invalid model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
            "starting with a letter or digit).",
            param="name",
        )
    if name in settings.base_models or name in (DEFAULT_MODEL, settings.default_model):
        raise ModelRejected(f"A base model named {name!r} already exists (from settings).", param="name")
    if session.scalar(select(RegisteredBaseModel.id).where(RegisteredBaseModel.name == name)):
        raise ModelRejected(
            f"A base model named {name!r} is already registered: remove it first, or choose another --name.",
            param="name",
            code="model_exists",
        )


def add_model(
    session: Session,
    settings: Settings,
    *,
    source: Path,
    name: str | None = None,
    chat_template: str | None = None,
    organizations: list[str] | None = None,
) -> RegisteredBaseModel:
    """Check, copy (or convert) and register a base model; commits `session`. `organizations` are
    organization ids (None: every organization). Raises ModelRejected; leaves nothing behind then."""
    source = Path(source).expanduser().resolve()
    if not source.exists():
        raise ModelRejected(f"{source} does not exist.", param="path")
    is_gguf = source.is_file() and source.suffix.lower() == ".gguf"
    if source.is_file() and not is_gguf:
        raise ModelRejected(
            f"{source} is a file but not a .gguf file: give a Hugging Face model folder or a GGUF file.",
            param="path",
        )
    name = name or (source.stem if is_gguf else source.name)
    _check_name(session, settings, name)
    model_id = "bm_" + uuid.uuid4().hex[:24]
    root = registry_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    staging, final = root / f".{model_id}.partial", root / model_id
    try:
        if is_gguf:
            try:
                check_gguf(source)  # a truncated or foreign file, said plainly
            except CorruptGGUF as e:
                raise ModelRejected(f"{source} cannot be read as a GGUF model: {e}", param="path") from None
            try:
                convert_gguf(source, staging)
            except Exception as e:  # noqa: BLE001 - an architecture transformers' GGUF loader lacks
                raise ModelRejected(
                    f"{source} cannot be read as a GGUF model by transformers: {e}", param="path"
                ) from None
            facts = inspect_model(staging, settings=settings, chat_template=chat_template)
        else:
            # Checked before copying: a bad folder costs no copy.
            facts = inspect_model(source, settings=settings, chat_template=chat_template)
            shutil.copytree(source, staging, ignore=COPY_IGNORE, symlinks=False)
        if chat_template is not None:
            _write_chat_template(staging, chat_template)
        staging.rename(final)
        row = RegisteredBaseModel(
            id=model_id,
            name=name,
            path=str(final),
            source=str(source),
            architecture=facts.architecture,
            model_type=facts.model_type,
            context_length=facts.context_length,
            parameters=facts.parameters,
            dtype=facts.dtype,
            memory=facts.memory,
            organizations=sorted(set(organizations)) if organizations else None,
        )
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + ".partial"), ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    log.info(
        "registered base model %s (%s, %d parameters) at %s",
        name,
        facts.architecture,
        facts.parameters,
        final,
    )
    return row


def _write_chat_template(folder: Path, template: str) -> None:
    """The given template becomes the copy's own: what training and serving load."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)


def list_models(session: Session) -> list[RegisteredBaseModel]:
    return list(session.scalars(select(RegisteredBaseModel).order_by(RegisteredBaseModel.seq)))


def get_model(session: Session, name: str) -> RegisteredBaseModel:
    row = session.scalar(
        select(RegisteredBaseModel).where(
            (RegisteredBaseModel.name == name) | (RegisteredBaseModel.id == name)
        )
    )
    if row is None:
        raise NotFound(f"No registered base model named {name!r}.", param="name", code="model_not_found")
    return row


def remove_model(session: Session, settings: Settings, name: str) -> RegisteredBaseModel:
    """Unregister a base model and delete its copied weights; commits. Refused while fine-tuned
    models or unfinished jobs are built on it (they would lose their base)."""
    row = get_model(session, name)
    models = session.scalar(select(Checkpoint.model_name).where(Checkpoint.base_model == row.name).limit(1))
    jobs = session.scalar(select(Job.id).where(Job.base_model == row.name, Job.status.in_(ACTIVE)).limit(1))
    if models or jobs:
        what = f"fine-tuned model {models}" if models else f"unfinished job {jobs}"
        raise InvalidRequest(
            f"Base model {row.name!r} is in use ({what} is built on it): delete its fine-tuned models "
            "and wait for its jobs to finish first.",
            param="name",
            code="model_in_use",
        )
    path = Path(row.path)
    session.delete(row)
    session.commit()
    # Renamed first, then removed: a crash between leaves a hidden folder, never a half model.
    if path.is_dir() and path.parent == registry_dir(settings):
        trash = path.with_name(f".{path.name}.removed")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return row


def describe(row: RegisteredBaseModel) -> dict[str, Any]:
    """A registered model as the CLI's --json and the admin API show it."""
    return {
        "object": "base_model",
        "id": row.id,
        "name": row.name,
        "architecture": row.architecture,
        "model_type": row.model_type,
        "context_length": row.context_length,
        "parameters": row.parameters,
        "dtype": row.dtype,
        "memory_bytes": dict(row.memory),
        "organizations": row.organizations,
        "source": row.source,
        "path": row.path,
        "created_at": row.created_at,
    }
