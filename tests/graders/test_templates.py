"""Templates: {{item.*}} and {{sample.*}} resolve as OpenAI's do; a missing field is an item error."""

from __future__ import annotations

import pytest

from tunehouse.graders import Sample, TemplateError
from tunehouse.graders.templates import problems, references, render


def ns(text: str) -> dict:
    return Sample.from_text(text).namespace()


def test_item_and_sample_references_render():
    item = {"label": "Paris", "meta": {"city": {"name": "Lyon"}}, "n": 3, "tags": ["a", "b"], "ok": True}
    text = "{{sample.output_text}} | {{item.label}} | {{ item.meta.city.name }} | {{item.n}} | {{item.ok}}"
    assert render(text, ns("hello"), item) == "hello | Paris | Lyon | 3 | true"


def test_non_string_values_render_as_json():
    item = {"obj": {"a": [1, 2], "b": None}, "tags": ["x", "é"]}
    assert render("{{item.obj}}", ns(""), item) == '{"a": [1, 2], "b": null}'
    assert render("{{item.tags}}", ns(""), item) == '["x", "é"]'


def test_list_elements_by_index_both_spellings():
    item = {"tags": ["a", "b"], "rows": [{"v": 1}, {"v": 2}]}
    assert render("{{item.tags.1}} {{item.tags[0]}} {{item.rows[1].v}}", ns(""), item) == "b a 2"


def test_sample_output_json_paths():
    sample = ns('{"answer": {"value": 42, "unit": "kg"}, "list": [7]}')
    assert (
        render("{{sample.output_json.answer.value}}{{sample.output_json.answer.unit}}", sample, {}) == "42kg"
    )
    assert render("{{sample.output_json.list.0}}", sample, {}) == "7"
    assert render("{{sample.output_json}}", sample, {}).startswith('{"answer"')


def test_missing_item_field_names_the_path():
    with pytest.raises(TemplateError) as e:
        render("x {{item.meta.city.zip}}", ns(""), {"meta": {"city": {"name": "Lyon"}}})
    assert e.value.path == "item.meta.city.zip"
    assert "item.meta.city.zip" in str(e.value)
    assert not e.value.sample_parse


def test_index_out_of_range_is_missing():
    with pytest.raises(TemplateError):
        render("{{item.tags.5}}", ns(""), {"tags": ["a"]})


def test_output_json_of_a_non_json_sample_is_a_sample_parse_error():
    with pytest.raises(TemplateError) as e:
        render("{{sample.output_json.answer}}", ns("not json"), {})
    assert e.value.sample_parse
    # a JSON sample without the key is a missing variable instead
    with pytest.raises(TemplateError) as e:
        render("{{sample.output_json.answer}}", ns('{"other": 1}'), {})
    assert not e.value.sample_parse


def test_other_braces_are_left_alone():
    assert render("{{ user }} and {{x.y}} {{item.a}}", ns(""), {"a": "A"}) == "{{ user }} and {{x.y}} A"


def test_references_and_problems():
    text = "{{item.label}} {{ sample.output_text }} {{sample.output_json.a.b}} {{item.rows[0].v}}"
    assert {r.path for r in references(text)} == {
        "item.label",
        "sample.output_text",
        "sample.output_json.a.b",
        "item.rows.0.v",
    }
    assert problems(text) == []
    assert problems("{{sample.text}}") and "not a sample field" in problems("{{sample.text}}")[0]
    assert problems("{{item.}}") and "not a valid reference" in problems("{{item.}}")[0]
    assert problems("{{item a}}")
