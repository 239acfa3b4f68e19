"""The format check: a corpus of bad files (one per problem kind, each with its code and line), good
edge cases that must pass, and the job error wording."""

from __future__ import annotations

import json

import pytest

from tunehouse.data import validation
from tunehouse.data.validation import iter_examples, validate_file

from .helpers import good, good_pref, with_bad_line, write_lines

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def msgs(*messages, **extra) -> dict:
    return {"messages": list(messages), **extra}


def call(cid: str, name: str = "get_weather", arguments: str = '{"city": "Paris"}') -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*cs) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(cs)}


def tool(cid: str, content: str = '{"temp_c": 21}') -> dict:
    return {"role": "tool", "tool_call_id": cid, "content": content}


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}

# (id, bad line, expected code, expected field or None); the bad line is line 5 of a 13-line file.
BAD_CHAT = [
    ("invalid_json", '{"messages": [{"role": "user"', "invalid_json", None),
    ("trailing_garbage", json.dumps(good()) + " x", "invalid_json", None),
    ("not_an_object", "[1, 2, 3]", "data_type", None),
    ("string_line", '"hello"', "data_type", None),
    ("no_messages", {"prompt_text": "hi"}, "missing_messages_list", "messages"),
    ("empty_messages", {"messages": []}, "missing_messages_list", "messages"),
    ("messages_not_list", {"messages": {"role": "user"}}, "missing_messages_list", "messages"),
    ("message_not_object", msgs("hi", A), "data_type", "messages[0]"),
    ("missing_role", msgs({"content": "hi"}, A), "message_missing_key", "messages[0].role"),
    ("missing_content", msgs({"role": "user"}, A), "message_missing_key", "messages[0].content"),
    ("unknown_key", msgs({**U, "foo": 1}, A), "message_unrecognized_key", "messages[0].foo"),
    ("unknown_role", msgs({"role": "bot", "content": "x"}, A), "unrecognized_role", "messages[0].role"),
    ("role_not_string", msgs({"role": 3, "content": "x"}, A), "unrecognized_role", "messages[0].role"),
    (
        "empty_content",
        msgs(U, {"role": "assistant", "content": ""}),
        "missing_content",
        "messages[1].content",
    ),
    (
        "blank_content",
        msgs(U, {"role": "assistant", "content": "  \n"}),
        "missing_content",
        "messages[1].content",
    ),
    ("null_content", msgs({"role": "user", "content": None}, A), "missing_content", "messages[0].content"),
    ("no_text_parts", msgs({"role": "user", "content": []}, A), "missing_content", "messages[0].content"),
    ("content_number", msgs({"role": "user", "content": 5}, A), "invalid_type", "messages[0].content"),
    (
        "part_no_text",
        msgs({"role": "user", "content": [{"type": "text"}]}, A),
        "invalid_type",
        "messages[0].content[0].text",
    ),
    (
        "part_unknown",
        msgs({"role": "user", "content": [{"type": "video"}]}, A),
        "invalid_type",
        "messages[0].content[0].type",
    ),
    (
        "image_part",
        msgs({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}, A),
        "unsupported_content",
        "messages[0].content[0]",
    ),
    (
        "no_assistant",
        msgs({"role": "system", "content": "s"}, U),
        "example_missing_assistant_message",
        "messages",
    ),
    ("weight_2", msgs(U, {**A, "weight": 2}), "invalid_weight", "messages[1].weight"),
    ("weight_bool", msgs(U, {**A, "weight": True}), "invalid_weight", "messages[1].weight"),
    ("weight_float", msgs(U, {**A, "weight": 1.0}), "invalid_weight", "messages[1].weight"),
    ("weight_on_user", msgs({**U, "weight": 1}, A), "invalid_weight", "messages[0].weight"),
    ("all_weight_0", msgs(U, {**A, "weight": 0}, U, {**A, "weight": 0}), "all_labels_masked", "messages"),
    ("name_not_string", msgs({**U, "name": 1}, A), "invalid_type", "messages[0].name"),
    (
        "tool_calls_on_user",
        msgs({**U, "tool_calls": [call("c1")]}, A),
        "message_unrecognized_key",
        "messages[0].tool_calls",
    ),
    (
        "tool_calls_empty",
        msgs(U, {"role": "assistant", "content": "x", "tool_calls": []}),
        "invalid_tool_calls",
        "messages[1].tool_calls",
    ),
    (
        "tool_call_no_id",
        msgs(U, calls({"type": "function", "function": {"name": "f", "arguments": "{}"}}), tool("c1"), A),
        "message_missing_key",
        "messages[1].tool_calls[0].id",
    ),
    (
        "tool_call_args_dict",
        msgs(U, calls({"id": "c1", "function": {"name": "f", "arguments": {}}}), tool("c1"), A),
        "invalid_type",
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "tool_call_type",
        msgs(U, calls({**call("c1"), "type": "retrieval"}), tool("c1"), A),
        "invalid_type",
        "messages[1].tool_calls[0].type",
    ),
    (
        "tool_call_no_function",
        msgs(U, calls({"id": "c1", "type": "function"}), tool("c1"), A),
        "message_missing_key",
        "messages[1].tool_calls[0].function",
    ),
    (
        "tool_id_mismatch",
        msgs(U, calls(call("c1")), tool("c2"), A),
        "tool_call_id_mismatch",
        "messages[2].tool_call_id",
    ),
    (
        "tool_answered_twice",
        msgs(U, calls(call("c1")), tool("c1"), tool("c1"), A),
        "tool_call_id_mismatch",
        "messages[3].tool_call_id",
    ),
    (
        "duplicate_call_ids",
        msgs(U, calls(call("c1"), call("c1")), tool("c1"), A),
        "tool_call_id_mismatch",
        "messages[1].tool_calls[1].id",
    ),
    ("tool_without_call", msgs(U, tool("c1"), A), "tool_message_without_call", "messages[1]"),
    (
        "tool_without_id",
        msgs(U, calls(call("c1")), {"role": "tool", "content": "x"}, A),
        "message_missing_key",
        "messages[2].tool_call_id",
    ),
    (
        "tool_call_id_on_user",
        msgs({**U, "tool_call_id": "c1"}, A),
        "message_unrecognized_key",
        "messages[0].tool_call_id",
    ),
    (
        "function_without_call",
        msgs(U, {"role": "function", "name": "f", "content": "x"}, A),
        "tool_message_without_call",
        "messages[1]",
    ),
    (
        "function_without_name",
        msgs(
            U,
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "content": "x"},
            A,
        ),
        "message_missing_key",
        "messages[2].name",
    ),
    (
        "bad_function_call",
        msgs(U, {"role": "assistant", "content": None, "function_call": "f()"}),
        "invalid_type",
        "messages[1].function_call",
    ),
    (
        "null_content_no_calls",
        msgs(U, {"role": "assistant", "content": None}),
        "missing_content",
        "messages[1].content",
    ),
    (
        "parallel_off",
        msgs(U, calls(call("c1"), call("c2")), tool("c1"), tool("c2"), A, parallel_tool_calls=False),
        "invalid_tool_calls",
        "messages[1].tool_calls",
    ),
    ("parallel_not_bool", msgs(U, A, parallel_tool_calls="no"), "invalid_type", "parallel_tool_calls"),
    ("tools_not_list", msgs(U, A, tools={"type": "function"}), "invalid_tools", "tools"),
    (
        "tool_no_name",
        msgs(U, A, tools=[{"type": "function", "function": {"description": "d"}}]),
        "invalid_tools",
        "tools[0].function.name",
    ),
    (
        "tool_bad_params",
        msgs(U, A, tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
        "invalid_tools",
        "tools[0].function.parameters",
    ),
    ("functions_empty", msgs(U, A, functions=[]), "invalid_functions", "functions"),
]


