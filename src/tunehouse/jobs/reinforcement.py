"""What a reinforcement job brings to its recipe (training/recipes/reinforcement.py), which knows
neither graders nor engines: the sampler (inference/rollout.py, held to the method's
`response_format` where it has one), the rewarder (the job's grader over each sampled answer), and
the check, before training, that every training line has what the grader reads.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from tunehouse.data.validation import iter_examples
from tunehouse.evals.generation import Generator
from tunehouse.graders.base import Grader, Sample
from tunehouse.graders.registry import grade_many, parse_grader
from tunehouse.inference.constrained import build_tokenizer, validate_response_format
from tunehouse.inference.models import stop_token_ids
from tunehouse.inference.rollout import Constraint, sample_groups
from tunehouse.jobs.context import JobContext

log = logging.getLogger(__name__)
MAX_LINES_NAMED = 10


def job_grader(spec: dict) -> Grader:
    """The grader the API checked and stored on the job."""
    return parse_grader(
        spec, param="method.reinforcement.grader", allow_label_model=False, allow_pass_threshold=False
    )


def reinforcement_rewarder(ctx: JobContext, spec: dict):
    """(training lines, answer texts) -> (reward, error or None) per answer, graded side by side;
    model graders sample through an inference engine of this process, created on first use."""
    grader = job_grader(spec)
    sampler = Generator(ctx.settings).sampler(ctx.db.session) if grader.models() else None

    def reward(lines: list[dict], texts: list[str]) -> list[tuple[float, str | None]]:
        results = grade_many(
            grader,
            [(Sample.from_text(t), line) for line, t in zip(lines, texts, strict=True)],
            sampler=sampler,
        )
        return [(r.reward, (r.error_message or "the grader failed") if r.errored else None) for r in results]

    return reward


def rollout_sampler(response_format: dict | None, model_path: Path):
    """The sampler of the job's rollouts: answers constrained to the method's `response_format`
    (json_object / json_schema, as chat's) where it has one."""
    grammar = validate_response_format(response_format)  # checked at create: compiles here
    if grammar is None:
        return sample_groups
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = stop_token_ids(AutoConfig.from_pretrained(model_path), None, tokenizer)
    return functools.partial(sample_groups, constraint=Constraint(build_tokenizer(tokenizer, eos), grammar))


def _has(obj: Any, path: list[str]) -> bool:
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        else:
            return False
    return True


def missing_references(spec: dict, path: Path) -> str | None:
    """A message naming the lines (numbers) that lack a field the grader references as
    `{{item.…}}`, or None when every line has them all."""
    refs = sorted(r.split(".")[1:] for r in job_grader(spec).references() if r.startswith("item."))
    if not refs:
        return None
    missing: dict[str, list[int]] = {}
    for line, example in iter_examples(path, method="reinforcement"):
        for ref in refs:
            if not _has(example, ref):
                missing.setdefault(".".join(ref), []).append(line)
    if not missing:
        return None
    parts = []
    for ref, lines in missing.items():
        more = f" and {len(lines) - MAX_LINES_NAMED} more" if len(lines) > MAX_LINES_NAMED else ""
        parts.append(
            f"'{ref}' (read as {{{{item.{ref}}}}}) is missing on line(s) {', '.join(map(str, lines[:MAX_LINES_NAMED]))}{more}"
        )
    return f"The grader reads fields that training lines lack: {'; '.join(parts)}."
