"""End to end with the real default model: the demo's workflow over the SDK. The job scores its
checkpoints with the example eval's exact-JSON grader (python, in the sandbox) and keeps the best;
then OpenAI's Evals API judges base and fine-tune on held-out prompts, one run each (the fine-tune
must answer in the trained JSON format; the base does not)."""

import json
import time
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer, wait_for_job
from tests.conftest import MODELS_DIR
from tunehouse.config import Settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fine_tune_the_default_model_learns_the_format(tmp_path, default_model_dir):
    settings = Settings(home=tmp_path / "home", models_dir=MODELS_DIR, admin_key="sk-e2e")
    spec = json.loads((EXAMPLES / "tickets_eval.json").read_text())
    exact_json = {k: v for k, v in spec["eval"]["testing_criteria"][0].items() if k != "pass_threshold"}
    items = [
        {"item": json.loads(line)}
        for line in (EXAMPLES / "tickets_heldout_items.jsonl").read_text().splitlines()
        if line
    ]
    with LiveServer(settings) as live:
        client = live.client()
        train = client.files.create(file=(EXAMPLES / "tickets_train.jsonl").open("rb"), purpose="fine-tune")
        valid = client.files.create(file=(EXAMPLES / "tickets_valid.jsonl").open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="smollm2-135m-instruct",
            training_file=train.id,
            validation_file=valid.id,
            suffix="tickets",
            seed=1,
            # The demo's settings, chosen by the sweep recorded in examples/README.md.
            method={
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 5}
                },
            },
            extra_body={
                "evaluation": {"grader": exact_json, "select_checkpoint": "best", "general_checks": True}
            },
        )
        job = wait_for_job(client, job.id, timeout=1500)
        assert job.status == "succeeded", job.error
        evaluation = job.model_extra["evaluation"]
        # The fine-tune's chosen checkpoint answers the validation tickets far better than its base.
        assert evaluation["chosen"]["valid_score"] >= 0.6 > 0.2 >= evaluation["base_score"], evaluation
        assert {"forgetting", "safety"} <= set(evaluation)

        ev = client.evals.create(**spec["eval"])
        runs = {}
        for model in ("smollm2-135m-instruct", job.fine_tuned_model):
            source = {
                **spec["run"]["data_source"],
                "model": model,
                "source": {"type": "file_content", "content": items},
            }
            runs[model] = client.evals.runs.create(ev.id, data_source=source)
        deadline = time.time() + 600
        for model, run in runs.items():
            while run.status not in ("completed", "failed", "canceled") and time.time() < deadline:
                time.sleep(1)
                run = client.evals.runs.retrieve(run.id, eval_id=ev.id)
            runs[model] = run
    base, ft = runs["smollm2-135m-instruct"], runs[job.fine_tuned_model]
    n = len(items)
    assert base.status == ft.status == "completed", (base.error, ft.error)
    assert base.result_counts.total == ft.result_counts.total == n
    assert ft.result_counts.errored == 0
    exact = {
        name: next(
            c.passed for c in run.per_testing_criteria_results if c.testing_criteria.startswith("exact JSON-")
        )
        for name, run in (("base", base), ("ft", ft))
    }
    assert exact["ft"] >= n * 0.6 and exact["ft"] > exact["base"], exact
    assert exact["base"] <= n * 0.2
