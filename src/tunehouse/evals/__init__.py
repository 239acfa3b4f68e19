"""Evals: eval definitions, runs and their output items (OpenAI's /v1/evals), and the batched
generation they run on. A run executes as a job kind (jobs/eval_run.py)."""