@pytest.mark.parametrize(("bad", "code", "fld"), [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_line(tmp_path, bad, code, fld):
    report = validate_file(with_bad_line(tmp_path / "train.jsonl", bad, at=5))
    assert not report.ok
    assert report.n_examples == 13
    found = [p for p in report.errors if p.code == code]
    assert found, report.to_dict()["errors"]
    assert {p.line for p in report.errors} == {5}, report.to_dict()["errors"]
    assert found[0].line == 5 and found[0].severity == "error"
    if fld is not None:
        assert found[0].field == fld
    assert found[0].message  # a sentence for a human
    assert report.job_error()[0] == "invalid_training_file"
    # training never sees the bad line
    assert [n for n, _ in iter_examples(tmp_path / "train.jsonl")] == [n for n in range(1, 14) if n != 5]


BAD_WARNINGS = [
    ("unknown_top_level_key", {**good(), "metadata": {"id": 1}}, "unrecognized_key"),
    (
        "args_not_json",
        msgs(U, calls(call("c1", arguments="{city: Paris")), tool("c1"), A),
        "invalid_tool_arguments",
    ),
    (
        "unknown_tool",
        msgs(U, calls(call("c1", name="nope")), tool("c1"), A, tools=[WEATHER_TOOL]),
        "unknown_tool",
    ),
    ("missing_tool_response", msgs(U, calls(call("c1"), call("c2")), tool("c1"), A), "missing_tool_response"),
]


@pytest.mark.parametrize(("bad", "code"), [c[1:] for c in BAD_WARNINGS], ids=[c[0] for c in BAD_WARNINGS])
def test_warning_lines_still_pass(tmp_path, bad, code):
    report = validate_file(with_bad_line(tmp_path / "train.jsonl", bad, at=3))
    assert report.ok, report.to_dict()["errors"]
    assert [(p.code, p.line) for p in report.warnings] == [(code, 3)]


def test_non_utf8_bytes(tmp_path):
    path = with_bad_line(tmp_path / "t.jsonl", "PLACEHOLDER", at=4)
    path.write_bytes(path.read_bytes().replace(b"PLACEHOLDER", b'{"messages": "caf\xe9"}'))
    report = validate_file(path)
    assert [(p.code, p.line) for p in report.errors] == [("non_utf8", 4)]
    assert "byte 18" in report.errors[0].message


def test_bom_and_blank_lines_are_warnings_with_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(good(i)) for i in range(10)]
    lines.insert(3, "")
    lines.insert(7, "   ")
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n\n")
    report = validate_file(path)
    assert report.ok and report.n_examples == 10
    assert [(p.code, p.line) for p in report.warnings] == [
        ("bom", 1),
        ("blank_line", 4),
        ("blank_line", 8),
        ("blank_line", 13),
    ]
    assert len(list(iter_examples(path))) == 10


def test_problems_in_a_crlf_file_keep_their_line_numbers(tmp_path):
    lines = [good(i) for i in range(12)]
    lines[6] = "{oops"
    path = write_lines(tmp_path / "t.jsonl", lines, newline="\r\n")
    report = validate_file(path)
    assert [(p.code, p.line) for p in report.errors] == [("invalid_json", 7)]


def test_every_problem_is_collected(tmp_path):
    lines = [good(i) for i in range(12)]
    lines[1] = "{"
    lines[4] = msgs(U)
    lines[8] = msgs({"role": "bot", "content": "x"}, {**A, "weight": 3})
    report = validate_file(write_lines(tmp_path / "t.jsonl", lines))
    assert [(p.code, p.line) for p in report.errors] == [
        ("invalid_json", 2),
        ("example_missing_assistant_message", 5),
        ("unrecognized_role", 9),
        ("invalid_weight", 9),
    ]
    code, message = report.job_error()
    assert code == "invalid_training_file"
    assert message.startswith("The job failed due to an invalid training file. 4 problems found: line 2: ")
    assert "; line 5: " in message and "; line 9: " in message


def test_stored_problems_are_capped_but_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "MAX_STORED_PER_KIND", 5)
    path = write_lines(tmp_path / "t.jsonl", ["{"] * 30 + [good(i) for i in range(10)])
    report = validate_file(path)
    assert report.error_counts == {"invalid_json": 30}
    assert len(report.errors) == 5 and report.n_errors == 30
    assert "30 problems found" in report.job_error()[1] and "and 25 more" in report.job_error()[1]


