"""`tunehouse export MODEL DIR [--merged | --format gguf [--outtype f16|bf16|q8_0]]`: a fine-tuned
model's weights as a plain folder you own (a Hugging Face folder, or a GGUF file for llama.cpp).

Exit status: 0 = exported, 1 = unknown model, destination not empty, or another export error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def export_cmd(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Fine-tuned model (ft:…) or checkpoint (ft:…:ckpt-step-N).")
    ],
    out_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write (created).")],
    merged: Annotated[
        bool,
        typer.Option(
            "--merged", help="Merge the adapter into the base weights: a standalone model, no peft needed."
        ),
    ] = False,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar="adapter|merged|gguf",
            help="adapter (default), merged (same as --merged), or gguf: merged weights as one GGUF "
            "file for llama.cpp / Ollama, written by llama.cpp's converter.",
        ),
    ] = None,
    outtype: Annotated[
        str, typer.Option("--outtype", metavar="f16|bf16|q8_0", help="The GGUF file's type (--format gguf).")
    ] = "f16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIR if it is not empty.")] = False,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="State folder (default: TUNEHOUSE_HOME or a per-user data dir)."),
    ] = None,
) -> None:
    """Export a fine-tuned model: its LoRA adapter (default), merged weights (a fully fine-tuned
    model: its weights), or a GGUF file of the merged weights for llama.cpp and Ollama, with the
    tokenizer and the chat template it was trained with."""
    import logging

    from tunehouse.config import Settings
    from tunehouse.export import ExportError, export_model

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(home=home) if home is not None else Settings()
    err = Console(stderr=True, soft_wrap=True)
    if merged and format not in (None, "merged"):
        err.print(f"[bold red]error:[/] --merged and --format {escape(format)} contradict each other")
        raise typer.Exit(1)
    if outtype != "f16" and format != "gguf":
        err.print("[bold red]error:[/] --outtype is the GGUF file's type: it needs --format gguf")
        raise typer.Exit(1)
    try:
        out = export_model(
            settings, model, out_dir, merged=merged, format=format, outtype=outtype, overwrite=overwrite
        )
    except ExportError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    console = Console(soft_wrap=True)
    info = json.loads((out / "tunehouse.json").read_text())
    fmt = info.get("format")
    full = fmt == "full"  # a fully fine-tuned model: whole weights whatever --merged says
    merged = merged or format == "merged"
    kind = (
        f"GGUF {info.get('gguf_type')}, merged weights"
        if fmt == "gguf"
        else "fully fine-tuned model"
        if full
        else "merged model"
        if merged
        else "LoRA adapter"
    )
    console.print(f"Exported {escape(model)} ({kind}) to {escape(str(out))}:", highlight=False)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            console.print(f"  {escape(str(f.relative_to(out)))}  {_size(f.stat().st_size)}", highlight=False)
    if fmt == "gguf":
        f = info["gguf_file"]
        console.print(
            f"Run it with llama.cpp (llama-cli -m {escape(str(out / f))}) or Ollama (FROM ./{f}).",
            highlight=False,
        )
    elif merged or full:
        console.print("Load it with AutoModelForCausalLM.from_pretrained(DIR).", highlight=False)
    else:
        console.print("Load it with peft.AutoPeftModelForCausalLM.from_pretrained(DIR).", highlight=False)
