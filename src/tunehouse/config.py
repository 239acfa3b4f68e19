"""Settings: every knob is a TUNEHOUSE_* environment variable, and none is needed to start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("tunehouse", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEHOUSE_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="All state lives here.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in the home folder."
    )
    models_dir: Path | None = Field(
        default=None,
        description="Where base models are converted to safetensors; default: <home>/models. "
        "Several homes may share one (the tests do).",
    )
    admin_key: str | None = Field(
        default=None, description="An sk-… key that is always valid for the default organization."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, description="Upload size limit (413 beyond).")
    local_worker: bool = Field(default=True, description="Run a training worker inside `serve`.")
    worker_concurrency: int = Field(default=1, description="Training jobs one worker runs at once.")
    worker_gpus: int | None = Field(
        default=None,
        description="GPUs this worker offers to jobs; default: the CUDA devices it sees "
        "(with the Ray executor: the GPUs of the Ray cluster).",
    )
    gpu_min_params: float = Field(
        default=3e9,
        description="A base model with at least this many parameters needs a worker with a GPU.",
    )
    executor: str = Field(
        default="local", description="local (a child process per job) | ray (a task on a Ray cluster)"
    )
    ray_address: str | None = Field(
        default=None, description='Ray cluster to submit training to, e.g. "ray://head:10001" or "auto".'
    )
    ray_train_workers: int = Field(
        default=1,
        description="Ray executor: data-parallel training processes (Ray Train's TorchTrainer, on one "
        "node, gloo) for a supervised job that needs no GPU. A job needing N GPUs gets N, one GPU each (NCCL).",
    )
    storage_url: str | None = Field(
        default=None,
        description="fsspec URL under which files and weights are stored (file://, s3://, gs://, ...); "
        "default: the home folder.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description='JSON options for the fsspec filesystem, e.g. {"endpoint_url": "http://minio:9000"}.',
    )
    worker_poll_seconds: float = 1.0
    lease_seconds: float = Field(default=60.0, description="A worker that stops renewing loses its job.")
    job_retry_seconds: float = Field(
        default=5.0,
        description="A job whose process failed runs again after base × 2^(n-1) seconds for its n-th "
        "retry (5 s, 10 s, 20 s, …, at most 5 minutes), so a passing outage does not use up its attempts.",
    )
    state_save_seconds: float = Field(
        default=300.0, description="Training state is saved this often (and on pause), to resume from."
    )
    base_models: dict[str, Path] = Field(
        default_factory=dict,
        description='Extra base models: JSON map of name to a local Hugging Face folder, e.g. {"my-llama": "/models/llama"}.',
    )
    default_model: str = "smollm2-135m-instruct"
    general_checks: bool = Field(
        default=True,
        description="After training, run the forgetting and safety checks (evals/checks.py) on the "
        "starting model and the fine-tune (a job's evaluation.general_checks overrides this).",
    )
    throughput_probe: bool = Field(
        default=True,
        description="Before the first job of a base model on this machine, measure its training speed "
        "with a few steps on random tokens (training/throughput.py), so time estimates work from the start.",
    )
    inference_max_adapters: int = Field(default=8, description="Fine-tuned adapters kept loaded at once.")
    inference_prefix_cache_mb: int = Field(
        default=256,
        ge=0,
        description="Memory for the KV cache of prompt beginnings already read (per base model; 0: off): "
        "a prompt that opens as an earlier one did (a fine-tuned model's system prompt) computes only the rest.",
    )
    inference_quantization: Literal["none", "int8"] = Field(
        default="none",
        description="int8: serve with int8 base weights and activations on an x86 CPU (fbgemm; fp32 "
        "around the int8 matmuls, so dtype must be auto or float32): faster decoding, answers close to "
        "but not identical with full precision's.",
    )
    dtype: str = Field(
        default="auto", description="auto (bf16 where the hardware has it) | bfloat16 | float32"
    )
    # --- usage, quotas, rate limits, webhooks (README "Usage, cost and quotas") -------------------
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="USD per 1M tokens by model pattern (fnmatch; the first match wins, exact names first), e.g. "
        '{"ft:*": {"training": 25, "input": 3.75, "output": 15}}. Models no pattern matches use '
        "OpenAI's GPT-4o fine-tuning prices: training 25, input 3.75, output 15.",
    )
    free_training_tokens_per_day: int = Field(
        default=1_000_000, description="Training tokens per organization and UTC day that are not billed."
    )
    max_training_tokens_per_day: int | None = Field(
        default=None, description="Per organization; None: unlimited (an organization's own quota overrides)."
    )
    max_concurrent_jobs: int | None = Field(
        default=None, description="Validating, queued and running jobs per organization; None: unlimited."
    )
    max_storage_bytes: int | None = Field(
        default=None, description="Bytes of files per organization; None: unlimited."
    )
    rate_limit_requests_per_minute: int = Field(
        default=10_000, description="Per API key (0: no limit, no x-ratelimit-* headers)."
    )
    rate_limit_tokens_per_minute: int = Field(
        default=10_000_000, description="Chat and completion tokens per API key and minute (0: no limit)."
    )
    webhook_max_attempts: int = Field(default=8, description="Attempts before a delivery is marked failed.")
    webhook_retry_base_seconds: float = Field(
        default=5.0, description="Retry n waits base × 2^(n-1) seconds (5 s, 10 s, 20 s, …)."
    )
    webhook_timeout_seconds: float = 10.0
    webhook_poll_seconds: float = 1.0

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'tunehouse.db'}"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def weights_dir(self) -> Path:
        return self.home / "weights"

    @property
    def base_models_dir(self) -> Path:
        return self.models_dir or (self.home / "models")

    def to_env(self) -> dict[str, str]:
        """These settings as TUNEHOUSE_* variables, so that a child process (a training run, a Ray
        task) sees exactly what this process was given, in code or by environment. Unset (None)
        settings are left out; the admin key never leaves the server."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None or name == "admin_key":
                continue
            if isinstance(value, dict | list):
                value = json.dumps(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"TUNEHOUSE_{name.upper()}"] = str(value)
        return env

    def ensure_dirs(self) -> None:
        for d in (self.home, self.files_dir, self.jobs_dir, self.weights_dir, self.base_models_dir):
            d.mkdir(parents=True, exist_ok=True)
