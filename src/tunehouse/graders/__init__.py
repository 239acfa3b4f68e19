"""Graders: score a model output against an item, as OpenAI defines them (string_check,
text_similarity, score_model, label_model, python, multi). Shared by evals and reinforcement
fine-tuning; model graders sample through a ModelSampler they are given, so this package imports
no engine.

    grader = parse_grader(spec, param="grader")          # InvalidRequest with the wrong field's path
    result = grader.grade(Sample.from_text(answer), item, sampler=sampler)
    results = grade_many(grader, [(sample, item), ...], sampler=sampler)
"""

from tunehouse.graders.base import (
    Completion,
    GradeErrors,
    Grader,
    GradeResult,
    ModelSampler,
    Sample,
)
from tunehouse.graders.registry import TYPES, grade_many, parse_grader
from tunehouse.graders.templates import TemplateError

__all__ = [
    "TYPES",
    "Completion",
    "GradeErrors",
    "GradeResult",
    "Grader",
    "ModelSampler",
    "Sample",
    "TemplateError",
    "grade_many",
    "parse_grader",
]
