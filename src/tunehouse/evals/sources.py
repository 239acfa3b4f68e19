"""A run's data source (OpenAI's CreateEvalRunRequest.data_source), checked before anything runs.

- `jsonl`: items, each with the sample to grade (`{"item": {...}, "sample": {"output_text": ...}}`),
  given inline (`file_content`) or as a JSONL file of such lines (`file_id`, purpose "evals").
- `completions`: items whose samples the run generates with `model`: `input_messages` is a chat
  template (`{{item.…}}` filled per item) or an `item_reference` to the item's own messages.
- `responses`: refused; tunehouse has no Responses API yet.

`check_lines` reports every problem of every item at once, located (content[3], line 4): an item
that breaks the eval's item_schema, a template reference an item cannot fill (in input_messages or
in a testing criterion), a sample missing where a criterion reads one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jsonschema.validators import validator_for

from tunehouse.errors import InvalidRequest
from tunehouse.evals.definitions import DataSourceConfig
from tunehouse.graders import Grader, Sample
from tunehouse.graders.templates import Reference, TemplateError, render, resolve
from tunehouse.graders.templates import references as template_references
from tunehouse.inference.constrained import InvalidResponseFormat, validate_response_format
from tunehouse.inference.engine import SamplingParams

ROLES = ("user", "assistant", "system", "developer")
SOURCE_TYPES = {"jsonl": ("file_content", "file_id"), "completions": ("file_content", "file_id")}
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "max_completion_tokens",
    "max_completions_tokens",  # OpenAI's own examples spell it so
    "response_format",
    "reasoning_effort",
    "tools",
)
DEFAULT_SEED = 42  # OpenAI's default for eval runs
MAX_REPORTED = 20  # problems listed in one error message


@dataclass
class Line:
    """One item of a run's data source."""

    index: int  # datasource_item_id: its position in the source, from 0
    item: dict[str, Any]
    sample: dict[str, Any] | None = None  # jsonl runs: the given sample to grade
    where: str = ""  # how messages name it: "content[3]" or "line 4"


@dataclass
class RunSource:
    type: str  # "jsonl" | "completions"
    source: dict[str, Any]  # {"type": "file_content", "content": [...]} | {"type": "file_id", "id": ...}
    model: str | None = None
    input_messages: dict[str, Any] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # as given, normalized names
    sampling_given: dict[str, Any] | None = None  # as given, echoed

    @property
    def file_id(self) -> str | None:
        return self.source.get("id") if self.source.get("type") == "file_id" else None

    @property
    def generates(self) -> bool:
        return self.type == "completions"

    def wire(self) -> dict[str, Any]:
        """The data source as stored and echoed (template messages as EvalItems)."""
        if self.type == "jsonl":
            return {"type": "jsonl", "source": self.source}
        out = {
            "type": self.type,
            "source": self.source,
            "input_messages": self.input_messages,
            "model": self.model,
        }
        if self.sampling_given is not None:
            out["sampling_params"] = self.sampling_given
        return out


def _bad(param: str, message: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else "null"
    )


