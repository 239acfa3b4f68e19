"""Weights you own: export a fine-tuned model (or one of its checkpoints) to a plain folder.

Two shapes for a LoRA model:

* adapter (default): the PEFT adapter as training saved it, with `base_model_name_or_path` pointing at
  the base model's folder, plus the tokenizer with the exact chat template training rendered with.
  `peft.AutoPeftModelForCausalLM.from_pretrained(out)` loads it.
* merged: the adapter folded into the base weights (`merge_and_unload`), saved as safetensors in the
  base's dtype with the tokenizer, chat template and a generation config, so plain
  `AutoModelForCausalLM.from_pretrained(out)` works without peft.

A fully fine-tuned model (fine_tuning_type "full") already is a whole model folder (config,
safetensors, tokenizer, generation config): it is copied as it is, and `merged` changes nothing.

GGUF (`format="gguf"`): the merged (or fully fine-tuned) weights as one GGUF file for llama.cpp,
Ollama or LM Studio, in f16, bf16 or q8_0, with the tokenizer and chat template inside. The file is
written by llama.cpp's own converter (`convert_hf_to_gguf.py`, run from the merged folder), which
scripts/setup.sh takes from the llama-cpp-python source distribution on PyPI: tensor names, layouts
and quantisation are llama.cpp's, not ours.

Either way the export is written to a hidden temporary folder next to the destination and renamed into
place at the end, so an interrupted export never leaves a half-written folder behind.

`export_model` is the local administrator's tool (`tunehouse export`): it reads the database directly
and exports any organization's model by name. The HTTP API (`GET /v1/models/{model}/export`) finds
the checkpoint within the caller's organization and project first, then calls `export_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tunehouse.config import Settings
from tunehouse.errors import ModelNotFound
from tunehouse.inference.models import stop_token_ids
from tunehouse.store.blobs import open_blobs
from tunehouse.store.catalog import is_base_model, resolve_base_model
from tunehouse.store.engine import Database, migrate
from tunehouse.store.tables import Checkpoint

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# What a full fine-tuning checkpoint holds besides the tokenizer (copied by _copy_tokenizer) and
# tunehouse.json (rewritten): the model's config and weights, sharded or not.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
)


FORMATS = ("adapter", "merged", "gguf")
GGUF_OUTTYPES = ("f16", "bf16", "q8_0")  # llama.cpp's converter's names
# Where scripts/setup.sh puts llama.cpp's converter; TUNEHOUSE_GGUF_CONVERTER names another copy
# (the path of a convert_hf_to_gguf.py that has its `conversion` and `gguf-py` folders beside it).
GGUF_CONVERTER = Path(sys.prefix) / "share" / "tunehouse" / "llama.cpp" / "convert_hf_to_gguf.py"


class ExportError(Exception):
    """The export cannot be done; the message says why (and is meant for a person)."""


class UnknownModel(ExportError):
    pass


class DestinationNotEmpty(ExportError):
    pass


def _find_checkpoint(settings: Settings, model_name: str) -> Checkpoint:
    if is_base_model(settings, model_name):
        raise UnknownModel(
            f"`{model_name}` is a base model, not a fine-tuned one: only fine-tuned models (ft:…) and "
            "their checkpoints (ft:…:ckpt-step-N) can be exported."
        )
    url = settings.db_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UnknownModel(f"no fine-tuned model `{model_name}`: there is no tunehouse database at {url}")
    migrate(url)
    db = Database(url)
    try:
        # No organization filter on purpose: see the module docstring.
        with db.session() as s:
            row = s.scalar(select(Checkpoint).where(Checkpoint.model_name == model_name))
            if row is not None:
                s.expunge(row)
    finally:
        db.dispose()
    if row is None:
        raise UnknownModel(
            f"no fine-tuned model or checkpoint named `{model_name}` in {settings.home} "
            "(names look like ft:<base>:<org>:<suffix>:<id>, or that plus :ckpt-step-N)"
        )
    return row


def _base_path(settings: Settings, row: Checkpoint, meta: dict[str, Any]) -> Path:
    try:
        return resolve_base_model(settings, row.base_model).path.resolve()
    except ModelNotFound:
        # The base is no longer registered: the path training recorded still identifies the weights.
        recorded = meta.get("base_model_path")
        if recorded and Path(recorded).is_dir():
            return Path(recorded).resolve()
        raise ExportError(
            f"the base model `{row.base_model}` of `{row.model_name}` is not registered in this home "
            "(TUNEHOUSE_BASE_MODELS) and the folder training recorded is gone"
        ) from None


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _check_destination(out_dir: Path, *, overwrite: bool, protected: list[Path], home: Path) -> None:
    # Never export into tunehouse's own folders or the weights being read, nor replace a folder that
    # holds them (overwrite deletes what was there).
    for p in protected:
        if _is_within(p, out_dir) or _is_within(out_dir, p):
            raise ExportError(f"refusing to export into {out_dir}: it overlaps {p}")
    if _is_within(home, out_dir):
        raise ExportError(f"refusing to export into {out_dir}: it holds the tunehouse home {home}")
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir() or out_dir.is_symlink():
            raise DestinationNotEmpty(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise DestinationNotEmpty(f"{out_dir} is not empty (pass overwrite to replace it)")


def _copy_tokenizer(src: Path, dst: Path) -> str | None:
    """Tokenizer files (chat template included) from `src`; returns the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.save_pretrained(dst)
    saved = AutoTokenizer.from_pretrained(dst).chat_template
    if saved != tokenizer.chat_template:
        raise ExportError(f"the chat template of {src} did not survive saving the tokenizer")
    return tokenizer.chat_template


