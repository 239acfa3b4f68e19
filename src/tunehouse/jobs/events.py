"""Job events, in OpenAI's message templates (REFERENCE.md §5.5)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from tunehouse import ids
from tunehouse.store.tables import JobEvent


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    row = JobEvent(
        id=ids.event_id(),
        job_id=job_id,
        message=message,
        level=level,
        type=type,
        data=data if data is not None else {},
    )
    session.add(row)
    return row


def metrics_message(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    msg = f"Step {step}/{total_steps}: training loss={metrics['train_loss']:.2f}"
    if "train_reward_mean" in metrics:  # reinforcement: what the loss is for
        msg += f", reward={metrics['train_reward_mean']:.3f} (spread {metrics['train_reward_std']:.3f})"
    if "valid_reward" in metrics:
        msg += f", validation reward={metrics['valid_reward']:.3f}"
    if "full_valid_reward" in metrics:
        msg += f", full validation reward={metrics['full_valid_reward']:.3f}"
    if "valid_loss" in metrics:
        msg += f", validation loss={metrics['valid_loss']:.2f}"
    if "full_valid_loss" in metrics:
        msg += f", full validation loss={metrics['full_valid_loss']:.2f}"
    return msg
