"""Usage metering: every inference and training token, per organization, project, model and day.

- Inference: `record_inference`, called by the chat and completions services once per request
  with the tokens the engine counted; priced at the model's input/output prices.
- Training: `record_training`, called by the runner in the same transaction that marks the job
  succeeded (a conditional update that only one attempt can win), so a retried or resumed job is
  metered exactly once. Billable tokens are the job's `trained_tokens` (tokens × epochs, OpenAI's
  definition). The organization's free daily allowance is spent first: of a job's tokens, those
  that still fit under the allowance for the UTC day the job succeeds are free, the rest are
  billed at the training price quoted when the job was created.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tunehouse.store.tables import Job, Organization
from tunehouse.usage import ratelimit
from tunehouse.usage.prices import price_for
from tunehouse.usage.quotas import effective_quotas
from tunehouse.usage.records import INFERENCE, TRAINING, add_usage, training_tokens_on, utc_day

log = logging.getLogger(__name__)


def record_inference(state, principal, *, model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """Record one inference request's tokens for the caller's organization and project
    (`state`: anything with the server's `settings` and `db`)."""
    ratelimit.reconcile(prompt_tokens + completion_tokens)
    price = price_for(state.settings, model)
    try:
        with state.db.transaction() as s:
            add_usage(
                s,
                organization_id=principal.organization_id,
                project_id=getattr(principal, "project_id", None),
                key_id=principal.key_id,
                model=model,
                kind=INFERENCE,
                input_tokens=prompt_tokens,
                output_tokens=completion_tokens,
                requests=1,
                cost=price.inference_cost(prompt_tokens, completion_tokens),
            )
    except Exception:
        # The answer is already computed: losing it over a metering hiccup helps no one. Logged loudly.
        log.exception("could not record usage for model %s (org %s)", model, principal.organization_id)


def record_training(session: Session, settings, *, job_id: str) -> float:
    """Meter a job that has just succeeded (call inside the transaction that marked it so).

    Returns the cost billed after the free allowance, also stored on the job."""
    job = session.execute(select(Job).where(Job.id == job_id)).scalar_one()
    # Serialises allowance accounting per organization on PostgreSQL (SQLite already holds the
    # database's write lock here), so two jobs finishing at once cannot both spend the same allowance.
    session.execute(select(Organization.id).where(Organization.id == job.organization_id).with_for_update())
    tokens = int(job.trained_tokens or 0)
    day = utc_day()
    allowance = effective_quotas(settings, session, job.organization_id).free_training_tokens_per_day
    used = training_tokens_on(session, organization_id=job.organization_id, day=day)
    free = max(0, min(tokens, allowance - used))
    price = (
        job.training_price if job.training_price is not None else price_for(settings, job.base_model).training
    )
    cost = round((tokens - free) * price / 1e6, 10)
    add_usage(
        session,
        organization_id=job.organization_id,
        project_id=getattr(job, "project_id", None),
        key_id=None,
        model=job.base_model,
        kind=TRAINING,
        day=day,
        training_tokens=tokens,
        requests=1,
        cost=cost,
    )
    session.execute(update(Job).where(Job.id == job_id).values(cost=cost))
    return cost
