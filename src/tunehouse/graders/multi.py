"""`multi`: named sub-graders, combined by `calculate_output`, an arithmetic formula over their names
(`0.5 * fuzzy + 0.5 * exact`), evaluated by simpleeval (never Python's eval).

The formula may use numbers, the sub-graders' names, + - * / // % ** (and ^, as power), comparisons,
and/or/not, `x if c else y`, and min, max, abs, floor, ceil, exp, sqrt, log, round. A formula that
does not parse or names anything else is refused when the grader is validated; one that fails on
an item's values (a division by zero, say) is that item's formula_parse_error. A sub-grader's error
is the multi grader's error for that item (its flags raised, its reward 0).
"""

from __future__ import annotations

import ast
import math
import re
from typing import ClassVar

import simpleeval

from tunehouse.graders.base import Checker, GradeErrors, Grader, GradeResult, ModelSampler, Sample, failed

FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
    "round": round,
}
_OPS = simpleeval.DEFAULT_OPERATORS
OPERATORS = {
    op: _OPS[op]
    for op in (
        ast.Add,
        ast.Sub,
        ast.Mult,
        ast.Div,
        ast.FloorDiv,
        ast.Mod,
        ast.Pow,
        ast.USub,
        ast.UAdd,
        ast.Not,
        ast.Eq,
        ast.NotEq,
        ast.Gt,
        ast.Lt,
        ast.GtE,
        ast.LtE,
    )
} | {ast.BitXor: simpleeval.safe_power}  # formulas write x^2 for a power, as OpenAI's do
# What a formula may not use whatever the names are (simpleeval's own refusals).
_UNSUPPORTED = (
    simpleeval.FeatureNotAvailable,
    simpleeval.OperatorNotDefined,
    simpleeval.FunctionNotDefined,
    simpleeval.NameNotDefined,
    simpleeval.AttributeDoesNotExist,
)
# The syntax a formula may use: arithmetic over names and numbers, and function calls by name.
_ALLOWED_NODES = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.IfExp,
    ast.Call,
    ast.Name,
    ast.Constant,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _evaluator(names: dict[str, float]) -> simpleeval.SimpleEval:
    return simpleeval.SimpleEval(operators=OPERATORS, functions=FUNCTIONS, names=names)


def formula_problems(formula: str, graders: set[str]) -> list[str]:
    """Why `formula` cannot be computed from these graders' rewards (empty: it can)."""
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as e:
        return [f"the formula does not parse ({e.msg})."]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES) or (
            isinstance(node, ast.Constant) and not isinstance(node.value, int | float)
        ):
            return [
                f"the formula uses {type(node).__name__.lower()}, which formulas may not (only numbers, "
                "grader names, arithmetic, comparisons, and/or/not, x if c else y, and functions)."
            ]
        if isinstance(node, ast.Call) and (node.keywords or not isinstance(node.func, ast.Name)):
            return ["the formula calls something other than a function by name."]
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name):
            continue
        if node.id in called:
            if node.id not in FUNCTIONS:
                out.append(f"unknown function '{node.id}' (available: {', '.join(FUNCTIONS)}).")
        elif node.id not in graders:
            known = ", ".join(sorted(graders)) or "none"
            out.append(f"'{node.id}' is not one of the graders ({known}).")
    if out:
        return sorted(set(out), key=out.index)
    try:
        _evaluator(dict.fromkeys(graders, 1.0)).eval(formula.strip())
    except _UNSUPPORTED as e:
        return [f"the formula uses something formulas may not: {e}"]
    except Exception:
        pass  # e.g. a division by zero with these placeholder values: the item's values decide
    return []


class MultiGrader(Grader):
    type = "multi"
    REQUIRED: ClassVar[tuple[str, ...]] = ("type", "name", "graders", "calculate_output")

    def __init__(self, spec: dict, param: str, graders: dict[str, Grader]):
        super().__init__(spec, param)
        self.graders = graders

    @classmethod
    def parse(cls, spec: dict, param: str, checker: Checker) -> Grader | None:
        before = len(checker.problems)
        checker.fields(spec, param, required=cls.REQUIRED, optional=())
        checker.expect(spec, "name", param, "string")
        graders: dict[str, Grader] = {}
        subs = checker.expect(spec, "graders", param, "object")
        if subs is not None and (not subs or isinstance(subs.get("type"), str)):
            checker.add(
                f"{param}.graders",
                f"Invalid value for '{param}.graders': expected an object of named graders, "
                '{"<name>": {<grader>}, ...}, whose names calculate_output uses.',
            )
            subs = None
        for name, sub in (subs or {}).items():
            where = f"{param}.graders.{name}"
            if not _NAME.fullmatch(name) or name in FUNCTIONS:
                checker.add(
                    where,
                    f"Invalid grader name '{name}' in '{param}.graders': names are used in "
                    "calculate_output, so they are letters, digits and underscores, not starting with a "
                    "digit, and not a function's name.",
                )
                continue
            grader = checker.parse_child(sub, where, checker, in_multi=True)
            if grader is not None:
                graders[name] = grader
        formula = checker.expect(spec, "calculate_output", param, "string")
        if formula is not None and subs is not None:
            for problem in formula_problems(formula, set(subs)):
                checker.add(
                    f"{param}.calculate_output", f"Invalid value for '{param}.calculate_output': {problem}"
                )
        if len(checker.problems) > before:
            return None
        return cls(spec, param, graders)

    def references(self) -> set[str]:
        return set().union(*(g.references() for g in self.graders.values()))

    def models(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for grader in self.graders.values():
            for model, param in grader.models().items():
                out.setdefault(model, param)
        return out

    def _grade(self, sample: Sample, item: dict, sampler: ModelSampler | None) -> GradeResult:
        result = GradeResult()
        problems = []
        for name, grader in self.graders.items():
            sub = grader.grade(sample, item, sampler=sampler)
            result.sub_rewards[name] = sub.reward
            result.scores[name] = sub.reward
            for model, usage in sub.model_usage.items():
                result.add_usage(
                    model, usage["prompt_tokens"], usage["completion_tokens"], usage["invocation_count"]
                )
            result.sampled_model_name = result.sampled_model_name or sub.sampled_model_name
            if sub.errored:
                result.errors.merge(sub.errors)
                problems.append(f"{name}: {sub.error_message}")
        if problems:
            result.error_message = "; ".join(problems)
            return result
        try:
            value = _evaluator(dict(result.sub_rewards)).eval(self.spec["calculate_output"].strip())
        except Exception as e:
            return self._formula_failed(result, f"{type(e).__name__}: {e}")
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return self._formula_failed(result, f"the formula gave {value!r}, not a finite number")
        result.reward = float(value)
        return result

    @staticmethod
    def _formula_failed(result: GradeResult, why: str) -> GradeResult:
        out = failed(GradeErrors(formula_parse_error=True), f"calculate_output failed: {why}")
        out.sub_rewards, out.scores = result.sub_rewards, result.scores
        out.model_usage, out.token_usage = result.model_usage, result.token_usage
        out.sampled_model_name = result.sampled_model_name
        return out
