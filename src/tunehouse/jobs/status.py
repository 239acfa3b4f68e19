"""Job statuses: `tunehouse.store.job_status` (the values of the jobs table's status column)."""

from tunehouse.store.job_status import *  # noqa: F403
