"""python graders run grade(sample, item) in the sandbox; its failures become OpenAI's flags."""

from __future__ import annotations

from tunehouse.graders import Sample, grade_many, parse_grader


def python_grader(body: str, **extra):
    source = "def grade(sample, item):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    return parse_grader({"type": "python", "name": "py", "source": source, **extra})


def test_grade_reads_sample_and_item():
    grader = python_grader(
        "import json\n"
        "if sample['output_json'] is not None:\n"
        "    return float(sample['output_json']['n'] == item['n'])\n"
        "return 0.5 if sample['output_text'].startswith(item['prefix']) else 0.0"
    )
    assert grader.grade(Sample.from_text('{"n": 3}'), {"n": 3}).reward == 1.0
    assert grader.grade(Sample.from_text("hello world"), {"prefix": "hello"}).reward == 0.5
    assert grader.grade(Sample.from_text("bye"), {"prefix": "hello"}).reward == 0.0


def test_pass_threshold_and_image_tag():
    grader = python_grader("return 0.7", pass_threshold=0.6, image_tag="2025-05-08")
    result = grader.grade(Sample.from_text("x"), {})
    assert result.reward == 0.7 and grader.passed(result)
    assert not python_grader("return 0.4").passed(
        python_grader("return 0.4").grade(Sample.from_text("x"), {})
    )


def test_runtime_error_and_bad_return():
    raised = python_grader("raise ValueError('no answer here')").grade(Sample.from_text("x"), {})
    assert raised.errors.python_grader_runtime_error and raised.reward == 0.0
    assert "no answer here" in raised.errors.python_grader_runtime_error_details
    wrong = python_grader("return 'high'").grade(Sample.from_text("x"), {})
    assert wrong.errors.python_grader_runtime_error and wrong.errored


def test_missing_item_key_is_the_graders_runtime_error():
    result = python_grader("return float(item['label'] == sample['output_text'])").grade(
        Sample.from_text("x"), {}
    )
    assert result.errors.python_grader_runtime_error
    assert "label" in result.errors.python_grader_runtime_error_details


def test_grade_many_in_parallel_sandboxes():
    grader = python_grader("return float(len(sample['output_text']))")
    results = grade_many(grader, [(Sample.from_text("a" * i), {}) for i in range(4)], max_workers=4)
    assert [r.reward for r in results] == [0.0, 1.0, 2.0, 3.0]
