"""`tunehouse eval`: one eval file, two models, a side-by-side table, against a live server."""

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_MODEL
from tunehouse.cli.main import app

EVAL_FILE = {
    "eval": {
        "name": "echo",
        "data_source_config": {
            "type": "custom",
            "item_schema": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"],
            },
            "include_sample_schema": True,
        },
        "testing_criteria": [
            {
                "type": "string_check",
                "name": "says anything",
                "input": "{{sample.output_text}}",
                "reference": "",
                "operation": "like",
            },
            {
                "type": "string_check",
                "name": "exact answer",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "operation": "eq",
            },
        ],
    },
    "run": {
        "data_source": {
            "type": "completions",
            "input_messages": {
                "type": "template",
                "template": [{"role": "user", "content": "{{item.question}}"}],
            },
            "sampling_params": {"temperature": 0, "max_completion_tokens": 4},
        }
    },
}


@pytest.mark.one_database
def test_eval_prints_models_side_by_side(shared_server, tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(EVAL_FILE))
    items = tmp_path / "items.jsonl"
    items.write_text(
        "\n".join(json.dumps({"question": f"{i} + {i}?", "answer": str(2 * i)}) for i in range(5))
    )
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(eval_file),
            "--items",
            str(items),
            "-m",
            TINY_MODEL,
            "-m",
            TINY_MODEL,
            "--base-url",
            f"{shared_server.url}/v1",
            "--api-key",
            shared_server.settings.admin_key,
            "--timeout",
            "300",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count(f"{TINY_MODEL}") >= 2 and "(completed)" in out
    # "says anything" passes whatever the tiny model says; "exact answer" is unlikely to.
    says = next(line for line in out.splitlines() if "says anything" in line)
    assert says.count("100% (5/5)") == 2
    assert "all criteria" in out and "tokens" in out
    client = shared_server.client()
    runs = [
        r for ev in client.evals.list().data if ev.name == "echo" for r in client.evals.runs.list(ev.id).data
    ]
    assert len(runs) == 2 and all(r.result_counts.total == 5 for r in runs)


def test_eval_file_must_hold_eval_and_run(tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps({"testing_criteria": []}))
    result = CliRunner().invoke(app, ["eval", str(eval_file), "-m", TINY_MODEL])
    assert result.exit_code != 0
    assert "eval" in result.output