def _expect(spec: dict, name: str, param: str, kind: type | tuple, what: str, *, required: bool = False):
    if name not in spec:
        if required:
            raise _bad(
                f"{param}.{name}",
                f"Missing required parameter: '{param}.{name}'.",
                "missing_required_parameter",
            )
        return None
    value = spec[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _bad(
            f"{param}.{name}",
            f"Invalid type for '{param}.{name}': expected {what}, but got {_kind(value)} instead.",
            "invalid_type",
        )
    return value


def _only(spec: dict, param: str, allowed: tuple[str, ...]) -> None:
    for name in spec:
        if name not in allowed:
            raise _bad(f"{param}.{name}", f"Unknown parameter: '{param}.{name}'.", "unknown_parameter")


# --------------------------------------------------------------------------------------------------
# The data_source object


def parse_run_data_source(spec: Any, *, param: str = "data_source") -> RunSource:
    if not isinstance(spec, dict):
        raise _bad(
            param,
            f"Invalid type for '{param}': expected an object, but got {_kind(spec)} instead.",
            "invalid_type",
        )
    kind = _expect(spec, "type", param, str, "a string", required=True)
    if kind == "responses":
        raise _bad(
            f"{param}.type",
            "tunehouse has no Responses API yet, so a run cannot generate with a 'responses' data "
            "source. Use 'completions' (the same input_messages and sampling_params, generated with "
            "chat completions) or 'jsonl' with the samples given.",
            "unsupported_value",
        )
    if kind not in SOURCE_TYPES:
        raise _bad(
            f"{param}.type",
            f"Invalid value for '{param}.type': {kind!r}. Supported values are: 'jsonl' and 'completions'.",
        )
    if kind == "jsonl":
        _only(spec, param, ("type", "source"))
    else:
        _only(spec, param, ("type", "source", "input_messages", "model", "sampling_params"))
    source = _parse_source(
        _expect(spec, "source", param, dict, "an object", required=True), kind, f"{param}.source"
    )
    if kind == "jsonl":
        return RunSource(type=kind, source=source)
    model = _expect(spec, "model", param, str, "a string", required=True)
    if not model:
        raise _bad(
            f"{param}.model", f"Invalid '{param}.model': a model name is required to generate samples."
        )
    messages = _expect(spec, "input_messages", param, dict, "an object", required=True)
    input_messages = _parse_input_messages(messages, f"{param}.input_messages")
    given = (
        _expect(spec, "sampling_params", param, dict, "an object")
        if spec.get("sampling_params") is not None
        else None
    )
    sampling = _parse_sampling(given or {}, f"{param}.sampling_params")
    return RunSource(
        type=kind,
        source=source,
        model=model,
        input_messages=input_messages,
        sampling=sampling,
        sampling_given=given,
    )


def _parse_source(spec: dict, kind: str, param: str) -> dict:
    stype = _expect(spec, "type", param, str, "a string", required=True)
    if stype == "stored_completions":
        raise _bad(
            f"{param}.type",
            "tunehouse does not store chat completions, so a run cannot draw its items from "
            "'stored_completions'. Give the items as 'file_content' or a 'file_id'.",
            "unsupported_value",
        )
    if stype not in SOURCE_TYPES[kind]:
        raise _bad(
            f"{param}.type",
            f"Invalid value for '{param}.type': {stype!r}. Supported values are: 'file_content' and 'file_id'.",
        )
    if stype == "file_id":
        _only(spec, param, ("type", "id"))
        file_id = _expect(spec, "id", param, str, "a string", required=True)
        return {"type": stype, "id": file_id}
    _only(spec, param, ("type", "content"))
    content = _expect(spec, "content", param, list, "an array", required=True)
    if not content:
        raise _bad(
            f"{param}.content", f"Invalid '{param}.content': a run needs at least one item.", "empty_array"
        )
    for i, row in enumerate(content):
        p = f"{param}.content[{i}]"
        if not isinstance(row, dict):
            raise _bad(
                p,
                f"Invalid type for '{p}': expected an object with 'item', but got {_kind(row)} instead.",
                "invalid_type",
            )
        _only(row, p, ("item", "sample"))
        _expect(row, "item", p, dict, "an object", required=True)
        _expect(row, "sample", p, dict, "an object")
    return {"type": stype, "content": content}


def _parse_input_messages(spec: dict, param: str) -> dict:
    kind = _expect(spec, "type", param, str, "a string", required=True)
    if kind == "item_reference":
        _only(spec, param, ("type", "item_reference"))
        ref = _expect(spec, "item_reference", param, str, "a string", required=True)
        refs = template_references("{{" + ref + "}}")
        if len(refs) != 1 or refs[0].namespace != "item":
            raise _bad(
                f"{param}.item_reference",
                f"Invalid '{param}.item_reference': {ref!r} must name a field of the item that holds its "
                "chat messages, e.g. 'item.messages'.",
            )
        return {"type": kind, "item_reference": ref}
    if kind != "template":
        raise _bad(
            f"{param}.type",
            f"Invalid value for '{param}.type': {kind!r}. Supported values are: 'template' and 'item_reference'.",
        )
    _only(spec, param, ("type", "template"))
    template = _expect(spec, "template", param, list, "an array", required=True)
    if not template:
        raise _bad(
            f"{param}.template", f"Invalid '{param}.template': it needs at least one message.", "empty_array"
        )
    normalized = []
    for i, message in enumerate(template):
        role, texts = _message_texts(message, f"{param}.template[{i}]")
        normalized.append(_as_eval_item(role, message["content"], texts))
        for where, text in _template_texts(message, f"{param}.template[{i}]"):
            for ref in template_references(text):
                if ref.namespace == "sample":
                    raise _bad(
                        where,
                        f"'{{{{{ref.path}}}}}' cannot be used in input_messages: the sample is what these "
                        "messages generate. Use {{item.…}} references.",
                        "invalid_template",
                    )
    return {"type": kind, "template": normalized}


def _as_eval_item(role: str, content: Any, texts: list[str]) -> dict:
    """A template message as OpenAI echoes it: an EvalItem with one text part (the parts of a
    list joined, as they are sent)."""
    parts = content if isinstance(content, list) else [content]
    kinds = {p.get("type") if isinstance(p, dict) else "input_text" for p in parts}
    kind = "output_text" if kinds == {"output_text"} else "input_text"
    return {"type": "message", "role": role, "content": {"type": kind, "text": "".join(texts)}}


def _message_texts(message: Any, param: str) -> tuple[str, list[str]]:
    """(role, text parts) of a template or item message: EasyInputMessage, EvalItem, or a plain
    {role, content}. Images, audio and files are refused: tunehouse's models read text."""
    if not isinstance(message, dict):
        raise _bad(
            param,
            f"Invalid type for '{param}': expected a message object, but got {_kind(message)} instead.",
            "invalid_type",
        )
    _only(message, param, ("role", "content", "type", "phase"))
    if message.get("type", "message") != "message":
        raise _bad(
            f"{param}.type",
            f"Invalid value for '{param}.type': {message.get('type')!r}. Supported values are: 'message'.",
        )
    role = _expect(message, "role", param, str, "a string", required=True)
    if role not in ROLES:
        raise _bad(
            f"{param}.role",
            f"Invalid value for '{param}.role': {role!r}. Supported values are: "
            + ", ".join(f"'{r}'" for r in ROLES)
            + ".",
        )
    if "content" not in message:
        raise _bad(
            f"{param}.content",
            f"Missing required parameter: '{param}.content'.",
            "missing_required_parameter",
        )
    content = message["content"]
    parts = content if isinstance(content, list) else [content]
    texts = []
    for j, part in enumerate(parts):
        p = f"{param}.content[{j}]" if isinstance(content, list) else f"{param}.content"
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text"):
            _only(part, p, ("type", "text"))
            texts.append(_expect(part, "text", p, str, "a string", required=True))
        elif isinstance(part, dict) and part.get("type") in ("input_image", "input_audio", "input_file"):
            raise _bad(
                f"{p}.type",
                f"'{part['type']}' content is not supported: tunehouse's models read text only. Use "
                "input_text.",
                "unsupported_value",
            )
        else:
            raise _bad(
                p, f"Invalid '{p}': expected a string or an input_text/output_text part.", "invalid_type"
            )
    return role, texts


def _template_texts(message: dict, param: str) -> list[tuple[str, str]]:
    content = message.get("content")
    if isinstance(content, str):
        return [(f"{param}.content", content)]
    parts = content if isinstance(content, list) else [content]
    out = []
    for j, part in enumerate(parts):
        p = f"{param}.content[{j}]" if isinstance(content, list) else f"{param}.content"
        if isinstance(part, str):
            out.append((p, part))
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            out.append((f"{p}.text", part["text"]))
    return out


def _parse_sampling(spec: dict, param: str) -> dict:
    _only(spec, param, SAMPLING_FIELDS)
    out: dict[str, Any] = {}
    t = _expect(spec, "temperature", param, (int, float), "a number")
    if t is not None:
        if not 0 <= t <= 2:
            raise _bad(
                f"{param}.temperature", f"Invalid '{param}.temperature': {t}. It must be between 0 and 2."
            )
        out["temperature"] = float(t)
    p = _expect(spec, "top_p", param, (int, float), "a number")
    if p is not None:
        if not 0 < p <= 1:
            raise _bad(f"{param}.top_p", f"Invalid '{param}.top_p': {p}. It must be above 0 and at most 1.")
        out["top_p"] = float(p)
    seed = _expect(spec, "seed", param, int, "an integer")
    if seed is not None:
        out["seed"] = seed
    for name in ("max_completion_tokens", "max_completions_tokens"):
        n = _expect(spec, name, param, int, "an integer")
        if n is not None:
            if n < 1:
                raise _bad(f"{param}.{name}", f"Invalid '{param}.{name}': {n}. It must be at least 1.")
            out["max_completion_tokens"] = n
    if spec.get("reasoning_effort") is not None:
        raise _bad(
            f"{param}.reasoning_effort",
            "reasoning_effort is not supported: tunehouse's models are not reasoning models.",
            "unsupported_parameter",
        )
    if spec.get("tools"):
        raise _bad(
            f"{param}.tools",
            "tools are not supported in eval runs yet: a run grades the text its model answers.",
            "unsupported_parameter",
        )
    fmt = spec.get("response_format")
    if fmt is not None:
        try:
            validate_response_format(fmt)
        except InvalidResponseFormat as e:
            raise _bad(
                f"{param}.response_format", str(e).replace("'response_format", f"'{param}.response_format")
            ) from None
        out["response_format"] = fmt
    return out


def sampling_params(source: RunSource) -> SamplingParams:
    s = source.sampling
    return SamplingParams(
        max_tokens=s.get("max_completion_tokens"),
        temperature=s.get("temperature", 1.0),
        top_p=s.get("top_p", 1.0),
        seed=s.get("seed", DEFAULT_SEED),
        response_format=s.get("response_format"),
    )


# --------------------------------------------------------------------------------------------------
# Items


def lines_from_content(source: dict) -> list[Line]:
    return [
        Line(index=i, item=row["item"], sample=row.get("sample"), where=f"content[{i}]")
        for i, row in enumerate(source["content"])
    ]


def lines_from_jsonl(text: str) -> tuple[list[Line], list[str]]:
    """A JSONL file's items (blank lines skipped) and the problems of the lines that are not
    {"item": {...}, "sample"?: {...}}."""
    lines: list[Line] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(raw)
        except ValueError as e:
            problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("item"), dict):
            problems.append(f'{where}: expected an object {{"item": {{...}}, "sample"?: {{...}}}}')
            continue
        extra = sorted(set(row) - {"item", "sample"})
        if extra:
            problems.append(
                f"{where}: unknown field {extra[0]!r} (a line has 'item' and optionally 'sample')"
            )
            continue
        if "sample" in row and not isinstance(row["sample"], dict):
            problems.append(f"{where}: 'sample' must be an object")
            continue
        lines.append(Line(index=len(lines), item=row["item"], sample=row.get("sample"), where=where))
    if not lines and not problems:
        problems.append("the file has no items")
    return lines, problems


