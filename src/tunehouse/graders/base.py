"""What every grader shares: the sample and item it reads, the result it returns (OpenAI's
`metadata.errors` flags included), the sampler model graders call, and the validation helper that
collects every problem of a grader object before reporting them at once."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from tunehouse.errors import InvalidRequest, ModelNotFound
from tunehouse.graders.templates import TemplateError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# What a grader reads


@dataclass
class Sample:
    """A model's answer as graders see it (`{{sample.*}}`, the python grader's `sample`)."""

    output_text: str
    output_json: Any | None = None
    output_tools: list | None = None

    @classmethod
    def from_text(cls, text: str) -> Sample:
        """`output_json` is the text parsed when it is valid JSON (OpenAI's rule), else None."""
        try:
            parsed = json.loads(text)
        except (ValueError, TypeError):
            parsed = None
        return cls(output_text=text, output_json=parsed)

    def namespace(self) -> dict[str, Any]:
        """OpenAI's `sample` object: what templates and python graders read."""
        return {
            "output_text": self.output_text,
            "output_json": self.output_json,
            "output_tools": list(self.output_tools or []),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.output_text},
                    "finish_reason": "stop",
                }
            ],
        }


# --------------------------------------------------------------------------------------------------
# Model graders' access to a model


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    refusal: str | None = None  # a model's refusal, when the sampler reports one


class ModelSampler(Protocol):
    """How model graders reach a model (the API's engine, an eval worker's engine, a test double).
    Raises tunehouse.errors.ModelNotFound for an unknown model; any other exception is reported
    as the item's model_grader_server_error."""

    def complete(
        self,
        model: str,
        messages: list[dict],
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        response_format: dict | None = None,
    ) -> Completion: ...


# --------------------------------------------------------------------------------------------------
# What a grader returns


@dataclass
class GradeErrors:
    """OpenAI's `metadata.errors`: every flag always present."""

    formula_parse_error: bool = False
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False
    invalid_variable_error: bool = False
    other_error: bool = False
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    model_grader_server_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_server_error_details: str | None = None

    def any(self) -> bool:
        return any(v is True for v in asdict(self).values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, other: GradeErrors) -> None:
        """Raise every flag `other` raises (a multi grader reports its sub-graders' errors)."""
        for key, value in asdict(other).items():
            if value is True or (value is not None and getattr(self, key) is None):
                setattr(self, key, value)


@dataclass
class GradeResult:
    reward: float = 0.0
    errors: GradeErrors = field(default_factory=GradeErrors)
    execution_time: float = 0.0
    scores: dict[str, Any] = field(default_factory=dict)
    sub_rewards: dict[str, float] = field(default_factory=dict)
    token_usage: int | None = None
    sampled_model_name: str | None = None
    model_usage: dict[str, dict] = field(default_factory=dict)
    label: str | None = None
    error_message: str | None = None

    @property
    def errored(self) -> bool:
        return self.errors.any()

    def metadata(self, grader: Grader) -> dict[str, Any]:
        """OpenAI's RunGraderResponse.metadata."""
        return {
            "name": grader.name,
            "type": grader.type,
            "errors": self.errors.to_dict(),
            "execution_time": self.execution_time,
            "scores": dict(self.scores),
            "token_usage": self.token_usage,
            "sampled_model_name": self.sampled_model_name,
        }

    def add_usage(self, model: str, prompt_tokens: int, completion_tokens: int, invocations: int = 1) -> None:
        entry = self.model_usage.setdefault(
            model,
            {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
                "cached_tokens": 0,
                "invocation_count": 0,
            },
        )
        entry["prompt_tokens"] += prompt_tokens
        entry["completion_tokens"] += completion_tokens
        entry["total_tokens"] += prompt_tokens + completion_tokens
        entry["invocation_count"] += invocations
        self.token_usage = (self.token_usage or 0) + prompt_tokens + completion_tokens


def failed(errors: GradeErrors, message: str) -> GradeResult:
    return GradeResult(reward=0.0, errors=errors, error_message=message)


# --------------------------------------------------------------------------------------------------
# Validation: every problem of a grader object, then one InvalidRequest


