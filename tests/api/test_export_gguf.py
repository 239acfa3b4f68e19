"""GGUF export, export scoping and the first job's time estimate, on one tiny job of a fresh server.

- The server is new (no throughput measured in its home): the job's validation probes this
  machine's training speed once, and the running job carries an `estimated_finish`.
- `GET /v1/models/{model}/export?format=gguf` (and `tunehouse export --format gguf`) write the merged
  weights with llama.cpp's converter; transformers' GGUF loader reads them back, and their logits
  match the merged model's (f16/bf16 closely, q8_0 within a looser bound).
- Another organization's key gets a 404 for the model, as for every other read.
- A truncated or foreign GGUF file gets a clear error where GGUF files are read.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.api.conftest import NEEDS_CONVERTER, LiveServer, arithmetic_lines, create_tenant_key, write_jsonl
from tests.conftest import TINY_MODEL, fresh_database, make_settings
from tunehouse.store.gguf_file import CorruptGGUF, check_gguf

pytestmark = pytest.mark.timeout(300)

# Token ids to compare logits on: a chat prompt of the tiny model's (SmolLM2's) tokenizer.
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture(scope="module")
def shared_server(tiny_model_dir, tmp_path_factory):
    """A fresh server with the throughput probe on (tests/conftest.py turns it off elsewhere)."""
    home = tmp_path_factory.mktemp("home")
    with fresh_database(home) as url:
        settings = make_settings(home, tiny_model_dir, url)
        settings.throughput_probe = True
        with LiveServer(settings) as live:
            yield live


@pytest.fixture(scope="module")
def trained(shared_server, tmp_path_factory):
    """One few-step job of the default organization, watched while it runs."""
    client = shared_server.client()
    assert not (shared_server.settings.home / "throughput.json").exists()  # a fresh install
    path = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", arithmetic_lines(12))
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}},
    )
    seen: list[tuple[str, int | None]] = []
    deadline = time.time() + 240
    while time.time() < deadline:
        j = client.fine_tuning.jobs.retrieve(job.id)
        seen.append((j.status, j.estimated_finish))
        if j.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)  # training the tiny model takes a few seconds on a quiet machine
    assert j.status == "succeeded", j.error
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    return j, seen, events


def test_first_job_gets_an_estimated_finish(shared_server, trained):
    job, seen, events = trained
    running = [eta for status, eta in seen if status == "running"]
    assert running, f"never saw the job running: {seen}"
    etas = [eta for eta in running if eta is not None]
    assert etas, f"estimated_finish stayed null while running: {seen}"
    assert all(eta >= job.created_at for eta in etas)
    # The probe measured this machine once and cached it; the finished job then measured itself.
    probe = json.loads((shared_server.settings.home / "throughput-probe.json").read_text())
    assert probe[TINY_MODEL] > 0
    assert any("Measuring this machine's training speed" in m for m in events)
    assert any("tokens/s" in m for m in events), events  # the validation event states the estimate
    assert job.estimated_finish is None  # null once the job is no longer running


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits[0].float()


@pytest.fixture(scope="module")
def merged(shared_server, trained, tmp_path_factory):
    """The merged model, as the Hugging Face export over HTTP gives it (a tar of the folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job, _, _ = trained
    r = shared_server.http().get(
        f"/v1/models/{job.fine_tuned_model}/export", params={"format": "merged"}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    out = tmp_path_factory.mktemp("merged")
    with tarfile.open(fileobj=io.BytesIO(r.content)) as t:
        t.extractall(out, filter="data")
    folder = next(out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _logits(model, tokenizer), tokenizer


def _gguf_logits(folder: Path, name: str, tokenizer) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return _logits(model, tokenizer)


@pytest.mark.one_database
@NEEDS_CONVERTER
def test_gguf_over_http_matches_the_merged_model(shared_server, trained, merged, tmp_path):
    from gguf import GGUFReader

    job, _, _ = trained
    reference, tokenizer = merged
    r = shared_server.http().get(
        f"/v1/models/{job.fine_tuned_model}/export", params={"format": "gguf", "outtype": "f16"}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert r.content[:4] == b"GGUF"
    (tmp_path / "model-f16.gguf").write_bytes(r.content)
    logits = _gguf_logits(tmp_path, "model-f16.gguf", tokenizer)
    assert logits.shape == reference.shape
    diff = (logits - reference).abs().max().item()
    assert diff < 0.02, f"f16: logits differ by {diff} (scale {reference.abs().max().item():.3f})"
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    # The chat template training rendered with travels inside the file.
    fields = GGUFReader(tmp_path / "model-f16.gguf").fields
    template = fields["tokenizer.chat_template"]
    assert bytes(template.parts[template.data[0]]).decode() == tokenizer.chat_template

    # A truncated copy (an interrupted download) and a file that is not GGUF: a clear error where
    # GGUF files are read, not numpy's.
    (tmp_path / "cut.gguf").write_bytes(r.content[:65536])
    with pytest.raises(CorruptGGUF, match="truncated"):
        check_gguf(tmp_path / "cut.gguf")
    (tmp_path / "x.gguf").write_text("not a model")
    with pytest.raises(CorruptGGUF, match="not a GGUF file"):
        check_gguf(tmp_path / "x.gguf")


@pytest.mark.one_database
@NEEDS_CONVERTER
def test_cli_gguf_export_quantized(shared_server, trained, merged, tmp_path, monkeypatch):
    from tunehouse.cli.main import app

    job, _, _ = trained
    reference, tokenizer = merged
    settings = shared_server.settings
    if settings.database_url:
        monkeypatch.setenv("TUNEHOUSE_DATABASE_URL", settings.database_url)
    out = tmp_path / "gguf"
    args = ["export", job.fine_tuned_model, str(out), "--format", "gguf", "--outtype", "q8_0"]
    r = CliRunner().invoke(app, [*args, "--home", str(settings.home)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "tunehouse.json").read_text())
    assert info["format"] == "gguf" and info["gguf_type"] == "q8_0" and info["model"] == job.fine_tuned_model
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-q8_0.gguf", "tunehouse.json"]
    # q8_0 rounds every weight to 8 bits per block of 32: close, within a looser bound.
    logits = _gguf_logits(out, "model-q8_0.gguf", tokenizer)
    diff = (logits - reference).abs().max().item()
    assert diff < 0.1, f"q8_0: logits differ by {diff} (scale {reference.abs().max().item():.3f})"
    # --outtype without --format gguf, and an unknown type: refused before any work.
    r = CliRunner().invoke(app, ["export", job.fine_tuned_model, str(tmp_path / "x"), "--outtype", "q8_0"])
    assert r.exit_code == 1 and "--format gguf" in r.output
    r = CliRunner().invoke(app, [*args[:5], "--outtype", "q4_k", "--home", str(settings.home)])
    assert r.exit_code == 1 and "q4_k" in r.output and not (tmp_path / "x").exists()


def test_export_is_scoped_to_the_organization(shared_server, trained):
    job, _, _ = trained
    other, _ = create_tenant_key(shared_server.settings, org="someone-else")
    for params in ({"format": "gguf"}, {"format": "adapter"}, {}):
        r = shared_server.http(other).get(f"/v1/models/{job.fine_tuned_model}/export", params=params)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
    # The owner's errors: a base model, an unknown format or type, each naming its parameter.
    http = shared_server.http()
    r = http.get(f"/v1/models/{TINY_MODEL}/export")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = http.get(f"/v1/models/{job.fine_tuned_model}/export", params={"format": "onnx"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    r = http.get(f"/v1/models/{job.fine_tuned_model}/export", params={"format": "gguf", "outtype": "q4_k"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "outtype"
    r = http.get(f"/v1/models/{job.fine_tuned_model}/export", params={"outtype": "q8_0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "outtype"
    # Nothing is left behind in the home's export folder.
    exports = shared_server.settings.home / "exports"
    assert not exports.exists() or not any(exports.iterdir())
