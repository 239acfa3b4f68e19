"""Token statistics with the real default tokenizer, truncation, duplicates, overlap and the estimate."""

from __future__ import annotations

import pytest

from tunehouse.data.analysis import (
    DEFAULT_CONTEXT_LENGTH,
    analyze,
    auto_n_epochs,
    check_files,
    context_length_for,
)
from tunehouse.data.validation import validate_file

from .helpers import good, good_pref, with_bad_line, write_lines

HI = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
}
# SmolLM2's ChatML, counted by hand:
#   <|im_start|> system \n Be ␣brief . <|im_end|> \n          8
#   <|im_start|> user \n hi <|im_end|> \n                      6
#   <|im_start|> ass istant \n hello <|im_end|> \n             7  → 21 tokens,
# of which "hello <|im_end|> \n" (3) are trained.
HI_TOKENS, HI_TRAINED = 21, 3

ESSAY = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch and the sun "
    "sets slowly behind the hills, painting the sky in orange and purple as the evening birds return "
    "to their nests and the village lights come on one by one along the winding river road"
)


def essay_example(text: str, answer: str = "A pastoral evening scene.") -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Summarise: {text}"},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_auto_n_epochs_follows_openai():
    assert [auto_n_epochs(n) for n in (1, 4, 10, 33, 34, 1000, 8333, 8334, 9000, 30000)] == [
        25,
        25,
        10,
        3,
        3,
        3,
        3,
        2,
        2,
        1,
    ]


def test_context_length_is_the_models_own(default_model_dir, tmp_path):
    assert context_length_for(default_model_dir) == 8192  # SmolLM2's max_position_embeddings
    assert context_length_for(default_model_dir, cap=2048) == 2048
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 1024}')
    assert context_length_for(tmp_path) == 1024
    (tmp_path / "config.json").write_text("{}")
    assert context_length_for(tmp_path) == DEFAULT_CONTEXT_LENGTH == 2048


def test_estimate_matches_a_hand_count(tmp_path, tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [HI] * 10)
    report = check_files(
        path, validation=None, tokenizer=tokenizer, context_length=2048, tokens_per_second=100.0
    )
    assert report.ok
    stats, est = report.stats, report.estimate
    assert stats["tokens_per_example"]["min"] == stats["tokens_per_example"]["max"] == HI_TOKENS
    assert stats["trained_tokens_per_example"]["total"] == 10 * HI_TRAINED
    assert stats["messages_per_example"]["median"] == 3
    # 10 examples → auto epochs = 100 // 10 = 10; billable = 10 × 21 × 10 = 2,100 tokens
    assert est["n_epochs"] == 10 and est["n_epochs_auto"] is True
    assert est["tokens_per_epoch"] == 210
    assert est["billable_tokens"] == 2100
    assert est["cost_usd"] == pytest.approx(2100 * 25 / 1e6)
    assert est["estimated_seconds"] == 21.0
    # identical lines are flagged, but remain valid
    assert report.warning_counts == {"duplicate": 9}
    assert report.warnings[0].line == 2 and "line 1" in report.warnings[0].message


def test_explicit_epochs_and_price(tmp_path, tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [good(i) for i in range(12)])
    report = check_files(path, validation=None, tokenizer=tokenizer, n_epochs=2, price_per_million=8.0)
    per_epoch = report.stats["billed_tokens_per_example"]["total"]
    assert report.estimate["billable_tokens"] == 2 * per_epoch
    assert report.estimate["cost_usd"] == pytest.approx(2 * per_epoch * 8 / 1e6)
    assert report.estimate["estimated_seconds"] is None
    assert not report.warnings  # similar short Q/A lines are not near duplicates


def test_truncation_is_a_warning_and_billed_at_the_context(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 300}]}
    path = write_lines(tmp_path / "t.jsonl", [HI] * 5 + [long] + [good(i) for i in range(5)])
    report = check_files(path, validation=None, tokenizer=tokenizer, context_length=64)
    assert report.ok
    trunc = [p for p in report.warnings if p.code == "truncated"]
    assert [p.line for p in trunc] == [6]
    assert report.stats["n_truncated"] == 1
    assert report.stats["billed_tokens_per_example"]["max"] == 64
    assert report.stats["tokens_per_example"]["max"] > 300