@dataclass
class Problem:
    param: str
    message: str
    code: str


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def choices_text(values: list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Checker:
    """Collects the problems of one grader object (and its nested graders) with their param paths."""

    allow_label_model: bool = True
    allow_pass_threshold: bool = True
    problems: list[Problem] = field(default_factory=list)
    # parse(spec, param, checker, in_multi=...) for a multi grader's sub-graders (set by parse_grader)
    parse_child: Callable[..., Grader | None] | None = None

    def add(self, param: str, message: str, code: str = "invalid_value") -> None:
        self.problems.append(Problem(param, message, code))

    def fields(self, spec: dict, param: str, *, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
        """Required fields present, and no field we would not honour."""
        for name in required:
            if name not in spec:
                self.add(
                    f"{param}.{name}",
                    f"Missing required parameter: '{param}.{name}'.",
                    "missing_required_parameter",
                )
        for name in spec:
            if name not in required and name not in optional:
                self.add(f"{param}.{name}", f"Unknown parameter: '{param}.{name}'.", "unknown_parameter")

    def expect(self, spec: dict, name: str, param: str, kind: str, *, nullable: bool = False) -> Any:
        """The field's value when it has the expected JSON type ("string", "number", "integer",
        "array", "object"), else None (and a problem). An absent field is None, silently."""
        if name not in spec:
            return None
        value = spec[name]
        if value is None and nullable:
            return None
        ok = {
            "string": isinstance(value, str),
            "number": is_number(value),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "array": isinstance(value, list),
            "object": isinstance(value, dict),
        }[kind]
        if not ok:
            article = "an" if kind[0] in "aeiou" else "a"
            self.add(
                f"{param}.{name}",
                f"Invalid type for '{param}.{name}': expected {article} {kind}, but got {kind_of(value)} instead.",
                "invalid_type",
            )
            return None
        return value

    def enum(self, spec: dict, name: str, param: str, values: list[str]) -> str | None:
        value = self.expect(spec, name, param, "string")
        if value is not None and value not in values:
            self.add(
                f"{param}.{name}",
                f"Invalid value for '{param}.{name}': '{value}'. Supported values are: {choices_text(values)}.",
            )
            return None
        return value

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        first = self.problems[0]
        if len(self.problems) == 1:
            message = first.message
        else:
            lines = "\n".join(f"- {p.message}" for p in self.problems)
            message = f"The grader has {len(self.problems)} problems:\n{lines}"
        raise InvalidRequest(message, param=first.param, code=first.code)


# --------------------------------------------------------------------------------------------------
# The grader interface


class Grader:
    """One validated grader. Subclasses set `type`, `FIELDS`, and implement `check` and `_grade`."""

    type: ClassVar[str]
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name")
    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    # Types whose eval criteria take a pass_threshold (EvalGraderTextSimilarity/Python/ScoreModel).
    TAKES_PASS_THRESHOLD: ClassVar[bool] = False

    def __init__(self, spec: dict, param: str):
        self.spec = spec
        self.param = param
        self.name: str = spec["name"]
        self.pass_threshold: float | None = spec.get("pass_threshold")

    # ---- parsing ----------------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: dict, param: str, checker: Checker) -> Grader | None:
        """Check the object (adding every problem to `checker`); the grader when it has none."""
        before = len(checker.problems)
        optional = cls.OPTIONAL
        if cls.TAKES_PASS_THRESHOLD and checker.allow_pass_threshold:
            optional = (*optional, "pass_threshold")
            checker.expect(spec, "pass_threshold", param, "number")
        checker.fields(spec, param, required=cls.REQUIRED, optional=optional)
        checker.expect(spec, "name", param, "string")
        cls.check(spec, param, checker)
        if len(checker.problems) > before:
            return None
        return cls(spec, param)

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        """The type's own fields."""

    # ---- what it reads ----------------------------------------------------------------------------

    def references(self) -> set[str]:
        """The template references it uses (`item.label`, `sample.output_json.answer`, ...)."""
        return set()

    def models(self) -> dict[str, str]:
        """Model name → the param path of the first grader that samples it."""
        return {}

    # ---- grading ----------------------------------------------------------------------------------

    def grade(self, sample: Sample, item: dict, *, sampler: ModelSampler | None = None) -> GradeResult:
        """Grade one sample. Never raises for a bad item or answer (the result's error flags say
        what went wrong); a sampler's ModelNotFound is raised (the caller answers 404)."""
        start = time.perf_counter()
        try:
            result = self._grade(sample, item or {}, sampler)
        except TemplateError as e:
            errors = GradeErrors(sample_parse_error=e.sample_parse, invalid_variable_error=not e.sample_parse)
            result = failed(errors, str(e))
        except ModelNotFound:
            raise
        except Exception as e:  # a grader bug must cost one item, not the run
            log.exception("grader %r failed", self.name)
            result = failed(GradeErrors(other_error=True), f"{type(e).__name__}: {e}")
        if result.errored:
            result.reward = 0.0
        result.execution_time = time.perf_counter() - start
        return result

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        raise NotImplementedError

    def passed(self, result: GradeResult) -> bool:
        """OpenAI's pass rule for this type; an errored result never passes."""
        if result.errored:
            return False
        return result.reward >= self.threshold()

    def threshold(self) -> float:
        """The reward a result needs to pass: `pass_threshold` when given."""
        return self.pass_threshold if self.pass_threshold is not None else 0.5
