"""Your own base models (`tunehouse models add|list|remove`, /v1/organization/base_models): tiny
random models of the Llama, Qwen2, Qwen3, Mistral and Gemma families (built in the test from
transformers' configs, the default model's tokenizer) are added, listed by /v1/models for the
organizations allowed, served, fine-tuned through the API and exported; they survive a restart;
bad input is refused with the reason and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from typer.testing import CliRunner

from tests.api.conftest import (
    NEEDS_CONVERTER,
    LiveServer,
    arithmetic_lines,
    create_org_key,
    wait_for_job,
    write_jsonl,
)
from tests.tiny_families import FAMILIES

runner = CliRunner()


def cli(*args: str):
    from tunehouse.cli.main import app

    return runner.invoke(app, list(args))


@pytest.fixture(scope="module", autouse=True)
def cli_database(shared_server):
    """The CLI reads the home's settings: in the PostgreSQL pass it must be told the server's database."""
    with pytest.MonkeyPatch.context() as mp:
        if shared_server.settings.database_url:
            mp.setenv("TUNEHOUSE_DATABASE_URL", shared_server.settings.database_url)
        yield


@pytest.fixture(scope="module")
def added(shared_server, tiny_family_dirs):
    """Every family added: Qwen3 with the CLI (all organizations), the others through the admin API."""
    home = str(shared_server.settings.home)
    result = cli(
        "models", "add", str(tiny_family_dirs["qwen3"]), "--name", "my-qwen3", "--home", home, "--json"
    )
    assert result.exit_code == 0, result.output
    rows = {"qwen3": json.loads(result.output)}
    with shared_server.http() as http:
        for family in FAMILIES:
            if family == "qwen3":
                continue
            r = http.post(
                "/v1/organization/base_models",
                json={"path": str(tiny_family_dirs[family]), "name": f"my-{family}"},
            )
            assert r.status_code == 200, r.text
            rows[family] = r.json()
    return rows


def test_add_reports_architecture_context_and_memory(added, tiny_family_dirs):
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM",
        "gemma": "GemmaForCausalLM",
    }
    for family, row in added.items():
        assert row["architecture"] == arch[family] and row["model_type"] == family
        assert row["context_length"] == 4096  # the config's max_position_embeddings
        assert 3_000_000 < row["parameters"] < 4_000_000
        mem = row["memory_bytes"]
        assert mem["serve"] > 0 and 0 < mem["train_lora"] < mem["train_full"]
        assert row["organizations"] is None
        # The weights were copied under the server's home: the source may go.
        path = Path(row["path"])
        assert path.is_dir() and (path / "config.json").is_file() and path != tiny_family_dirs[family]


def test_listed_by_models_and_served(added, shared_server):
    client = shared_server.client()
    ids = [m.id for m in client.models.list().data]
    for family in FAMILIES:
        assert f"my-{family}" in ids
        assert client.models.retrieve(f"my-{family}").owned_by == "tunehouse"
        answer = client.chat.completions.create(
            model=f"my-{family}", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert answer.model == f"my-{family}" and answer.usage.completion_tokens >= 1
    listed = cli("models", "list", "--home", str(shared_server.settings.home), "--json")
    assert listed.exit_code == 0, listed.output
    assert {r["name"] for r in json.loads(listed.output)["registered"]} >= {f"my-{f}" for f in FAMILIES}


@pytest.fixture(scope="module")
def tuned(added, shared_server, tmp_path_factory) -> str:
    """A fine-tuned model of the Qwen3 base added by the CLI, trained through the API."""
    client = shared_server.client()
    path = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_lines(10))
    train = client.files.create(file=path.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="my-qwen3",
        training_file=train.id,
        suffix="own",
        hyperparameters={"n_epochs": 1, "batch_size": 4},
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    return job.fine_tuned_model


@pytest.mark.one_database  # checks training and export, the same on either database
def test_fine_tune_serve_and_export(tuned, shared_server, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunehouse.export import export_model

    assert tuned.startswith("ft:my-qwen3:")
    client = shared_server.client()
    answer = client.chat.completions.create(
        model=tuned, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None
    out = export_model(shared_server.settings, tuned, tmp_path / "merged", merged=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    # Removing a base that fine-tuned models are built on is refused.
    busy = cli("models", "remove", "my-qwen3", "--home", str(shared_server.settings.home))
    assert busy.exit_code != 0 and "in use" in busy.output


@pytest.mark.one_database  # checks training and export, the same on either database
@NEEDS_CONVERTER
def test_add_a_gguf_file(tuned, shared_server, tmp_path):
    """The fine-tune exported as GGUF (llama.cpp's converter) comes back in as a base model of its own."""
    from tunehouse.export import export_model

    out = export_model(shared_server.settings, tuned, tmp_path / "gguf", format="gguf", outtype="f16")
    gguf = next(out.glob("*.gguf"))
    home = str(shared_server.settings.home)
    result = cli("models", "add", str(gguf), "--name", "qwen3-from-gguf", "--home", home, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)  # the converter's progress bars go to stderr
    assert row["architecture"] == "Qwen3ForCausalLM" and row["source"] == str(gguf)
    answer = shared_server.client().chat.completions.create(
        model="qwen3-from-gguf", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert answer.model == "qwen3-from-gguf"


def test_organizations_allowed(shared_server, tiny_family_dirs):
    other_key = create_org_key(shared_server.settings, "other-org")
    allowed_key = create_org_key(shared_server.settings, "allowed-org")
    with shared_server.http() as http:
        r = http.post(
            "/v1/organization/base_models",
            json={
                "path": str(tiny_family_dirs["llama"]),
                "name": "private-llama",
                "organizations": ["allowed-org"],
            },
        )
        assert r.status_code == 200, r.text
        # Organization admin keys may not register models (they would read server paths).
        with httpx.Client(
            base_url=shared_server.url, headers={"Authorization": f"Bearer {allowed_key}"}
        ) as org_http:
            refused = org_http.post(
                "/v1/organization/base_models", json={"path": str(tiny_family_dirs["llama"])}
            )
            assert refused.status_code == 403
    allowed, other = shared_server.client(allowed_key), shared_server.client(other_key)
    assert "private-llama" in [m.id for m in allowed.models.list().data]
    assert "private-llama" not in [m.id for m in other.models.list().data]
    assert "my-llama" in [m.id for m in other.models.list().data]  # added for all organizations
    messages = [{"role": "user", "content": "Hi"}]
    allowed.chat.completions.create(model="private-llama", messages=messages, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model="private-llama", messages=messages, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        other.fine_tuning.jobs.create(model="private-llama", training_file="file-x")
    assert e.value.body["param"] == "model"


def test_survives_a_restart_and_remove(added, shared_server):
    """A second server on the same home (a restart) serves the registered models; remove then
    deletes the row and the copied weights."""
    with LiveServer(shared_server.settings) as again:
        assert "my-gemma" in [m.id for m in again.client().models.list().data]
    path = Path(added["gemma"]["path"])
    with shared_server.http() as http:
        r = http.delete("/v1/organization/base_models/my-gemma")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert http.get("/v1/organization/base_models/my-gemma").status_code == 404
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        shared_server.client().models.retrieve("my-gemma")


def _nothing_left(settings) -> None:
    from sqlalchemy import func, select

    from tunehouse.store.engine import Database
    from tunehouse.store.registry import registry_dir
    from tunehouse.store.tables import RegisteredBaseModel

    db = Database(settings.db_url)
    with db.session() as s:
        names = set(s.scalars(select(RegisteredBaseModel.name)))
        assert s.scalar(select(func.count()).select_from(RegisteredBaseModel)) == len(names)
    db.dispose()
    assert not any(n.startswith("bad") for n in names)
    on_disk = {p.name for p in registry_dir(settings).iterdir()} if registry_dir(settings).exists() else set()
    assert not any(n.startswith(".") for n in on_disk), on_disk  # no partial copies
    assert len(on_disk) == len(names)


def test_bad_input_is_refused_naming_the_problem(shared_server, tiny_family_dirs, tmp_path):
    home = str(shared_server.settings.home)

    def refused(path, *extra) -> str:
        result = cli("models", "add", str(path), "--name", "bad", "--home", home, *extra)
        assert result.exit_code != 0, result.output
        return " ".join(result.output.split())

    assert "no config.json" in refused(tmp_path)
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "not-a-real-arch"}')
    assert "Unsupported architecture" in refused(tmp_path / "unknown")
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text('{"model_type": "vit"}')
    assert "cannot load it as a causal language model" in refused(tmp_path / "encoder")
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 16384,
                "intermediate_size": 53248,
                "num_hidden_layers": 126,
                "num_attention_heads": 128,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
            }
        )
    )
    assert "too large for this machine" in refused(tmp_path / "huge")
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    assert "cannot be read as a GGUF model" in refused(bad_gguf)
    # No chat template: refused unless one is given.
    plain = tmp_path / "no-template"
    shutil.copytree(tiny_family_dirs["mistral"], plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert "no chat template" in refused(plain)
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ok = cli(
        "models", "add", str(plain), "--name", "templated", "--chat-template", str(template), "--home", home
    )
    assert ok.exit_code == 0, ok.output
    # A name already taken.
    taken = cli("models", "add", str(plain), "--name", "templated", "--home", home)
    assert taken.exit_code != 0 and "already registered" in taken.output
    _nothing_left(shared_server.settings)