def _generation_config(base_path: Path, tokenizer_dir: Path):
    """The base's generation config, with every token the server stops at as `eos_token_id`
    (`stop_token_ids`, as the engine reads them), so plain `generate` ends a turn where the server
    would."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(base_path)
    try:
        gen = GenerationConfig.from_pretrained(base_path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = stop_token_ids(config, gen, tokenizer)
    if eos:
        gen.eos_token_id = eos if len(eos) > 1 else eos[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return gen


def _write_adapter(adapter: Path, base_path: Path, tmp: Path) -> None:
    for name in ADAPTER_FILES:
        if (adapter / name).is_file():
            shutil.copy2(adapter / name, tmp / name)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_path)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_merged(adapter: Path, base_path: Path, tmp: Path) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    dtype = next(base.parameters()).dtype
    # Merge in fp32 (W + scale·B·A rounded once), then store in the base's own dtype.
    base = base.float()
    model = PeftModel.from_pretrained(base, adapter, is_trainable=False)
    merged = model.merge_and_unload()
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(tmp)  # safetensors
    del model, merged, base
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


def _write_full(weights: Path, tmp: Path) -> str:
    """Copy a fully fine-tuned model folder's config and weights; returns the weights' dtype."""
    from transformers import AutoConfig

    for pattern in MODEL_FILE_PATTERNS:
        for f in weights.glob(pattern):
            shutil.copy2(f, tmp / f.name)
    dtype = getattr(AutoConfig.from_pretrained(tmp), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def gguf_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, or ExportError saying how to get it."""
    path = Path(os.environ.get("TUNEHOUSE_GGUF_CONVERTER") or GGUF_CONVERTER)
    if not path.is_file() or not (path.parent / "conversion").is_dir():
        raise ExportError(
            f"llama.cpp's GGUF converter is not installed (no {path} with its conversion/ folder): "
            "run scripts/setup.sh, which takes it from the llama-cpp-python source distribution on "
            "PyPI, or set TUNEHOUSE_GGUF_CONVERTER to a convert_hf_to_gguf.py of your own"
        )
    return path


def _write_gguf(hf_dir: Path, out_file: Path, *, outtype: str, name: str) -> None:
    """Convert the standalone model folder `hf_dir` into the GGUF file `out_file` with llama.cpp's
    converter, in a process of its own (it puts its own gguf-py first on sys.path)."""
    converter = gguf_converter()
    cmd = [sys.executable, str(converter), str(hf_dir), "--outfile", str(out_file), "--outtype", outtype]
    cmd += ["--model-name", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py the converter was written against
    log.info("converting %s to GGUF (%s)", hf_dir, outtype)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=hf_dir)
    if done.returncode != 0 or not out_file.is_file():
        raise ExportError(
            f"llama.cpp's GGUF converter could not convert this model: {_converter_error(done)}"
        )