def given_sample(sample: dict | None) -> Sample | None:
    """A jsonl line's sample as graders read it: output_text (or the first choice's message),
    output_json (given, or parsed from the text), output_tools."""
    if sample is None:
        return None
    text = sample.get("output_text")
    if not isinstance(text, str):
        choices = sample.get("choices") or [{}]
        content = (
            ((choices[0] or {}).get("message") or {}).get("content") if isinstance(choices[0], dict) else None
        )
        text = content if isinstance(content, str) else None
    if text is None:
        return None
    parsed = Sample.from_text(text)
    output_json = sample.get("output_json", parsed.output_json)
    return Sample(output_text=text, output_json=output_json, output_tools=sample.get("output_tools"))


def _ref(path: str) -> Reference:
    return template_references("{{" + path + "}}")[0]


def check_lines(
    lines: list[Line], source: RunSource, config: DataSourceConfig, graders: list[Grader]
) -> list[tuple[Line, str]]:
    """Every problem of every item: (the item, what is wrong)."""
    validator = validator_for(config.item_schema)(config.item_schema)
    criteria_refs = sorted({r for g in graders for r in g.references()})
    problems: list[tuple[Line, str]] = []
    for line in lines:
        for err in sorted(validator.iter_errors(line.item), key=lambda e: [str(p) for p in e.path]):
            at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path)
            problems.append((line, f"item{at} does not match the eval's item_schema: {err.message}"))
        sample = given_sample(line.sample)
        if line.sample is not None and sample is None:
            problems.append((line, "the sample has no 'output_text' (a string) to grade"))
        namespace = sample.namespace() if sample is not None else None
        for path in criteria_refs:
            if path.startswith("sample"):
                if source.generates:
                    continue  # filled by generation
                if namespace is None:
                    if line.sample is None:
                        problems.append(
                            (
                                line,
                                f"a testing criterion reads {{{{{path}}}}}, but the item has no 'sample' "
                                "(a jsonl run grades the samples it is given)",
                            )
                        )
                    continue
            try:
                resolve(_ref(path), namespace or {}, line.item)
            except TemplateError as e:
                problems.append((line, str(e)))
        if source.generates:
            try:
                prompt_messages(source, line)
            except TemplateError as e:
                problems.append((line, str(e)))
            except InvalidRequest as e:
                problems.append((line, e.message))
    return problems


