"""Check an /v1/evals response against OpenAI's schema for it (tests/evals/openapi_evals.json,
extracted from the spec's /evals fragment).

The spec marks a few fields required and non-null that OpenAI's own examples (and API) answer with
null; those, and only those, are made nullable here, each with the reason:
- `first_id`/`last_id` of an empty list: there is no first or last object.
- EvalRun `error`: null unless the run failed (OpenAI's examples: "error": null).
- EvalRun `per_model_usage`, `per_testing_criteria_results`: null before any item is graded
  (OpenAI's queued run example).
- EvalRunOutputItem `sample.error`: null when the sample was generated (OpenAI's example).
- EvalRunOutputItem `sample.temperature`, `max_completion_tokens`, `top_p`, `seed`: null where
  nothing set them (a jsonl run samples nothing; a completions run without max_completion_tokens).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

SPEC = Path(__file__).with_name("openapi_evals.json")


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


@cache
def _document() -> dict:
    doc = json.loads(SPEC.read_text())
    doc.pop("//")
    schemas = copy.deepcopy(doc["components"]["schemas"])
    for name in ("EvalList", "EvalRunList", "EvalRunOutputItemList"):
        for field in ("first_id", "last_id"):
            schemas[name]["properties"][field] = _nullable(schemas[name]["properties"][field])
    run = schemas["EvalRun"]["properties"]
    for field in ("error", "per_model_usage", "per_testing_criteria_results"):
        run[field] = _nullable(run[field])
    sample = schemas["EvalRunOutputItem"]["properties"]["sample"]["properties"]
    for field in ("error", "temperature", "max_completion_tokens", "top_p", "seed"):
        sample[field] = _nullable(sample[field])
    doc["components"]["schemas"] = schemas
    return doc


def check(obj: dict, schema_name: str) -> None:
    """Raise jsonschema.ValidationError (with every problem) unless `obj` is a `schema_name`."""
    doc = _document()
    assert schema_name in doc["components"]["schemas"], schema_name
    validator = Draft202012Validator({**doc, "$ref": f"#/components/schemas/{schema_name}"})
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        details = "\n".join(f"- {list(e.absolute_path)}: {e.message[:300]}" for e in errors)
        raise AssertionError(f"not a valid {schema_name}:\n{details}")