def _converter_error(done: subprocess.CompletedProcess) -> str:
    """The line of the converter's output that says what went wrong: its exception or its error
    log line (e.g. "Model Gemma3nForCausalLM is not supported"), else its last lines."""
    lines = [ln.strip() for ln in (done.stdout + "\n" + done.stderr).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("ERROR:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln):
            return ln.split(":", 2)[-1].strip() if ln.startswith("ERROR:") else ln
    return " / ".join(lines[-3:]) or f"exit status {done.returncode}"


def _readme_gguf(row: Checkpoint, file: str, outtype: str) -> str:
    return f"""# {row.model_name}

Exported from tunehouse: fine-tuned from the base model `{row.base_model}` (step {row.step_number}),
the LoRA adapter merged into the weights, as one GGUF file ({outtype}) written by llama.cpp's
convert_hf_to_gguf.py. The tokenizer and the chat template training rendered with are inside it.

```bash
llama-cli -m {file} -cnv                       # llama.cpp
echo 'FROM ./{file}' > Modelfile && ollama create my-model -f Modelfile   # Ollama
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", gguf_file="{file}")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", gguf_file="{file}")
```

tunehouse.json has the training details.
"""


def _readme(row: Checkpoint, base_path: Path, *, merged: bool, dtype: str | None, full: bool = False) -> str:
    name = row.model_name
    if merged or full:
        what = (
            f"Every weight was fine-tuned (fine_tuning_type full); stored in {dtype}, safetensors"
            if full
            else f"The LoRA adapter is merged into the base weights ({dtype}, safetensors)"
        )
        how = f"""{what}: no peft needed.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
inputs = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "Hello"}}],
    add_generation_prompt=True, return_tensors="pt", return_dict=True,
)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""
    else:
        how = f"""A PEFT LoRA adapter for the base model `{row.base_model}`, whose folder was
`{base_path}` when it was exported (`base_model_name_or_path` in adapter_config.json; change it if
you move the base).

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""
    return f"""# {name}

Exported from tunehouse: fine-tuned from the base model `{row.base_model}` (step {row.step_number}).

{how}
The tokenizer and chat template (chat_template.jinja) are the ones training rendered the examples
with; render prompts with `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` to
get what the tunehouse server sends the model. tunehouse.json has the training details.
"""


def export_model(
    settings: Settings,
    model_name: str,
    out_dir: Path,
    *,
    merged: bool = False,
    overwrite: bool = False,
    format: str | None = None,
    outtype: str = "f16",
) -> Path:
    """Write the fine-tuned model (or checkpoint) `model_name`, of any organization, to `out_dir`;
    returns `out_dir`. `format` is "adapter", "merged" or "gguf" (default: "merged" if `merged`,
    else "adapter"); `outtype` is the GGUF's type (GGUF_OUTTYPES).

    Raises UnknownModel for names that are not fine-tuned models or checkpoints in this home,
    DestinationNotEmpty when `out_dir` holds anything and `overwrite` is false, ExportError otherwise.
    """
    fmt = format or ("merged" if merged else "adapter")
    _check_format(fmt, outtype)
    row = _find_checkpoint(settings, model_name)
    return export_checkpoint(settings, row, out_dir, format=fmt, outtype=outtype, overwrite=overwrite)


def _check_format(fmt: str, outtype: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format `{fmt}`: one of {', '.join(FORMATS)}")
    if fmt == "gguf" and outtype not in GGUF_OUTTYPES:
        raise ExportError(f"unknown GGUF type `{outtype}`: one of {', '.join(GGUF_OUTTYPES)}")


def export_checkpoint(
    settings: Settings,
    row: Checkpoint,
    out_dir: Path,
    *,
    format: str = "adapter",
    outtype: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint `row` (found by the caller, within whatever scope it applies) to
    `out_dir` as `format`; see export_model."""
    fmt = format
    _check_format(fmt, outtype)
    model_name = row.model_name
    out_dir = Path(out_dir).expanduser().resolve()
    adapter = open_blobs(settings, "weights").path(row.path)
    # A full fine-tuning checkpoint is a whole model folder instead of an adapter.
    full = not (adapter / "adapter_config.json").is_file() and (adapter / "config.json").is_file()
    if not full and not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"the weights of `{model_name}` are missing: no adapter at {adapter}")
    if fmt == "gguf":
        gguf_converter()  # before any work: say at once when it is missing
    meta_file = adapter / "tunehouse.json"
    meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    base_path = _base_path(settings, row, meta)
    protected = [adapter, base_path, settings.weights_dir, settings.base_models_dir, settings.files_dir]
    _check_destination(
        out_dir,
        overwrite=overwrite,
        protected=[p.resolve() for p in protected],
        home=settings.home.resolve(),
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        # GGUF: the standalone (merged) folder is written aside first, then converted.
        hf = tmp / ".hf" if fmt == "gguf" else tmp
        hf.mkdir(exist_ok=True)
        # The tokenizer training saved with the checkpoint carries the template it rendered with.
        tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else base_path
        template = _copy_tokenizer(tok_src, hf)
        dtype = None
        if full:  # already standalone weights: --merged has nothing to merge
            dtype = _write_full(adapter, hf)
            _generation_config(adapter, hf).save_pretrained(hf)
        elif fmt in ("merged", "gguf"):
            dtype = _write_merged(adapter, base_path, hf)
            _generation_config(base_path, hf).save_pretrained(hf)
        else:
            _write_adapter(adapter, base_path, hf)
        gguf_file = None
        if fmt == "gguf":
            gguf_file = f"model-{outtype}.gguf"
            _write_gguf(hf, tmp / gguf_file, outtype=outtype, name=model_name)
            shutil.rmtree(hf)
        info = {
            **meta,
            "model": row.model_name,
            "base_model": row.base_model,
            "base_model_path": str(base_path),
            "step": row.step_number,
            "metrics": row.metrics or meta.get("metrics", {}),
            "format": "gguf"
            if gguf_file
            else "full"
            if full
            else fmt
            if fmt == "merged"
            else "peft-lora-adapter",
            "dtype": dtype,
            "has_chat_template": template is not None,
            "exported_at": int(time.time()),
        }
        if gguf_file:
            info |= {"gguf_file": gguf_file, "gguf_type": outtype, "fully_fine_tuned": full}
        if info["format"] == "peft-lora-adapter":
            info.pop("dtype")
        (tmp / "tunehouse.json").write_text(json.dumps(info, indent=2) + "\n")
        readme = (
            _readme_gguf(row, gguf_file, outtype)
            if gguf_file
            else _readme(row, base_path, merged=fmt == "merged", dtype=dtype, full=full)
        )
        (tmp / "README.md").write_text(readme)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700

        if out_dir.exists():
            # Empty, or overwrite: move the old folder aside, put the new one in, then delete the old.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "x", out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s", model_name, info["format"], out_dir)
    return out_dir
