"""`tunehouse export`: adapter and merged exports load with plain peft / transformers and generate
exactly what the server's engine generates for the same chat prompt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from tests.conftest import MODELS_DIR, TINY_MODEL
from tunehouse.config import Settings
from tunehouse.export import DestinationNotEmpty, ExportError, UnknownModel, export_model
from tunehouse.inference.engine import ModelRef, SamplingParams
from tunehouse.inference.hf import HFEngine

MODEL = f"ft:{TINY_MODEL}:acme::abcd1234"
CKPT = f"{MODEL}:ckpt-step-1"
MESSAGES = [
    {"role": "system", "content": "You triage support tickets."},
    {"role": "user", "content": "My invoice is wrong, please help."},
]
MAX_TOKENS = 12


def _make_checkpoint(settings: Settings, base_dir: Path) -> Path:
    """What a finished job leaves behind, without training: a LoRA adapter with a random lora_B
    (so it changes the outputs), the tokenizer, tunehouse.json, and the database rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunehouse.store.engine import Database, migrate
    from tunehouse.store.tables import Checkpoint, Job, Organization
    from tunehouse.training.hparams import LORA_TARGET_MODULES

    org_id, job_id = "org-export-test", "ftjob-exporttestabcd1234"
    key = f"{org_id}/{job_id}/step-1"
    path = settings.weights_dir / key
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(path)
    meta = {"base_model_path": str(base_dir.resolve()), "step": 1, "metrics": {"train_loss": 1.0}}
    (path / "tunehouse.json").write_text(json.dumps(meta))

    settings.ensure_dirs()
    migrate(settings.db_url)
    db = Database(settings.db_url)
    with db.transaction() as s:
        s.add(Organization(id=org_id, name="Acme", slug="acme"))
        s.flush()
        s.add(
            Job(
                id=job_id,
                organization_id=org_id,
                model=TINY_MODEL,
                base_model=TINY_MODEL,
                training_file="file-x",
                seed=0,
                method={"type": "supervised"},
                status="succeeded",
                fine_tuned_model=MODEL,
            )
        )
        s.flush()
        for i, (name, final) in enumerate([(CKPT, False), (MODEL, True)]):
            s.add(
                Checkpoint(
                    id=f"ftckpt_export{i}",
                    job_id=job_id,
                    organization_id=org_id,
                    model_name=name,
                    base_model=TINY_MODEL,
                    step_number=1,
                    metrics={"step": 1},
                    path=key,
                    is_final=final,
                )
            )
    db.dispose()
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir: Path) -> tuple[Settings, Path]:
    settings = Settings(
        home=tmp_path_factory.mktemp("export") / "home",
        models_dir=MODELS_DIR,
        base_models={TINY_MODEL: tiny_model_dir},
    )
    return settings, _make_checkpoint(settings, tiny_model_dir)


@pytest.fixture(scope="module")
def server_answer(home, tiny_model_dir: Path) -> tuple[str, int]:
    """(text, completion tokens) the server's engine answers with, fp32 so greedy is exact."""
    _, adapter = home
    engine = HFEngine(dtype="float32", device="cpu")
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        tuned = engine.chat(ModelRef(MODEL, tiny_model_dir, adapter), MESSAGES, params)
        plain = engine.chat(ModelRef(TINY_MODEL, tiny_model_dir), MESSAGES, params)
    finally:
        engine.close()
    assert tuned.choices[0].text != plain.choices[0].text  # the adapter matters
    return tuned.choices[0].text, tuned.completion_tokens