def report(problems: list[tuple[Line, str]] | list[str], *, param: str, what: str) -> InvalidRequest:
    """One 400 for every problem found (the first MAX_REPORTED listed), each with where it is."""
    texts = [p if isinstance(p, str) else f"{p[0].where}: {p[1]}" for p in problems]
    shown = texts[:MAX_REPORTED]
    more = f"\n… and {len(texts) - len(shown)} more" if len(texts) > len(shown) else ""
    if len(texts) == 1:
        message = f"Invalid {what}: {texts[0]}"
    else:
        message = f"{len(texts)} problems in {what}:\n" + "\n".join(f"- {t}" for t in shown) + more
    return InvalidRequest(message, param=param, code="invalid_data_source")


def prompt_messages(source: RunSource, line: Line) -> list[dict]:
    """The chat messages a completions run sends for one item. Raises TemplateError (a
    reference the item cannot fill) or InvalidRequest (an item_reference that holds no messages)."""
    spec = source.input_messages or {}
    if spec.get("type") == "item_reference":
        messages = resolve(_ref(spec["item_reference"]), {}, line.item)
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(f"{spec['item_reference']} is not a list of chat messages")
        out = []
        for i, m in enumerate(messages):
            role, texts = _message_texts(m, f"{spec['item_reference']}[{i}]")
            out.append({"role": role, "content": "".join(texts)})
        return out
    out = []
    for i, message in enumerate(spec.get("template") or []):
        role, texts = _message_texts(message, f"template[{i}]")
        out.append({"role": role, "content": "".join(render(t, {}, line.item) for t in texts)})
    return out
