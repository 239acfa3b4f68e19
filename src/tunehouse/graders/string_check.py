"""`string_check`: compare the rendered input with the rendered reference (eq, ne, like, ilike)."""

from __future__ import annotations

from typing import ClassVar

from tunehouse.graders import templates
from tunehouse.graders.base import Checker, Grader, GradeResult, ModelSampler, Sample

OPERATIONS = ["eq", "ne", "like", "ilike"]


def check_template(spec: dict, name: str, param: str, checker: Checker) -> None:
    value = checker.expect(spec, name, param, "string")
    if value is not None:
        for problem in templates.problems(value):
            checker.add(f"{param}.{name}", f"Invalid template in '{param}.{name}': {problem}")


def template_references(*texts: str) -> set[str]:
    return {ref.path for text in texts for ref in templates.references(text)}


class StringCheckGrader(Grader):
    type = "string_check"
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name", "input", "reference", "operation")

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        check_template(spec, "input", param, checker)
        check_template(spec, "reference", param, checker)
        checker.enum(spec, "operation", param, OPERATIONS)

    def references(self) -> set[str]:
        return template_references(self.spec["input"], self.spec["reference"])

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        ns = sample.namespace()
        text = templates.render(self.spec["input"], ns, item)
        reference = templates.render(self.spec["reference"], ns, item)
        op = self.spec["operation"]
        if op == "eq":
            ok = text == reference
        elif op == "ne":
            ok = text != reference
        elif op == "like":  # OpenAI: the input contains the reference
            ok = reference in text
        else:  # ilike: contains, ignoring case
            ok = reference.casefold() in text.casefold()
        return GradeResult(reward=1.0 if ok else 0.0)

    def threshold(self) -> float:
        return 1.0  # a string check passes only when it matches