def _greedy(model, tokenizer) -> tuple[str, int]:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    n = next((i for i, t in enumerate(new) if t in eos), len(new))  # end-of-turn is not counted
    return tokenizer.decode(new[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False), n


def _template(folder: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).chat_template


def test_adapter_export_loads_with_peft_and_answers_like_the_server(home, server_answer, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, adapter = home
    out = export_model(settings, MODEL, tmp_path / "adapter", merged=False)
    assert out == (tmp_path / "adapter").resolve()
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(settings.base_models[TINY_MODEL]).resolve())
    info = json.loads((out / "tunehouse.json").read_text())
    assert info["base_model"] == TINY_MODEL and info["model"] == MODEL and info["step"] == 1
    assert TINY_MODEL in (out / "README.md").read_text()
    # The exact chat template training rendered with (saved with the checkpoint).
    assert _template(out) == _template(adapter) is not None
    assert (out / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert _greedy(model, tokenizer) == server_answer
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    assert _greedy(PeftModel.from_pretrained(base, out).eval(), tokenizer) == server_answer


def test_merged_export_loads_without_peft_and_answers_like_the_server(home, server_answer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, adapter = home
    out = export_model(settings, CKPT, tmp_path / "merged", merged=True)
    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"F32"}  # the base's dtype
    assert names and not any("lora" in n for n in names)
    assert (out / "generation_config.json").is_file()
    assert _template(out) == _template(adapter)
    info = json.loads((out / "tunehouse.json").read_text())
    assert info["format"] == "merged" and info["model"] == CKPT and info["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(model.parameters()).dtype == torch.float32
    assert _greedy(model, AutoTokenizer.from_pretrained(out)) == server_answer


def test_unknown_names_and_occupied_folders_are_refused(home, tmp_path, monkeypatch):
    settings, adapter = home
    with pytest.raises(UnknownModel, match="no fine-tuned model"):
        export_model(settings, "ft:tiny-smollm2:acme::nope", tmp_path / "x", merged=False)
    with pytest.raises(UnknownModel, match="base model"):
        export_model(settings, TINY_MODEL, tmp_path / "x", merged=False)
    assert not (tmp_path / "x").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DestinationNotEmpty):
        export_model(settings, MODEL, busy, merged=False)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    export_model(settings, MODEL, busy, merged=False, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / "adapter_config.json").is_file()
    # An empty folder is fine without overwrite.
    (tmp_path / "empty").mkdir()
    export_model(settings, MODEL, tmp_path / "empty", merged=False)
    # Never over the weights it reads from, even with overwrite.
    with pytest.raises(ExportError, match="overlaps"):
        export_model(settings, MODEL, adapter.parent, merged=False, overwrite=True)
    with pytest.raises(ExportError, match="home"):
        export_model(settings, MODEL, settings.home.parent, merged=False, overwrite=True)
    assert (adapter / "adapter_config.json").is_file()

    # A failure halfway leaves nothing behind.
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("tunehouse.export._write_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(settings, MODEL, tmp_path / "half", merged=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


def test_cli(home, tmp_path, monkeypatch):
    from tunehouse.cli.export import export_cmd

    settings, _ = home
    app = typer.Typer()
    app.command("export")(export_cmd)
    app.callback()(lambda: None)  # keep `export` a subcommand, as in the real app
    for k in [k for k in os.environ if k.startswith("TUNEHOUSE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TUNEHOUSE_MODELS_DIR", str(MODELS_DIR))
    monkeypatch.setenv(
        "TUNEHOUSE_BASE_MODELS", json.dumps({TINY_MODEL: str(settings.base_models[TINY_MODEL])})
    )
    runner = CliRunner()
    home_arg = ["--home", str(settings.home)]

    ok = runner.invoke(app, ["export", MODEL, str(tmp_path / "out"), *home_arg])
    assert ok.exit_code == 0, ok.output
    assert "adapter_model.safetensors" in ok.stdout and "AutoPeftModelForCausalLM" in ok.stdout
    assert (tmp_path / "out" / "adapter_config.json").is_file()

    again = runner.invoke(app, ["export", MODEL, str(tmp_path / "out"), *home_arg])
    assert again.exit_code == 1 and "not empty" in again.stderr
    unknown = runner.invoke(app, ["export", "ft:nope", str(tmp_path / "other"), "--merged", *home_arg])
    assert unknown.exit_code == 1 and "ft:nope" in unknown.stderr
    assert not (tmp_path / "other").exists()
