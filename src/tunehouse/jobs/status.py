"""Job statuses, exactly OpenAI's (plus `paused`, which OpenAI returns but its enum lacks)."""

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

ACTIVE = (VALIDATING, QUEUED, RUNNING, PAUSED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
