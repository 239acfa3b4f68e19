"""Model graders: `score_model` (a number in `range`) and `label_model` (one of `labels`).

The grader's `input` messages are rendered (templates in string content and in input_text /
output_text parts) and sent to the model through the ModelSampler the caller gives, with a
`response_format` json_schema: the engine decodes under that schema, so even a small model's
answer is `{"result": <number in range>}` or `{"result": "<label>"}` and parses. An answer that
still does not (cut off by max tokens, say) is the item's model_grader_parse_error; a refusal its
model_grader_refusal_error; a failing sampler its model_grader_server_error.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from tunehouse.errors import ModelNotFound
from tunehouse.graders import templates
from tunehouse.graders.base import (
    Checker,
    Completion,
    GradeErrors,
    Grader,
    GradeResult,
    ModelSampler,
    Sample,
    failed,
    is_number,
)

ROLES = ["user", "assistant", "system", "developer"]
TEXT_PARTS = ("input_text", "output_text")
SAMPLING_PARAMS = ("seed", "top_p", "temperature", "max_completions_tokens", "reasoning_effort")


# --------------------------------------------------------------------------------------------------
# Input messages


def _check_part(part: Any, param: str, checker: Checker) -> None:
    if isinstance(part, str):
        for problem in templates.problems(part):
            checker.add(param, f"Invalid template in '{param}': {problem}")
        return
    if not isinstance(part, dict):
        checker.add(
            param, f"Invalid type for '{param}': expected a string or a content object.", "invalid_type"
        )
        return
    kind = part.get("type")
    if kind in ("input_image", "input_audio"):
        checker.add(
            f"{param}.type",
            f"Invalid value for '{param}.type': '{kind}' content is not supported; the models served "
            "here read text only (input_text or output_text).",
        )
        return
    if kind not in TEXT_PARTS:
        checker.add(
            f"{param}.type",
            f"Invalid value for '{param}.type': {json.dumps(kind)}. Supported values are: 'input_text' and 'output_text'.",
        )
        return
    checker.fields(part, param, required=("type", "text"), optional=())
    text = checker.expect(part, "text", param, "string")
    if text is not None:
        for problem in templates.problems(text):
            checker.add(f"{param}.text", f"Invalid template in '{param}.text': {problem}")


def check_messages(spec: dict, param: str, checker: Checker) -> None:
    messages = checker.expect(spec, "input", param, "array")
    if messages is None:
        return
    if not messages:
        checker.add(f"{param}.input", f"Invalid value for '{param}.input': expected at least one message.")
    for i, message in enumerate(messages):
        where = f"{param}.input[{i}]"
        if not isinstance(message, dict):
            checker.add(where, f"Invalid type for '{where}': expected a message object.", "invalid_type")
            continue
        checker.fields(message, where, required=("role", "content"), optional=("type",))
        checker.enum(message, "role", where, ROLES)
        if "type" in message and message["type"] != "message":
            checker.add(f"{where}.type", f"Invalid value for '{where}.type': it is always 'message'.")
        if "content" not in message:
            continue
        content = message["content"]
        if isinstance(content, list):
            if not content:
                checker.add(
                    f"{where}.content", f"Invalid value for '{where}.content': expected at least one part."
                )
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]", checker)
        else:
            _check_part(content, f"{where}.content", checker)


def _texts(content: Any) -> list[str]:
    parts = content if isinstance(content, list) else [content]
    return [p if isinstance(p, str) else p["text"] for p in parts]


def render_messages(messages: list[dict], sample: Sample, item: dict) -> list[dict]:
    """Chat messages with text content, every template filled (raises TemplateError)."""
    ns = sample.namespace()
    out = []
    for message in messages:
        # Parts join as chat's text parts do (data/chat.py): with nothing between them.
        text = "".join(templates.render(t, ns, item) for t in _texts(message["content"]))
        out.append({"role": message["role"], "content": text})
    return out


def message_references(messages: list[dict]) -> set[str]:
    return {ref.path for m in messages for t in _texts(m["content"]) for ref in templates.references(t)}


# --------------------------------------------------------------------------------------------------
# Shared by both model graders


class ModelGrader(Grader):
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name", "model", "input")

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        model = checker.expect(spec, "model", param, "string")
        if model is not None and not model.strip():
            checker.add(f"{param}.model", f"Invalid value for '{param}.model': expected a model name.")
        check_messages(spec, param, checker)

    @property
    def model(self) -> str:
        return self.spec["model"]

    def references(self) -> set[str]:
        return message_references(self.spec["input"])

    def models(self) -> dict[str, str]:
        return {self.model: f"{self.param}.model"}

    def response_format(self) -> dict:
        raise NotImplementedError

    def sampling(self) -> dict:
        return {}

    def _sample(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> tuple[GradeResult, Any]:
        """(result so far, the answer's `result` value); the value is None when the result is failed."""
        messages = render_messages(self.spec["input"], sample, item)
        if sampler is None:
            details = "No model sampler is available to this grader."
            return failed(
                GradeErrors(model_grader_server_error=True, model_grader_server_error_details=details),
                details,
            ), None
        try:
            completion: Completion = sampler.complete(
                self.model, messages, response_format=self.response_format(), **self.sampling()
            )
        except ModelNotFound:
            raise
        except Exception as e:
            details = f"{type(e).__name__}: {e}"
            errors = GradeErrors(model_grader_server_error=True, model_grader_server_error_details=details)
            return failed(errors, f"The grader model failed: {details}"), None
        result = GradeResult(sampled_model_name=completion.model)
        result.add_usage(completion.model, completion.prompt_tokens, completion.completion_tokens)
        if completion.refusal:
            result.errors.model_grader_refusal_error = True
            result.error_message = f"The grader model refused: {completion.refusal}"
            return result, None
        try:
            answer = json.loads(completion.text)
        except ValueError:
            answer = None
        value = answer.get("result") if isinstance(answer, dict) else None
        problem = None if value is None else self.problem(value)
        if value is None or problem:
            result.errors.model_grader_parse_error = True
            shown = completion.text if len(completion.text) <= 200 else completion.text[:200] + "..."
            result.error_message = problem or f"The grader model's answer is not {self.expected()}: {shown!r}"
            return result, None
        return result, value

    def expected(self) -> str:
        raise NotImplementedError

    def problem(self, value: Any) -> str | None:
        """Why a parsed `result` is not acceptable, or None."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# score_model


class ScoreModelGrader(ModelGrader):
    type = "score_model"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("range", "sampling_params")
    TAKES_PASS_THRESHOLD = True

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        super().check(spec, param, checker)
        bounds = checker.expect(spec, "range", param, "array")
        if bounds is not None and not (
            len(bounds) == 2 and all(is_number(b) for b in bounds) and bounds[0] < bounds[1]
        ):
            checker.add(
                f"{param}.range",
                f"Invalid value for '{param}.range': expected two numbers [low, high] with low < high.",
            )
        params = checker.expect(spec, "sampling_params", param, "object")
        if params is None:
            return
        where = f"{param}.sampling_params"
        checker.fields(params, where, required=(), optional=SAMPLING_PARAMS)
        checker.expect(params, "seed", where, "integer", nullable=True)
        top_p = checker.expect(params, "top_p", where, "number", nullable=True)
        if top_p is not None and not 0 <= top_p <= 1:
            checker.add(
                f"{where}.top_p", f"Invalid value for '{where}.top_p': expected a number from 0 to 1."
            )
        temperature = checker.expect(params, "temperature", where, "number", nullable=True)
        if temperature is not None and not 0 <= temperature <= 2:
            checker.add(
                f"{where}.temperature",
                f"Invalid value for '{where}.temperature': expected a number from 0 to 2.",
            )
        most = checker.expect(params, "max_completions_tokens", where, "integer", nullable=True)
        if most is not None and most < 1:
            checker.add(
                f"{where}.max_completions_tokens",
                f"Invalid value for '{where}.max_completions_tokens': expected an integer of at least 1.",
            )
        # The models served here do not reason before answering: only "none" is honoured.
        effort = params.get("reasoning_effort")
        if effort not in (None, "none"):
            checker.add(
                f"{where}.reasoning_effort",
                f"Unsupported value for '{where}.reasoning_effort': {json.dumps(effort)}. The models served "
                "here do not reason; use null or 'none'.",
                "unsupported_value",
            )

    @property
    def range(self) -> tuple[float, float]:
        low, high = self.spec.get("range") or (0, 1)
        return float(low), float(high)

    def response_format(self) -> dict:
        low, high = self.range
        schema = {
            "type": "object",
            "properties": {"result": {"type": "number", "minimum": low, "maximum": high}},
            "required": ["result"],
            "additionalProperties": False,
        }
        return {"type": "json_schema", "json_schema": {"name": "score", "strict": True, "schema": schema}}

    def sampling(self) -> dict:
        params = self.spec.get("sampling_params") or {}
        return {
            "temperature": params.get("temperature"),
            "top_p": params.get("top_p"),
            "seed": params.get("seed"),
            "max_tokens": params.get("max_completions_tokens"),
        }

    def expected(self) -> str:
        low, high = self.range
        return f'{{"result": <a number from {low:g} to {high:g}>}}'

    def problem(self, value: Any) -> str | None:
        low, high = self.range
        if not is_number(value):
            return f"The grader model's result is not a number: {json.dumps(value)}."
        if not low <= value <= high:
            return f"The grader model's score {value} is outside the range [{low:g}, {high:g}]."
        return None

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        result, value = self._sample(sample, item, sampler)
        if value is not None:
            result.reward = float(value)
        return result

    def threshold(self) -> float:
        """`pass_threshold` when given, else the middle of the range."""
        if self.pass_threshold is not None:
            return self.pass_threshold
        low, high = self.range
        return (low + high) / 2


# --------------------------------------------------------------------------------------------------
# label_model


class LabelModelGrader(ModelGrader):
    type = "label_model"
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name", "model", "input", "labels", "passing_labels")

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        super().check(spec, param, checker)
        labels = cls._strings(spec, "labels", param, checker)
        passing = cls._strings(spec, "passing_labels", param, checker)
        if labels is not None and len(set(labels)) != len(labels):
            checker.add(f"{param}.labels", f"Invalid value for '{param}.labels': labels must be distinct.")
        if labels is not None and passing is not None:
            extra = [p for p in passing if p not in labels]
            if extra:
                checker.add(
                    f"{param}.passing_labels",
                    f"Invalid value for '{param}.passing_labels': {', '.join(map(repr, extra))} "
                    f"not in '{param}.labels' (passing labels must be a subset of labels).",
                )

    @staticmethod
    def _strings(spec: dict, name: str, param: str, checker: Checker) -> list[str] | None:
        values = checker.expect(spec, name, param, "array")
        if values is None:
            return None
        if not values or not all(isinstance(v, str) and v for v in values):
            checker.add(
                f"{param}.{name}",
                f"Invalid value for '{param}.{name}': expected a non-empty array of strings.",
            )
            return None
        return values

    def response_format(self) -> dict:
        schema = {
            "type": "object",
            "properties": {"result": {"type": "string", "enum": list(self.spec["labels"])}},
            "required": ["result"],
            "additionalProperties": False,
        }
        return {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": schema}}

    def expected(self) -> str:
        return f'{{"result": <one of {", ".join(map(repr, self.spec["labels"]))}>}}'

    def problem(self, value: Any) -> str | None:
        if value not in self.spec["labels"]:
            return f"The grader model's label {json.dumps(value)} is not one of the labels."
        return None

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        result, value = self._sample(sample, item, sampler)
        if value is not None:
            result.label = value
            result.reward = 1.0 if value in self.spec["passing_labels"] else 0.0
        return result

    def passed(self, result: GradeResult) -> bool:
        return not result.errored and result.label in self.spec["passing_labels"]
