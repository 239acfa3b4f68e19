"""The dashboard in a real browser: headless system Chromium driven by Playwright (sync API).

One server, one browser and one signed-in page for the whole module: the tests run in order and
share what earlier ones made (the uploaded file, the trained job). Screenshots of the main pages go
to test-artifacts/screenshots (TUNEHOUSE_SCREENSHOTS to change it; ignored by git)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.api.conftest import LiveServer, chat_line, create_org_key, write_jsonl
from tests.conftest import REPO, TINY_MODEL, make_settings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
SHOTS = Path(os.environ.get("TUNEHOUSE_SCREENSHOTS", ARTIFACTS / "screenshots"))
ADMIN = "sk-test-admin"

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # a dev dependency; CI must have it
    sync_playwright = None

# CI installs both (scripts/setup.sh, as root); elsewhere a missing browser is a skip, said aloud.
_missing = (
    "the playwright package is not installed"
    if sync_playwright is None
    else f"no Chromium at {CHROMIUM} (scripts/setup.sh installs it as root)"
    if not CHROMIUM.exists()
    else None
)
if _missing and os.environ.get("CI") == "true":
    raise RuntimeError(f"browser tests need a browser: {_missing}")
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

LINES = [chat_line(f"What is {i} + {i}?", f"{2 * i}") for i in range(40)]


@pytest.fixture(scope="module")
def web_server(tiny_model_dir, tmp_path_factory):
    # SQLite only: the browser checks the pages, which read the same API on either database.
    home = tmp_path_factory.mktemp("home")
    with LiveServer(make_settings(home, tiny_model_dir, None)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, web_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.requests = requests
    yield pg
    context.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    if SHOTS.is_relative_to(ARTIFACTS):
        (ARTIFACTS / ".gitignore").write_text("*\n")
    return SHOTS


def sign_in(pg, server: LiveServer, key: str) -> None:
    pg.goto(f"{server.url}/dashboard/")
    pg.get_by_label("API key").fill(key)
    pg.get_by_role("button", name="Sign in").click()
    expect(pg.get_by_role("heading", name="Fine-tuning jobs")).to_be_visible()


def test_docs_and_schema_need_a_key(web_server):
    with httpx.Client(base_url=web_server.url) as anon:
        assert anon.get("/docs").status_code == 404
        assert anon.get("/redoc").status_code == 404
        assert anon.get("/openapi.json").status_code == 401
        page = anon.get("/dashboard/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert anon.get("/dashboard/..%2Fconfig.py").status_code == 404
    with web_server.http() as http:
        schema = http.get("/openapi.json").json()
        assert "/v1/fine_tuning/mask_preview" in schema["paths"]
        assert not any(p.startswith("/dashboard") for p in schema["paths"])


def test_sign_in_keeps_the_key_out_of_urls(page, web_server, shots):
    page.goto(f"{web_server.url}/dashboard/")
    page.get_by_label("API key").fill("sk-wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("That key is not valid.")).to_be_visible()
    sign_in(page, web_server, ADMIN)
    assert page.evaluate("sessionStorage.getItem('tunehouse.key')") == ADMIN
    expect(page.get_by_role("link", name="Organization")).to_be_visible()  # an admin key
    assert not any(ADMIN in url for url in page.requests)


def test_upload_shows_located_errors_and_the_mask(page, web_server, tmp_path, shots):
    broken = LINES[:5] + ['{"messages": [{"role": "user", "content": "unterminated"}'] + LINES[5:8]
    path = write_jsonl(tmp_path / "broken.jsonl", broken)
    page.goto(f"{web_server.url}/dashboard/#/files")
    page.get_by_label("File", exact=True).set_input_files(str(path))
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("heading", name="broken.jsonl")).to_be_visible()
    assert page.locator("#upload-progress").count() == 0  # moved on to the file's page
    # The embedded model's tokenizer is the tiny model's: check with the tiny model.
    page.get_by_label("Base model (tokenizer)").select_option(TINY_MODEL)
    page.get_by_role("button", name="Check again").click()
    errors = page.get_by_role("table", name="Errors")
    expect(errors).to_be_visible()
    row = errors.locator("tbody tr").first
    expect(row.locator("td").nth(0)).to_have_text("6")  # the broken line, located
    expect(row).to_contain_text("invalid_json")

    page.get_by_label("Line", exact=True).fill("2")
    page.get_by_role("button", name="Show tokens").click()
    preview = page.locator("#mask-preview")
    expect(preview).to_contain_text("Line 2:")
    trained = "".join(preview.locator(".tok.trained").all_inner_texts())
    context = "".join(preview.locator(".tok:not(.trained)").all_inner_texts())
    assert "2" in trained and "What is 1 + 1?" in context and "What is" not in trained
    page.screenshot(path=str(shots / "file-check.png"), full_page=True)


def _points(page) -> int:
    return int(page.locator("#loss-chart").get_attribute("data-points"))


def test_create_a_job_and_watch_the_loss_curve_grow(page, web_server, tmp_path, shots):
    client = web_server.client()
    train = client.files.create(
        file=write_jsonl(tmp_path / "train.jsonl", LINES).open("rb"), purpose="fine-tune"
    )
    valid = client.files.create(
        file=write_jsonl(tmp_path / "valid.jsonl", LINES[:6]).open("rb"), purpose="fine-tune"
    )
    page.goto(f"{web_server.url}/dashboard/#/jobs/new")
    page.get_by_label("Base model").select_option(TINY_MODEL)
    page.get_by_label("Training file").select_option(train.id)
    page.get_by_label("Validation file").select_option(valid.id)
    page.get_by_label("Epochs").fill("3")
    page.get_by_label("Batch size").fill("1")
    page.get_by_label("Learning rate multiplier").fill("2")
    page.get_by_role("button", name="Estimate cost and time").click()
    expect(page.get_by_role("heading", name="Estimate")).to_be_visible()
    page.get_by_role("button", name="Create job").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Job ftjob-"))).to_be_visible()
    job_id = page.url.rsplit("/", 1)[1]

    # The page itself polls: the chart gains points with no reload while the job runs.
    page.wait_for_function("() => +document.querySelector('#loss-chart').dataset.points > 0", timeout=180_000)
    first = _points(page)
    page.wait_for_function(
        f"() => +document.querySelector('#loss-chart').dataset.points > {first}", timeout=120_000
    )
    assert client.fine_tuning.jobs.retrieve(job_id).status in ("running", "succeeded")
    expect(page.locator("#main dd").first).to_have_text("succeeded", timeout=240_000)
    assert _points(page) == 120  # 40 lines × 3 epochs, batch 1
    assert int(page.locator("#loss-chart").get_attribute("data-valid-points")) > 0
    expect(page.get_by_role("table", name="Checkpoints").locator("tbody tr")).not_to_have_count(0)
    page.screenshot(path=str(shots / "job.png"), full_page=True)
    page.job_id = job_id


def test_playground_streams_base_and_fine_tune_side_by_side(page, web_server, shots):
    ft = web_server.client().fine_tuning.jobs.retrieve(page.job_id).fine_tuned_model
    page.goto(f"{web_server.url}/dashboard/#/jobs/{page.job_id}")
    page.get_by_role("link", name="Try it in the playground").click()
    expect(page.get_by_label("Model B", exact=True)).to_have_value(ft)
    expect(page.get_by_label("Model A", exact=True)).to_have_value(TINY_MODEL)
    page.get_by_label("System message").fill("Answer briefly.")
    page.get_by_label("Prompt").fill("What is 3 + 3?")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="Send to both").click()
    client = web_server.client()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 3 + 3?"},
    ]
    for box, model in (("#answer-a", TINY_MODEL), ("#answer-b", ft)):
        expect(page.locator(box)).to_have_attribute("data-done", "true", timeout=120_000)
        want = (
            client.chat.completions.create(
                model=model, messages=messages, temperature=0, max_completion_tokens=8
            )
            .choices[0]
            .message.content
        )
        assert page.locator(box).text_content() == (want or "")  # greedy: the same answer, streamed
    page.screenshot(path=str(shots / "playground.png"), full_page=True)


def test_other_pages_render(page, web_server, shots):
    for route, heading in (("evals", "Evals"), ("usage", "Usage and cost"), ("organization", "Organization")):
        page.goto(f"{web_server.url}/dashboard/#/{route}")
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        expect(page.get_by_role("heading", name="Something went wrong")).to_have_count(0)
        page.screenshot(path=str(shots / f"{route}.png"), full_page=True)


def test_another_organization_cannot_open_the_job(browser, page, web_server):
    other = create_org_key(web_server.settings, "other-org")
    context = browser.new_context()
    pg = context.new_page()
    try:
        sign_in(pg, web_server, other)
        expect(pg.get_by_role("link", name="Organization")).to_be_visible()  # its own admin
        expect(pg.get_by_role("table", name="Jobs")).not_to_contain_text(page.job_id)
        pg.goto(f"{web_server.url}/dashboard/#/jobs/{page.job_id}")
        expect(pg.get_by_role("heading", name="Job not found")).to_be_visible()
        expect(pg.get_by_role("alert").first).to_contain_text("Could not find fine-tuning job")
        assert json.dumps(pg.evaluate("document.body.innerText")).count("train loss") == 0
    finally:
        context.close()


def test_eval_runs_show_base_and_fine_tune_scores_and_verdicts(page, web_server, shots):
    client = web_server.client()
    ft = client.fine_tuning.jobs.retrieve(page.job_id).fine_tuned_model
    ev = client.evals.create(
        name="sums",
        data_source_config={
            "type": "custom",
            "item_schema": {
                "type": "object",
                "properties": {"q": {"type": "string"}, "a": {"type": "string"}},
            },
            "include_sample_schema": True,
        },
        testing_criteria=[
            {
                "type": "string_check",
                "name": "exact",
                "input": "{{sample.output_text}}",
                "reference": "{{item.a}}",
                "operation": "eq",
            }
        ],
    )
    items = [{"item": {"q": f"What is {i} + {i}?", "a": str(2 * i)}} for i in range(3)]
    runs = {}
    for name, model in (("base run", TINY_MODEL), ("fine-tune run", ft)):
        runs[name] = client.evals.runs.create(
            ev.id,
            name=name,
            data_source={
                "type": "completions",
                "model": model,
                "input_messages": {
                    "type": "template",
                    "template": [{"role": "user", "content": "{{item.q}}"}],
                },
                "sampling_params": {"temperature": 0, "max_completion_tokens": 4},
                "source": {"type": "file_content", "content": items},
            },
        )
    page.goto(f"{web_server.url}/dashboard/#/evals/{ev.id}")
    table = page.get_by_role("table", name="Runs: pass rate per criterion")
    # The page shows what the API says once both runs are done (reloaded until then).
    for _ in range(120):
        done = [client.evals.runs.retrieve(r.id, eval_id=ev.id) for r in runs.values()]
        if all(r.status == "completed" for r in done):
            break
        page.wait_for_timeout(1000)
    page.reload()
    for run in done:
        row = table.locator("tbody tr", has_text=run.name)
        expect(row).to_contain_text("completed")
        c = run.per_testing_criteria_results[0]
        expect(row).to_contain_text(f"({c.passed}/{c.passed + c.failed})")
    expect(table.locator("thead")).to_contain_text("exact")
    page.screenshot(path=str(shots / "eval.png"), full_page=True)

    table.get_by_role("link", name="fine-tune run").click()
    outputs = page.get_by_role("table", name="Output items")
    expect(outputs.locator("tbody tr")).to_have_count(3)
    expect(outputs).to_contain_text("What is 2 + 2?")
    expect(outputs.locator("tbody tr").first).to_contain_text(re.compile(r"exact: (pass|fail)"))


def test_pause_resume_and_cancel_from_the_job_page(page, web_server, tmp_path):
    client = web_server.client()
    train = client.files.create(
        file=write_jsonl(tmp_path / "train.jsonl", LINES).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL, training_file=train.id, hyperparameters={"n_epochs": 20, "batch_size": 1}
    )
    page.goto(f"{web_server.url}/dashboard/#/jobs/{job.id}")
    status = page.locator("#main dd").first
    # Pause is offered once the job is queued or running (not while its files are checked).
    expect(status).to_have_text(re.compile("^(queued|running)$"), timeout=60_000)
    page.get_by_role("button", name="Pause").click()
    expect(status).to_have_text("paused", timeout=120_000)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    expect(page.get_by_role("button", name="Pause")).to_be_disabled()
    page.get_by_role("button", name="Resume").click()
    expect(status).to_have_text("running", timeout=60_000)
    # The jobs list shows how far a running job has got.
    page.goto(f"{web_server.url}/dashboard/#/jobs")
    bar = page.get_by_role("progressbar", name=re.compile(rf"^{job.id}: step \d+ of 800$"))
    expect(bar).to_be_visible(timeout=60_000)
    page.goto(f"{web_server.url}/dashboard/#/jobs/{job.id}")
    page.get_by_role("button", name="Cancel").click()
    expect(status).to_have_text("cancelled", timeout=120_000)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_a_large_file_goes_up_in_parts(page, web_server, tmp_path):
    # The threshold (8 MB) lowered for the test: anything over 2,000 bytes goes in 1,000-byte parts.
    if not page.url.startswith(web_server.url) or not page.evaluate(
        "sessionStorage.getItem('tunehouse.key')"
    ):
        sign_in(page, web_server, ADMIN)  # when run on its own
    page.evaluate("sessionStorage.setItem('tunehouse.chunkBytes', '2000')")
    path = write_jsonl(tmp_path / "parts.jsonl", LINES[:40])
    size = path.stat().st_size
    assert size > 4000
    page.goto(f"{web_server.url}/dashboard/#/files")
    expect(page.get_by_role("form", name="Upload a file")).to_have_attribute("data-chunk-bytes", "2000")
    page.requests.clear()
    page.get_by_label("File", exact=True).set_input_files(str(path))
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("heading", name="parts.jsonl")).to_be_visible()
    expect(page.locator("dl.kv dd").nth(2)).to_have_text(f"{size:,}")
    parts = [u for u in page.requests if re.search(r"/v1/uploads/upload_\w+/parts$", u)]
    assert len(parts) == -(-size // 1000)  # sequential parts, each 1,000 bytes but the last
    assert not any(u.endswith("/v1/files") for u in page.requests)
    file_id = page.url.rsplit("/", 1)[1]
    assert web_server.client().files.content(file_id).read() == path.read_bytes()
    page.evaluate("sessionStorage.removeItem('tunehouse.chunkBytes')")


def test_a_reinforcement_job_charts_its_rewards(page, web_server, tmp_path):
    client = web_server.client()
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)})
        for i in range(10)
    ]
    train = client.files.create(
        file=write_jsonl(tmp_path / "rft.jsonl", lines).open("rb"), purpose="fine-tune"
    )
    grader = {
        "type": "python",
        "name": "length",
        "source": "def grade(sample, item):\n    return (len(sample['output_text']) % 10) / 10\n",
    }
    hyper = {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5, "max_completion_tokens": 8}
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=train.id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyper}},
    )
    page.goto(f"{web_server.url}/dashboard/#/jobs/{job.id}")
    chart = page.get_by_role("img", name="Reward curves: train and validation reward by step")
    expect(chart).to_be_visible()
    expect(page.locator("#main dd").first).to_have_text("succeeded", timeout=240_000)
    expect(chart).to_have_attribute("data-points", "5", timeout=30_000)
    expect(page.locator("#loss-summary")).to_contain_text("Step 5 of 5: train reward")
