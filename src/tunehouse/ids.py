"""Identifiers in OpenAI's shapes: file-…, ftjob-…, ftevent-…, ftckpt_…, ft:<base>:<org>:<suffix>:<id>."""

from __future__ import annotations

import re
import secrets
import string

_ALPHANUM = string.ascii_letters + string.digits


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHANUM) for _ in range(n))


def file_id() -> str:
    return f"file-{_random(22)}"


def job_id() -> str:
    return f"ftjob-{_random(24)}"


def event_id() -> str:
    return f"ftevent-{_random(24)}"


def checkpoint_id() -> str:
    return f"ftckpt_{_random(24)}"


def org_id() -> str:
    return f"org-{_random(24)}"


def key_id() -> str:
    return f"key_{_random(16)}"


def completion_id() -> str:
    return f"chatcmpl-{_random(29)}"


def api_key() -> str:
    return f"sk-th-{secrets.token_urlsafe(32)}"


def slugify(name: str) -> str:
    """Organization names become the third part of ft: names, so keep them to [a-z0-9-]."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "org"


def fine_tuned_model_name(*, base: str, org_slug: str, suffix: str | None, job_id: str) -> str:
    """Derived from the job id, so a job restarted on another worker names its model the same."""
    return f"ft:{base}:{org_slug}:{suffix or ''}:{job_id[-8:]}"


def checkpoint_model_name(model_name: str, step: int) -> str:
    return f"{model_name}:ckpt-step-{step}"
