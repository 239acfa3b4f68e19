"""The values of `fine_tuning_jobs.status`: OpenAI's job statuses (plus `paused`, which OpenAI
returns but its enum lacks). Every layer that reads or changes a job's status (the queue, the API,
quotas, deletion) shares this one vocabulary, so it lives with the table."""

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

ACTIVE = (VALIDATING, QUEUED, RUNNING, PAUSED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
