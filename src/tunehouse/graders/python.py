"""`python`: the user's `grade(sample, item) -> float`, run in the sandbox (graders/sandbox.py: a
subprocess with limits, never exec in this process).

The sandbox's failures map onto OpenAI's flags: the code raising, returning something that is not
a number or running out of memory is python_grader_runtime_error (with its details); running out
of time is unresponsive_reward_error; the sandbox itself failing is python_grader_server_error
(its type in python_grader_server_error_type).
"""

from __future__ import annotations

from typing import ClassVar

from tunehouse.graders.base import Checker, GradeErrors, Grader, GradeResult, ModelSampler, Sample, failed
from tunehouse.graders.sandbox import check_source, run_python

RUNTIME = ("runtime", "invalid_return", "memory")


class PythonGrader(Grader):
    type = "python"
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name", "source")
    # image_tag names OpenAI's runtime image; there is one runtime here (this server's Python in the
    # sandbox), so any tag runs there, and the tag is kept for echoing.
    OPTIONAL: ClassVar[tuple[str, ...]] = ("image_tag",)
    TAKES_PASS_THRESHOLD = True

    @classmethod
    def check(cls, spec: dict, param: str, checker: Checker) -> None:
        checker.expect(spec, "image_tag", param, "string")
        source = checker.expect(spec, "source", param, "string")
        if source is not None:
            problem = check_source(source)
            if problem:
                checker.add(f"{param}.source", f"Invalid value for '{param}.source': {problem}")

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        run = run_python(self.spec["source"], sample.namespace(), item)
        if run.error_type is None and run.score is not None:
            return GradeResult(reward=float(run.score))
        details = run.details or run.error_type or "the grader returned no score"
        if run.error_type in RUNTIME:
            errors = GradeErrors(
                python_grader_runtime_error=True, python_grader_runtime_error_details=details
            )
        elif run.error_type == "timeout":
            errors = GradeErrors(unresponsive_reward_error=True, python_grader_runtime_error_details=details)
        else:
            errors = GradeErrors(
                python_grader_server_error=True, python_grader_server_error_type=run.error_type or "sandbox"
            )
        return failed(errors, details)
