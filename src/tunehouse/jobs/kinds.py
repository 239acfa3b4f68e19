"""The kinds of job, looked up by a job's `kind`: what runs each of its two phases.

Every kind shares the queue (jobs/queue.py), leases, retries with backoff, crash resume and
cancellation (jobs/worker.py, jobs/runner.py); a kind brings only its phases:

    validate   short, always in a child process on the worker's machine: check the inputs, then
               queue the job (or fail it with a clear error)
    train      the long work (training for a fine-tuning job), where the executor puts it (a
               child process, or a Ray task); it saves what it needs to resume, since it may be
               stopped (pause, cancel) or killed at any point and run again

A new background workload (an eval run, a batch) is a module with such a class plus one line here.
"""

from __future__ import annotations

from typing import Protocol

from tunehouse.config import Settings
from tunehouse.jobs.batch import BatchKind
from tunehouse.jobs.context import JobContext
from tunehouse.jobs.eval_run import EvalRunKind
from tunehouse.jobs.fine_tuning import FineTuning


class JobKind(Protocol):
    name: str
    # How messages name each phase ("the training process was killed").
    phase_names: dict[str, str]

    def validate(self, ctx: JobContext) -> None: ...

    def train(self, ctx: JobContext) -> None: ...

    def discard(self, settings: Settings, *, organization_id: str, job_id: str) -> None:
        """The job ended (failed, cancelled): delete what its phases kept to resume from."""


KINDS: dict[str, JobKind] = {kind.name: kind for kind in (FineTuning(), EvalRunKind(), BatchKind())}
PHASES = ("validate", "train")


def kind(name: str | None) -> JobKind:
    """The kind called `name` (a job from before kinds existed is a fine-tuning job)."""
    try:
        return KINDS[name or FineTuning.name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}; this server runs {', '.join(KINDS)}") from None
