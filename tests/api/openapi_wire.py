"""OpenAI's schemas for what the API tests send and receive (tests/api/openapi_wire.json, extracted
from OpenAI's OpenAPI spec: the request and response schemas of the endpoints tunehouse serves and
what they reference, descriptions and examples removed, OpenAPI's `nullable: true` turned into JSON
Schema's null type), and a check of a response against the schema of its route.

Regenerate the JSON after a spec update with:

    python -m tests.api.openapi_wire /work/shared/openai-api/openapi.yaml

`check_response(method, path, body)` finds the route's schema (a route the spec does not have, a
tunehouse extension, is skipped) and raises AssertionError naming every field that does not fit,
such as a `null` where the spec has an optional field that is never null. tests/api/conftest.py
applies it to every JSON response the API tests' clients receive.

Where OpenAI's own API answers differently from its spec, the schema is relaxed here, each with the
reason (RELAXED); tunehouse's extension fields are allowed because the spec's objects do not forbid
additional properties.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

WIRE = Path(__file__).with_name("openapi_wire.json")

# (method, path as in the spec) whose 200 response is checked; requests whose fields are listed.
ROUTES = [
    ("post", "/chat/completions"),
    ("get", "/chat/completions"),
    ("get", "/chat/completions/{completion_id}"),
    ("post", "/chat/completions/{completion_id}"),
    ("delete", "/chat/completions/{completion_id}"),
    ("get", "/chat/completions/{completion_id}/messages"),
    ("post", "/completions"),
    ("get", "/files"),
    ("post", "/files"),
    ("get", "/files/{file_id}"),
    ("delete", "/files/{file_id}"),
    ("post", "/fine_tuning/jobs"),
    ("get", "/fine_tuning/jobs"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/pause"),
    ("post", "/fine_tuning/jobs/{fine_tuning_job_id}/resume"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"),
    ("get", "/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("get", "/models"),
    ("get", "/models/{model}"),
    ("delete", "/models/{model}"),
    ("get", "/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions"),
    ("post", "/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions"),
    ("delete", "/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions/{permission_id}"),
    ("post", "/uploads"),
    ("post", "/uploads/{upload_id}/cancel"),
    ("post", "/uploads/{upload_id}/complete"),
    ("post", "/uploads/{upload_id}/parts"),
    ("post", "/responses"),
    ("get", "/responses/{response_id}"),
    ("post", "/responses/{response_id}/cancel"),
    ("get", "/responses/{response_id}/input_items"),
    ("post", "/batches"),
    ("get", "/batches"),
    ("get", "/batches/{batch_id}"),
    ("post", "/batches/{batch_id}/cancel"),
    ("post", "/fine_tuning/alpha/graders/run"),
    ("post", "/fine_tuning/alpha/graders/validate"),
    ("post", "/evals"),
    ("get", "/evals"),
    ("get", "/evals/{eval_id}"),
    ("post", "/evals/{eval_id}"),
    ("delete", "/evals/{eval_id}"),
    ("post", "/evals/{eval_id}/runs"),
    ("get", "/evals/{eval_id}/runs"),
    ("get", "/evals/{eval_id}/runs/{run_id}"),
    ("post", "/evals/{eval_id}/runs/{run_id}"),
    ("delete", "/evals/{eval_id}/runs/{run_id}"),
    ("get", "/evals/{eval_id}/runs/{run_id}/output_items"),
    ("get", "/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"),
    ("get", "/organization/admin_api_keys"),
    ("post", "/organization/admin_api_keys"),
    ("get", "/organization/admin_api_keys/{key_id}"),
    ("delete", "/organization/admin_api_keys/{key_id}"),
    ("get", "/organization/projects"),
    ("post", "/organization/projects"),
    ("get", "/organization/projects/{project_id}"),
    ("post", "/organization/projects/{project_id}"),
    ("post", "/organization/projects/{project_id}/archive"),
    ("get", "/organization/projects/{project_id}/api_keys"),
    ("get", "/organization/projects/{project_id}/api_keys/{api_key_id}"),
    ("delete", "/organization/projects/{project_id}/api_keys/{api_key_id}"),
    ("get", "/organization/audit_logs"),
    ("get", "/organization/costs"),
    ("get", "/organization/usage/completions"),
]
REQUESTS = [
    "CreateChatCompletionRequest",
    "CreateCompletionRequest",
    "CreateFineTuningJobRequest",
    "CreateResponse",
    "CreateBatchRequest",
    "CreateFileRequest",
    "CreateUploadRequest",
    "AddUploadPartRequest",
    "CompleteUploadRequest",
    "CreateFineTuningCheckpointPermissionRequest",
]
EXTRA = ["CreateChatCompletionStreamResponse", "ResponseStreamEvent"]

# Where OpenAI's API itself answers what its spec does not allow, the spec is relaxed:
# - list `first_id`/`last_id`: null for an empty list (there is no first or last object).
# - FineTuningJob `hyperparameters`: null for a DPO job (OpenAI's answers, REFERENCE.md 5.4: "only
#   returned when running supervised jobs"), required by the SDK's type, so present as null.
# - OpenAIFile `purpose` "evals": OpenAI takes uploads for evals and its SDK's FileObject has it.
RELAXED_NULLABLE: dict[str, list[str]] = {
    "ListFineTuningJobCheckpointsResponse": ["first_id", "last_id"],
    "ListFilesResponse": ["first_id", "last_id"],
    "ChatCompletionList": ["first_id", "last_id"],
    "ChatCompletionMessageList": ["first_id", "last_id"],
    "ResponseItemList": ["first_id", "last_id"],
    "ListBatchesResponse": ["first_id", "last_id"],
    "FineTuningJob": ["hyperparameters"],
}
# - FineTuningJob `status` "paused": OpenAI's pause endpoint answers it (REFERENCE.md), the spec's
#   enum lacks it.
RELAXED_ENUM: dict[tuple[str, str], list[str]] = {
    ("OpenAIFile", "purpose"): ["evals"],
    ("FineTuningJob", "status"): ["paused"],
}
_DROP = {"description", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel", "x-stainless-const", "title"}


def _clean(node):
    """Descriptions out, OpenAPI 3.0's `nullable: true` and boolean exclusive bounds as JSON
    Schema's null type and numeric bounds."""
    if isinstance(node, list):
        return [_clean(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key in ("properties", "patternProperties", "$defs"):
            out[key] = {name: _clean(sub) for name, sub in value.items()}
        else:
            out[key] = _clean(value)
    for bound in ("Minimum", "Maximum"):  # OpenAPI 3.0's boolean exclusive bounds, as JSON Schema's
        if isinstance(out.get(f"exclusive{bound}"), bool) and out.pop(f"exclusive{bound}"):
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def extract(spec_path: str) -> dict:
    import yaml

    spec = yaml.load(Path(spec_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schemas = spec["components"]["schemas"]
    routes = {}
    for method, path in ROUTES:
        responses = spec["paths"][path][method]["responses"]
        content = (responses.get("200") or responses["201"])["content"]  # created: 201 in the spec
        ref = content["application/json"]["schema"]["$ref"]
        routes[f"{method.upper()} {path}"] = ref.rsplit("/", 1)[1]
    wanted, todo = set(), [*routes.values(), *REQUESTS, *EXTRA]
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        found: set[str] = set()
        _refs(schemas[name], found)
        todo.extend(found - wanted)
    return {
        "//": f"Extracted from OpenAI's OpenAPI spec (version {spec['info']['version']}) by "
        "tests/api/openapi_wire.py: the schemas of the routes it lists and what they reference.",
        "routes": routes,
        "components": {"schemas": {name: _clean(schemas[name]) for name in sorted(wanted)}},
    }


@cache
def document() -> dict:
    doc = json.loads(WIRE.read_text())
    doc.pop("//")
    schemas = copy.deepcopy(doc["components"]["schemas"])
    for name, fields in RELAXED_NULLABLE.items():
        for field in fields:
            prop = schemas[name]["properties"][field]
            schemas[name]["properties"][field] = {"anyOf": [prop, {"type": "null"}]}
    for (name, field), values in RELAXED_ENUM.items():
        schemas[name]["properties"][field]["enum"] += values
    # A streamed legacy completion's chunks are CreateCompletionResponse objects (the spec has no
    # chunk schema of its own) whose `finish_reason` is null until a choice ends, as OpenAI sends.
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [reason, {"type": "null"}]
    }
    schemas["CompletionChunk"] = chunk
    # A stored completion's messages are the request's: OpenAI lists them with their own roles
    # (user, system, ...), where the spec reuses the assistant's response message.
    message = copy.deepcopy(schemas["ChatCompletionResponseMessage"])
    message["properties"]["role"]["enum"] = ["system", "developer", "user", "assistant", "tool", "function"]
    schemas["ChatCompletionMessageList"]["properties"]["data"]["items"]["allOf"][0] = message
    doc["components"]["schemas"] = schemas
    return doc


def request_fields(name: str) -> set[str]:
    """The properties of a request schema, through its allOf parts."""
    schemas, out = document()["components"]["schemas"], set()
    for part in schemas[name].get("allOf", [schemas[name]]):
        if "$ref" in part:
            out |= request_fields(part["$ref"].rsplit("/", 1)[1])
        else:
            out |= set(part.get("properties", {}))
    return out


def check(obj, schema_name: str) -> None:
    """Raise AssertionError, naming every problem, unless `obj` is a `schema_name`."""
    doc = document()
    validator = Draft202012Validator(
        {"components": doc["components"], "$ref": f"#/components/schemas/{schema_name}"}
    )
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        details = "\n".join(f"- {list(e.absolute_path)}: {e.message[:300]}" for e in errors)
        raise AssertionError(f"not a valid {schema_name}:\n{details}")


@cache
def _route_patterns() -> list[tuple[str, re.Pattern, str]]:
    out = []
    for route, schema in document()["routes"].items():
        method, path = route.split(" ", 1)
        pattern = re.compile("^/v1" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path)) + "$")
        out.append((method, pattern, schema))
    # The most specific first: /models/{model} must not take /files/{id}/content and the like.
    return sorted(out, key=lambda r: -len(r[1].pattern))


def schema_for(method: str, path: str) -> str | None:
    for m, pattern, schema in _route_patterns():
        if m == method.upper() and pattern.match(path):
            return schema
    return None


def check_response(method: str, path: str, body) -> None:
    schema = schema_for(method, path)
    if schema is not None:
        check(body, schema)


if __name__ == "__main__":
    WIRE.write_text(json.dumps(extract(sys.argv[1]), indent=1, sort_keys=False) + "\n")
    print(f"wrote {WIRE}")