def test_too_few_examples(tmp_path):
    report = validate_file(write_lines(tmp_path / "t.jsonl", [good(i) for i in range(4)]))
    assert not report.ok
    assert report.job_error() == (
        "invalid_n_examples",
        "Training file has 4 example(s), but must have at least 10 examples",
    )
    assert report.errors[0].line is None


def test_too_few_examples_and_bad_lines_is_an_invalid_file(tmp_path):
    report = validate_file(write_lines(tmp_path / "t.jsonl", [good(1), "{"]))
    assert set(report.error_counts) == {"invalid_json", "invalid_n_examples"}
    assert report.job_error()[0] == "invalid_training_file"


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    report = validate_file(path)
    assert report.n_examples == 0
    assert list(report.error_counts) == ["empty_file"]
    assert report.job_error()[0] == "invalid_training_file"


def test_preference_file_for_supervised_is_one_wrong_format_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [good_pref(i) for i in range(200)])
    report = validate_file(path, method="supervised")
    assert report.error_counts == {"wrong_format": 1}
    assert report.errors[0].line == 1 and "'supervised'" in report.errors[0].message
    assert report.format == "preference" and report.n_examples == 200


def test_chat_file_for_dpo_is_one_wrong_format_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["{", *[good(i) for i in range(50)]])
    report = validate_file(path, method="dpo")
    assert report.error_counts == {"invalid_json": 1, "wrong_format": 1}
    assert [p.line for p in report.errors] == [1, 2]


