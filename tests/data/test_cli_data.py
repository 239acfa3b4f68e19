"""`tunehouse data check` through typer's CliRunner, mounted the way the main app mounts it."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from tunehouse.cli.data import data_app

from .helpers import good, write_lines

app = typer.Typer()
app.add_typer(data_app, name="data")
runner = CliRunner()


@pytest.fixture
def files(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [good(i) for i in range(12)])
    bad = write_lines(
        tmp_path / "bad.jsonl",
        [good(i) for i in range(12)] + ["{", {"messages": [{"role": "user", "content": "x"}]}],
    )
    valid = write_lines(tmp_path / "valid.jsonl", [good(3), good(99)])
    return train, bad, valid


def invoke(*args):
    return runner.invoke(app, ["data", "check", *map(str, args)])


def test_ok_file_exits_0_with_summary(files, default_model_dir):
    train, _, valid = files
    result = invoke(train, "--validation", valid, "--model", default_model_dir, "--tokens-per-second", "1000")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "12 examples" in out and "No errors" in out
    assert "billable tokens" in out and "epochs: 8 (auto)" in out  # 100 // 12
    assert "train_validation_overlap" in out  # good(3) is in both files


def test_errors_exit_1_and_list_lines(files, default_model_dir):
    _, bad, _ = files
    result = invoke(bad, "--model", default_model_dir)
    assert result.exit_code == 1, result.output
    assert "invalid_json" in result.stdout and "13" in result.stdout
    assert "example_missing_assistant_message" in result.stdout and "14" in result.stdout


def test_json_output_parses(files, default_model_dir):
    train, bad, valid = files
    result = invoke(bad, "--validation", valid, "--model", default_model_dir, "--epochs", "2", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["n_examples"] == 14
    assert [(e["code"], e["line"]) for e in report["errors"]] == [
        ("invalid_json", 13),
        ("example_missing_assistant_message", 14),
    ]
    assert report["estimate"]["n_epochs"] == 2
    assert report["validation"]["n_examples"] == 2
    assert report["stats"]["tokens_per_example"]["max"] > 0


def test_format_only_needs_no_model(files):
    train, _, _ = files
    result = invoke(train, "--format-only", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] and report["estimate"] is None and report["model"] is None


@pytest.mark.parametrize(
    "extra",
    [["--epochs", "many"], ["--method", "rl"], ["--model", "no-such-model"]],
)
def test_bad_usage_exits_2(files, extra):
    train, _, _ = files
    result = invoke(train, *extra)
    assert result.exit_code == 2, result.output


def test_missing_file_exits_2(tmp_path):
    result = invoke(tmp_path / "nope.jsonl", "--format-only")
    assert result.exit_code == 2
    assert "no such file" in result.stderr


def test_unreadable_file_exits_2(tmp_path):
    result = invoke(tmp_path, "--format-only")  # a folder, not a file
    assert result.exit_code == 2
