"""The grader types by name, `parse_grader` (validate a grader object, every problem at once) and
`grade_many` (many items at once, concurrently)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tunehouse.graders.base import Checker, Grader, GradeResult, ModelSampler, Sample, choices_text, kind_of
from tunehouse.graders.model import LabelModelGrader, ScoreModelGrader
from tunehouse.graders.multi import MultiGrader
from tunehouse.graders.python import PythonGrader
from tunehouse.graders.similarity import TextSimilarityGrader
from tunehouse.graders.string_check import StringCheckGrader

TYPES: dict[str, type[Grader]] = {
    g.type: g
    for g in (
        StringCheckGrader,
        TextSimilarityGrader,
        PythonGrader,
        ScoreModelGrader,
        LabelModelGrader,
        MultiGrader,
    )
}


def _parse(spec: object, param: str, checker: Checker, *, in_multi: bool = False) -> Grader | None:
    if not isinstance(spec, dict):
        checker.add(
            param,
            f"Invalid type for '{param}': expected a grader object, but got {kind_of(spec)} instead.",
            "invalid_type",
        )
        return None
    allowed = [
        t
        for t in TYPES
        if not (t == "label_model" and not (in_multi or checker.allow_label_model))
        and not (t == "multi" and in_multi)
    ]
    kind = spec.get("type")
    if "type" not in spec:
        checker.add(
            f"{param}.type", f"Missing required parameter: '{param}.type'.", "missing_required_parameter"
        )
        return None
    if kind not in allowed:
        shown = f"'{kind}'" if isinstance(kind, str) else kind_of(kind)
        where = " inside a multi grader" if in_multi else ""
        checker.add(
            f"{param}.type",
            f"Invalid value for '{param}.type': {shown}{where}. Supported values are: {choices_text(allowed)}.",
        )
        return None
    if not in_multi:
        return TYPES[kind].parse(spec, param, checker)
    # Inside a multi grader the plain grader objects apply: no pass_threshold of their own.
    outer = checker.allow_pass_threshold
    checker.allow_pass_threshold = False
    try:
        return TYPES[kind].parse(spec, param, checker)
    finally:
        checker.allow_pass_threshold = outer


def parse_grader(
    spec: dict,
    *,
    param: str = "grader",
    allow_label_model: bool = True,
    allow_pass_threshold: bool = True,
) -> Grader:
    """Validate a grader object as OpenAI defines it; raises InvalidRequest with `param` the dotted
    path of the (first) wrong field and a message naming every problem.

    `allow_label_model`: a label_model grader at the top (evals' testing criteria take one; a
    fine-tuning job's grader takes one only inside a multi grader). `allow_pass_threshold`: the
    Eval* grader objects' `pass_threshold` (text_similarity, python, score_model); the alpha grader
    endpoints and reinforcement jobs take the plain objects, without it."""
    checker = Checker(
        allow_label_model=allow_label_model, allow_pass_threshold=allow_pass_threshold, parse_child=_parse
    )
    grader = _parse(spec, param, checker)
    checker.raise_if_any()
    assert grader is not None
    return grader


def grade_many(
    grader: Grader,
    pairs: list[tuple[Sample, dict]],
    *,
    sampler: ModelSampler | None = None,
    max_workers: int = 16,
) -> list[GradeResult]:
    """Grade every (sample, item), in order. Runs them on threads so that model graders' requests
    reach the inference engine together (it batches them) and python graders' sandboxes run side
    by side. A sampler's ModelNotFound is raised (the rest are cancelled)."""
    if len(pairs) <= 1 or max_workers <= 1:
        return [grader.grade(sample, item, sampler=sampler) for sample, item in pairs]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(pairs)), thread_name_prefix="grader") as pool:
        futures = [pool.submit(grader.grade, sample, item, sampler=sampler) for sample, item in pairs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