def test_legacy_completions_file_is_wrong_format(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}] * 20)
    report = validate_file(path)
    assert report.error_counts == {"wrong_format": 1}
    assert "prompt/completion" in report.errors[0].message


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        validate_file(__file__, method="ppo")  # type: ignore[arg-type]


# -- good edge cases ------------------------------------------------------------------------------

GOOD_EDGE_CASES = [
    (
        "weight_0_multi_turn",
        msgs({"role": "system", "content": "s"}, U, {**A, "weight": 0}, U, {**A, "weight": 1}),
    ),
    (
        "developer_and_names",
        msgs({"role": "developer", "content": "d"}, {**U, "name": "ann"}, {**A, "name": "bot"}),
    ),
    (
        "parallel_tool_calls",
        msgs(U, calls(call("c1"), call("c2")), tool("c2"), tool("c1"), A, tools=[WEATHER_TOOL]),
    ),
    ("tool_call_ends_example", msgs(U, calls(call("c1")), tools=[WEATHER_TOOL], parallel_tool_calls=False)),
    ("tool_call_with_text", msgs(U, {**calls(call("c1")), "content": "Let me check."}, tool("c1"), A)),
    ("tool_call_no_content_key", msgs(U, {"role": "assistant", "tool_calls": [call("c1")]}, tool("c1"), A)),
    (
        "deprecated_functions",
        msgs(
            U,
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            {"role": "function", "name": "f", "content": "42"},
            A,
            functions=[{"name": "f", "parameters": {"type": "object"}}],
        ),
    ),
    (
        "unicode",
        msgs(
            {"role": "user", "content": "Größe? 日本語 🙂 \u2028 done"},
            {"role": "assistant", "content": "🙂 ok — ✓"},
        ),
    ),
    (
        "text_parts",
        msgs({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, A),
    ),
    ("refusal_field", msgs(U, {**A, "refusal": None})),
]


@pytest.mark.parametrize("example", [c[1] for c in GOOD_EDGE_CASES], ids=[c[0] for c in GOOD_EDGE_CASES])
def test_good_edge_cases_pass(tmp_path, example):
    path = write_lines(tmp_path / "t.jsonl", [example] * 3 + [good(i) for i in range(10)])
    report = validate_file(path)
    assert report.ok, report.to_dict()["errors"]
    assert report.warning_counts == {}
    assert len(list(iter_examples(path))) == 13


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("final_newline", [True, False])
def test_line_ends(tmp_path, newline, final_newline):
    path = write_lines(
        tmp_path / "t.jsonl", [good(i) for i in range(10)], newline=newline, final_newline=final_newline
    )
    report = validate_file(path)
    assert report.ok and report.n_examples == 10 and not report.warnings
    assert [ex for _, ex in iter_examples(path)] == [good(i) for i in range(10)]


# -- preference (DPO) -----------------------------------------------------------------------------

P = good_pref(0)
BAD_PREF = [
    ("not_object", "[]", "data_type", None),
    ("no_input", {k: v for k, v in P.items() if k != "input"}, "missing_key", "input"),
    (
        "no_non_preferred",
        {k: v for k, v in P.items() if k != "non_preferred_output"},
        "missing_key",
        "non_preferred_output",
    ),
    (
        "old_name",
        {
            "input": P["input"],
            "preferred_completion": P["preferred_output"],
            "non_preferred_output": P["non_preferred_output"],
        },
        "missing_key",
        "preferred_completion",
    ),
    ("empty_input", {**P, "input": {"messages": []}}, "missing_messages_list", "input.messages"),
    ("two_outputs", {**P, "preferred_output": [A, A]}, "invalid_preference_output", "preferred_output"),
    ("output_not_list", {**P, "preferred_output": A}, "invalid_preference_output", "preferred_output"),
    (
        "output_user_role",
        {**P, "preferred_output": [U]},
        "invalid_preference_output",
        "preferred_output[0].role",
    ),
    (
        "output_empty",
        {**P, "non_preferred_output": [{"role": "assistant", "content": ""}]},
        "missing_content",
        "non_preferred_output[0].content",
    ),
    (
        "input_ends_with_assistant",
        {**P, "input": {"messages": [U, A]}},
        "invalid_preference_input",
        "input.messages[1]",
    ),
    (
        "input_bad_role",
        {**P, "input": {"messages": [{"role": "human", "content": "x"}]}},
        "unrecognized_role",
        "input.messages[0].role",
    ),
]


@pytest.mark.parametrize(("bad", "code", "fld"), [c[1:] for c in BAD_PREF], ids=[c[0] for c in BAD_PREF])
def test_bad_preference_line(tmp_path, bad, code, fld):
    report = validate_file(with_bad_line(tmp_path / "t.jsonl", bad, at=2, make=good_pref), method="dpo")
    found = [p for p in report.errors if p.code == code]
    assert found and found[0].line == 2, report.to_dict()["errors"]
    assert {p.line for p in report.errors} == {2}
    if fld is not None:
        assert found[0].field == fld


def test_good_preference_file(tmp_path):
    tools = {"tools": [WEATHER_TOOL], "parallel_tool_calls": False}
    multi = {**P, "input": {"messages": [{"role": "system", "content": "s"}, U, A, U], **tools}}
    path = write_lines(tmp_path / "t.jsonl", [multi] + [good_pref(i) for i in range(10)])
    report = validate_file(path, method="dpo")
    assert report.ok and report.format == "preference" and not report.warnings, report.to_dict()
    assert len(list(iter_examples(path, method="dpo"))) == 11


def test_identical_outputs_warn(tmp_path):
    same = {**P, "non_preferred_output": P["preferred_output"]}
    report = validate_file(with_bad_line(tmp_path / "t.jsonl", same, at=7, make=good_pref), method="dpo")
    assert report.ok
    assert [(p.code, p.line) for p in report.warnings] == [("identical_outputs", 7)]


def test_report_to_dict_is_json(tmp_path):
    report = validate_file(with_bad_line(tmp_path / "t.jsonl", "{", at=3))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is False and d["n_examples"] == 13
    assert d["errors"][0] == {
        "code": "invalid_json",
        "message": d["errors"][0]["message"],
        "line": 3,
        "severity": "error",
        "field": None,
    }


# -- reinforcement prompts ------------------------------------------------------------------------


def prompt(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}


def test_reinforcement_prompts_end_with_the_turn_the_model_answers(tmp_path):
    ok = validate_file(
        write_lines(tmp_path / "ok.jsonl", [prompt(i) for i in range(12)]), method="reinforcement"
    )
    assert ok.ok and ok.format == "chat" and not ok.warnings  # extra keys are the grader's
    answered = prompt(5)
    answered["messages"].append({"role": "assistant", "content": "10"})
    bad = validate_file(
        with_bad_line(tmp_path / "bad.jsonl", answered, at=4, make=prompt), method="reinforcement"
    )
    (problem,) = bad.errors
    assert (problem.code, problem.line, problem.field) == ("prompt_not_ending_with_user", 4, "messages[1]")
    # The same line is a good supervised example, and a prompt is not one.
    assert not validate_file(tmp_path / "ok.jsonl").ok
    # Training reads the good lines only: the fourth it reads is prompt(3), not the answered line.
    assert [ex["answer"] for _, ex in iter_examples(tmp_path / "bad.jsonl", method="reinforcement")][3] == "6"
