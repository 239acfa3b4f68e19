"""An eval's definition: the shape of its items (`data_source_config`) and the criteria every
run is graded by (`testing_criteria`), checked once when the eval is created.

- `data_source_config`: `custom` only. Its `item_schema` is a JSON Schema (checked as one); with
  `include_sample_schema` the sample namespace (`{{sample.output_text}}`, ...) exists too, filled
  by the run (generated, or given in a jsonl run's lines). `logs` and `stored_completions` draw
  items from chat logs OpenAI keeps; tunehouse keeps none, so they are refused with a 400.
- `testing_criteria`: graders (tunehouse.graders), each given an id `<name>-<uuid>` as OpenAI does;
  every `{{item.…}}` they read must be in the item schema, and `{{sample.…}}` needs the sample
  schema, so a typo fails here rather than on every item of every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from tunehouse import ids
from tunehouse.errors import InvalidRequest
from tunehouse.graders import Grader, parse_grader
from tunehouse.graders.templates import references as template_references

# The testing criteria an eval takes (OpenAI's CreateEvalRequest.testing_criteria); `multi` is a
# reinforcement fine-tuning grader.
CRITERION_TYPES = ("label_model", "string_check", "text_similarity", "python", "score_model")
# Eval criteria of these types must say when they pass (EvalGraderTextSimilarity).
THRESHOLD_REQUIRED = ("text_similarity",)

# The sample namespace as graders see it (graders.Sample.namespace()).
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "properties": {
                            "role": {"type": "string", "enum": ["assistant"]},
                            "content": {"type": ["string", "null"]},
                        },
                        "required": ["role"],
                    },
                    "finish_reason": {"type": "string"},
                },
                "required": ["index", "message", "finish_reason"],
            },
        },
        "output_text": {"type": "string"},
        "output_json": {"type": "object"},
        "output_tools": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["choices", "output_text"],
}

NO_STORED_LOGS = (
    "tunehouse does not keep chat logs or stored completions, so an eval cannot draw its items from "
    "'{type}'. Use a 'custom' data source config with an item_schema, and give each run its items "
    "(a jsonl file or file_content)."
)


@dataclass(frozen=True)
class DataSourceConfig:
    item_schema: dict[str, Any]
    include_sample_schema: bool

    def stored(self) -> dict[str, Any]:
        return {
            "type": "custom",
            "item_schema": self.item_schema,
            "include_sample_schema": self.include_sample_schema,
        }

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> DataSourceConfig:
        return cls(stored["item_schema"], bool(stored.get("include_sample_schema")))

    def wire(self) -> dict[str, Any]:
        """OpenAI's EvalCustomDataSourceConfig: the schema of a whole data source row."""
        properties: dict[str, Any] = {"item": self.item_schema}
        required = ["item"]
        if self.include_sample_schema:
            properties["sample"] = SAMPLE_SCHEMA
            required.append("sample")
        return {
            "type": "custom",
            "schema": {"type": "object", "properties": properties, "required": required},
        }


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


def parse_data_source_config(spec: Any, *, param: str = "data_source_config") -> DataSourceConfig:
    if not isinstance(spec, dict):
        raise InvalidRequest(
            f"Invalid type for '{param}': expected an object, but got {_kind(spec)} instead.",
            param=param,
            code="invalid_type",
        )
    kind = spec.get("type", "custom")  # the spec's default
    if kind in ("logs", "stored_completions"):
        raise InvalidRequest(
            NO_STORED_LOGS.format(type=kind), param=f"{param}.type", code="unsupported_value"
        )
    if kind != "custom":
        raise InvalidRequest(
            f"Invalid value for '{param}.type': {kind!r}. Supported values are: 'custom' "
            "('logs' and 'stored_completions' need stored chat logs, which tunehouse does not keep).",
            param=f"{param}.type",
            code="invalid_value",
        )
    for name in spec:
        if name not in ("type", "item_schema", "include_sample_schema"):
            raise InvalidRequest(
                f"Unknown parameter: '{param}.{name}'.", param=f"{param}.{name}", code="unknown_parameter"
            )
    if "item_schema" not in spec:
        raise InvalidRequest(
            f"Missing required parameter: '{param}.item_schema'.",
            param=f"{param}.item_schema",
            code="missing_required_parameter",
        )
    schema = spec["item_schema"]
    if not isinstance(schema, dict):
        raise InvalidRequest(
            f"Invalid type for '{param}.item_schema': expected a JSON Schema object, but got "
            f"{_kind(schema)} instead.",
            param=f"{param}.item_schema",
            code="invalid_type",
        )
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise InvalidRequest(
            f"Invalid '{param}.item_schema': it is not a valid JSON Schema ({e.message} at "
            f"item_schema{where}).",
            param=f"{param}.item_schema",
            code="invalid_value",
        ) from None
    include = spec.get("include_sample_schema", False)
    if not isinstance(include, bool):
        raise InvalidRequest(
            f"Invalid type for '{param}.include_sample_schema': expected a boolean, but got "
            f"{_kind(include)} instead.",
            param=f"{param}.include_sample_schema",
            code="invalid_type",
        )
    return DataSourceConfig(schema, include)


# --------------------------------------------------------------------------------------------------
# Template references against the schemas


def _keys(path: str) -> list[str]:
    return path.split(".")[1:]


