"""Every identifier the system hands out, in OpenAI's shapes where OpenAI has one: file-…, upload_…,
part_…, ftjob-…, ftevent-…, ftckpt_…, chatcmpl-…, cmpl-…, proj_…, cp_…, audit_log-…, eval_…, evalrun_…,
outputitem_…, resp_…, msg_…, fc_…, fco_…, ft:<base>:<org>:<suffix>:<id>;
ours (keys, webhooks, request ids) in the same style. Nothing else makes ids by hand."""

from __future__ import annotations

import base64
import re
import secrets
import string
import uuid
from datetime import UTC, datetime

_ALPHANUM = string.ascii_letters + string.digits
_LOWER_ALPHANUM = string.ascii_lowercase + string.digits


def _random(n: int, alphabet: str = _ALPHANUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _hex(n: int) -> str:
    return uuid.uuid4().hex[:n]


def file_id() -> str:
    return f"file-{_random(22)}"


def upload_id() -> str:
    """An Upload (/v1/uploads): a file sent in parts."""
    return f"upload_{_random(24)}"


def upload_part_id() -> str:
    """A Part of an Upload."""
    return f"part_{_random(24)}"


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


def project_id() -> str:
    return f"proj_{_random(24)}"


def permission_id() -> str:
    """A checkpoint permission (fine_tuning.checkpoints.permissions)."""
    return f"cp_{_random(24)}"


def audit_log_id(created_at: int) -> str:
    """OpenAI's shape: audit_log-<random>_<yyyymmdd of the entry's UTC day>."""
    day = datetime.fromtimestamp(created_at, UTC).strftime("%Y%m%d")
    return f"audit_log-{_random(20, _LOWER_ALPHANUM)}_{day}"


def completion_id() -> str:
    """A chat completion (and its chunks)."""
    return f"chatcmpl-{_random(29)}"


def text_completion_id() -> str:
    """A legacy completion (/v1/completions) and its chunks."""
    return f"cmpl-{_random(29)}"


def tool_call_id() -> str:
    return f"call_{_hex(24)}"


def request_id() -> str:
    """The x-request-id header of every answer."""
    return f"req_{uuid.uuid4().hex}"


def webhook_endpoint_id() -> str:
    return f"whep_{_hex(24)}"


def webhook_delivery_id() -> str:
    return f"whdel_{_hex(24)}"


def webhook_event_id() -> str:
    """OpenAI's webhook event id."""
    return f"evt_{uuid.uuid4().hex}"


def webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


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


def eval_id() -> str:
    """An eval (/v1/evals): OpenAI's shape, eval_ + 32 hex digits."""
    return f"eval_{uuid.uuid4().hex}"


def eval_run_id() -> str:
    """An eval run; also the id of the job (jobs table, kind "eval_run") that executes it."""
    return f"evalrun_{uuid.uuid4().hex}"


def eval_output_item_id() -> str:
    return f"outputitem_{uuid.uuid4().hex}"


def testing_criterion_id(name: str) -> str:
    """A testing criterion of an eval, as OpenAI names them: `<name>-<uuid4>`."""
    return f"{name}-{uuid.uuid4()}"


def batch_id() -> str:
    """A batch; also the id of the job (jobs table, kind "batch") that runs it."""
    return f"batch_{uuid.uuid4().hex}"


def batch_request_id() -> str:
    """One request of a batch, as its output and error files name it."""
    return f"batch_req_{uuid.uuid4().hex}"


def response_id() -> str:
    """A response (/v1/responses): OpenAI's shape, resp_ + hex digits."""
    return f"resp_{uuid.uuid4().hex}{_hex(16)}"


def response_item_id(kind: str) -> str:
    """An item of a response's input or output, prefixed as OpenAI does: `msg` for messages, `fc`
    for function calls, `fco` for function call outputs."""
    return f"{kind}_{uuid.uuid4().hex}{_hex(16)}"