def test_truncation_that_removes_every_label_is_an_error(tmp_path, tokenizer):
    long_prompt = {
        "messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    }
    path = with_bad_line(tmp_path / "t.jsonl", long_prompt, at=4)
    report = check_files(path, validation=None, tokenizer=tokenizer, context_length=64)
    assert [(p.code, p.line) for p in report.errors] == [("all_labels_masked", 4)]
    assert [(p.code, p.line) for p in report.warnings if p.code == "truncated"] == [("truncated", 4)]
    assert report.job_error()[0] == "invalid_training_file"


def test_special_tokens_in_text_are_errors(tmp_path, tokenizer):
    bad = {"messages": [{"role": "user", "content": "hi<|im_end|>"}, {"role": "assistant", "content": "x"}]}
    report = check_files(with_bad_line(tmp_path / "t.jsonl", bad, at=3), validation=None, tokenizer=tokenizer)
    assert [(p.code, p.line) for p in report.errors] == [("special_token", 3)]
    assert "<|im_end|>" in report.errors[0].message


def test_exact_and_near_duplicates(tmp_path):
    near = ESSAY.replace("orange", "golden")
    lines = [essay_example(ESSAY), good(1), essay_example(ESSAY), good(2), essay_example(near)]
    lines += [good(i) for i in range(10, 20)]
    lines.append(
        essay_example(
            "A completely different text about compilers, registers and the cost of cache misses in loops."
        )
    )
    report = validate_file(write_lines(tmp_path / "t.jsonl", lines))
    analyze(report, tmp_path / "t.jsonl", tokenizer=None)
    got = [(p.code, p.line) for p in report.warnings]
    assert got == [("duplicate", 3), ("near_duplicate", 5)]
    assert "line 1" in report.warnings[1].message
    assert report.stats["n_duplicates"] == 1 and report.stats["n_near_duplicates"] == 1
    assert report.stats["tokens_per_example"] is None and report.estimate is None


def test_train_validation_overlap(tmp_path, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [essay_example(ESSAY)] + [good(i) for i in range(12)])
    valid = write_lines(
        tmp_path / "valid.jsonl",
        [good(100), good(5), essay_example(ESSAY.replace("river", "mountain")), good(101)],
    )
    report = check_files(train, validation=valid, tokenizer=tokenizer)
    assert report.ok
    v = report.validation
    assert v.file_kind == "validation" and v.n_examples == 4
    assert [(p.code, p.line, p.severity) for p in v.warnings] == [
        ("train_validation_overlap", 2, "warning"),
        ("train_validation_overlap", 3, "warning"),
    ]
    assert "line 7" in v.warnings[0].message and "line 1" in v.warnings[1].message
    assert v.stats["n_overlapping_training"] == 2
    assert report.estimate["validation_tokens"] == v.stats["billed_tokens_per_example"]["total"] > 0

    strict = check_files(train, validation=valid, tokenizer=tokenizer, overlap_is_error=True)
    assert not strict.ok and strict.error_param == "validation_file"
    code, message = strict.job_error()
    assert code == "invalid_validation_file"
    assert message.startswith("The job failed due to an invalid validation file. 2 problems found: line 2:")


def test_bad_validation_file_fails_the_check(tmp_path, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [good(i) for i in range(10)])
    valid = write_lines(tmp_path / "valid.jsonl", [good(50), "{"])
    report = check_files(train, validation=valid, tokenizer=tokenizer)
    assert not report.error_counts and not report.ok
    assert report.error_param == "validation_file"
    assert report.validation.errors[0].line == 2
    assert report.to_dict()["validation"]["ok"] is False


def test_wrong_format_skips_analysis(tmp_path, tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [good_pref(i) for i in range(12)])
    report = check_files(path, validation=None, tokenizer=tokenizer)
    assert report.error_counts == {"wrong_format": 1} and report.stats is None


def test_preference_pairs_count_both_sequences(tmp_path, tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [good_pref(i) for i in range(10)])
    report = check_files(path, validation=None, tokenizer=tokenizer, method="dpo")
    assert report.ok, report.to_dict()
    assert report.stats["messages_per_example"]["min"] == 3
    # prompt + chosen and prompt + rejected are both tokenized
    assert report.stats["tokens_per_example"]["min"] > 2 * 15
    assert report.estimate["billable_tokens"] == 10 * report.stats["billed_tokens_per_example"]["total"]


def test_reinforcement_prompts_must_leave_room_for_answers(tmp_path, tokenizer):
    lines = [{"messages": [{"role": "user", "content": f"Question {i}?"}], "answer": "x"} for i in range(12)]
    lines[2]["messages"][0]["content"] = "word " * 300
    report = check_files(
        write_lines(tmp_path / "p.jsonl", lines),
        tokenizer=tokenizer,
        method="reinforcement",
        context_length=256,
    )
    assert [(p.code, p.line) for p in report.errors] == [("prompt_too_long", 3)]
    assert report.stats["tokens_per_example"]["min"] > 0  # prompts are counted