def schema_problem(schema: Any, path: str) -> str | None:
    """Why the reference `path` (item.a.b or sample.x) names nothing the schema allows; None when
    it may exist. A schema that leaves a level open (no `properties`, or additional properties
    allowed) accepts whatever is below it; `$ref` is not followed."""
    return _walk(schema, _keys(path), path, path.split(".")[0])


def _walk(node: Any, keys: list[str], path: str, here: str) -> str | None:
    if not keys or node is True or not isinstance(node, dict) or "$ref" in node:
        return None
    if node is False:
        return f"'{path}' is not allowed by the schema ('{here}' admits nothing)."
    for combinator in ("anyOf", "oneOf", "allOf"):
        branches = node.get(combinator)
        if isinstance(branches, list) and branches:
            found = [_walk(b, keys, path, here) for b in branches]
            if combinator == "allOf":
                return next((p for p in found if p is not None), None)
            return None if any(p is None for p in found) else found[0]
    key, rest = keys[0], keys[1:]
    types = node.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if key.isdigit() and ("items" in node or "array" in types):
        items = node.get("items", True)
        prefix = node.get("prefixItems")
        if isinstance(prefix, list) and int(key) < len(prefix):
            items = prefix[int(key)]
        return _walk(items, rest, path, f"{here}.{key}")
    properties = node.get("properties")
    if isinstance(properties, dict) and key in properties:
        return _walk(properties[key], rest, path, f"{here}.{key}")
    if types and "object" not in types:
        return f"'{path}' cannot be read: the schema makes '{here}' {' or '.join(types)}, not an object."
    additional = node.get("additionalProperties", True)
    if isinstance(additional, dict):
        return _walk(additional, rest, path, f"{here}.{key}")
    if properties is None or (additional is True and "additionalProperties" in node):
        return None  # an open object: anything may be in it
    if isinstance(properties, dict):
        known = ", ".join(sorted(properties)) or "none"
        return f"'{path}' is not in the schema: '{here}' has the properties {known}."
    return None


def reference_problem(config: DataSourceConfig, path: str, *, generates: bool = False) -> str | None:
    """Why an eval with `config` cannot fill the template reference `path`. `generates`: a run
    that generates its samples (they exist whatever include_sample_schema says)."""
    namespace = path.split(".")[0]
    if namespace == "item":
        return schema_problem(config.item_schema, path)
    if not (config.include_sample_schema or generates):
        return (
            f"'{{{{{path}}}}}' reads the sample, but data_source_config.include_sample_schema is "
            "false: set it to true for an eval whose runs generate (or give) a sample per item."
        )
    return schema_problem(SAMPLE_SCHEMA, path)


def where_used(spec: Any, path: str, param: str) -> str:
    """The param path of the first string in `spec` that references `path`."""
    for where, text in _strings(spec, param):
        if any(ref.path == path for ref in template_references(text)):
            return where
    return param


def _strings(value: Any, param: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield param, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{param}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{param}[{i}]")


# --------------------------------------------------------------------------------------------------
# Testing criteria


def parse_testing_criteria(
    specs: Any, config: DataSourceConfig, *, param: str = "testing_criteria"
) -> list[dict]:
    """The criteria as stored and echoed: each grader object as validated, plus its `id`."""
    if not isinstance(specs, list):
        raise InvalidRequest(
            f"Invalid type for '{param}': expected an array, but got {_kind(specs)} instead.",
            param=param,
            code="invalid_type",
        )
    if not specs:
        raise InvalidRequest(
            f"Invalid '{param}': an eval needs at least one testing criterion.",
            param=param,
            code="empty_array",
        )
    out = []
    problems: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        p = f"{param}[{i}]"
        if not isinstance(spec, dict):
            raise InvalidRequest(
                f"Invalid type for '{p}': expected a grader object, but got {_kind(spec)} instead.",
                param=p,
                code="invalid_type",
            )
        kind = spec.get("type")
        if kind not in CRITERION_TYPES:
            hint = " (multi graders are for reinforcement fine-tuning)" if kind == "multi" else ""
            raise InvalidRequest(
                f"Invalid value for '{p}.type': {kind!r}{hint}. Supported values are: "
                + ", ".join(f"'{t}'" for t in CRITERION_TYPES)
                + ".",
                param=f"{p}.type",
                code="invalid_value",
            )
        if kind in THRESHOLD_REQUIRED and "pass_threshold" not in spec:
            raise InvalidRequest(
                f"Missing required parameter: '{p}.pass_threshold' (the score at which a {kind} "
                "criterion passes).",
                param=f"{p}.pass_threshold",
                code="missing_required_parameter",
            )
        grader = parse_grader(spec, param=p, allow_label_model=True)
        for path in sorted(grader.references()):
            problem = reference_problem(config, path)
            if problem is not None:
                problems.append((where_used(spec, path, p), problem))
        out.append({**grader.spec, "id": ids.testing_criterion_id(grader.name)})
    if problems:
        message = problems[0][1] if len(problems) == 1 else "\n".join(f"- {w}: {m}" for w, m in problems)
        raise InvalidRequest(message, param=problems[0][0], code="invalid_template")
    return out


def graders_of(criteria: list[dict]) -> list[Grader]:
    """The stored criteria as graders (validated when the eval was created)."""
    return [
        parse_grader({k: v for k, v in c.items() if k != "id"}, param=f"testing_criteria[{i}]")
        for i, c in enumerate(criteria)
    ]
