"""Shared fixtures: the real default model (converted once per machine) and a tiny random model
built from its tokenizer, so training and serving tests run the real code in seconds on a CPU."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tunehouse.config import Settings

REPO = Path(__file__).resolve().parents[1]
# Converted base models are shared by every test run on this machine (the conversion takes ~20 s).
MODELS_DIR = Path(os.environ.get("TUNEHOUSE_TEST_MODELS_DIR", REPO / ".cache" / "models"))
TINY_MODEL = "tiny-smollm2"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from tunehouse.store.catalog import ensure_default_model

    return ensure_default_model(Settings(home=MODELS_DIR.parent / "home-unused", models_dir=MODELS_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path, tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, random weights (seed 0)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_family_dirs(default_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """A tiny random model of each family the fast decoder covers (tests/tiny_families.py), by
    model_type: llama, qwen2, qwen3, mistral, gemma."""
    from tests.tiny_families import FAMILIES, build_tiny_family

    root = tmp_path_factory.mktemp("tiny-families")
    return {f: build_tiny_family(f, default_model_dir, root / f) for f in FAMILIES}


# TUNEHOUSE_TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres runs every
# test against PostgreSQL: each test gets a database of its own, created here and dropped after.
PG_ADMIN_URL = os.environ.get("TUNEHOUSE_TEST_DATABASE_URL")


# The fixtures through which a test reaches the database (each makes a fresh one with
# `fresh_database`). A test that uses none of them runs the same on either database.
DATABASE_FIXTURES = {"settings", "shared_server", "world"}


# The longest test files (minutes each: the real model's fine-tune, Ray clusters, RFT jobs, job
# lifecycles). scripts/test.sh runs the suite on two pytest-xdist workers, which take files in
# collection order: these go first, so that neither worker is left with one of them at the end.
RUN_FIRST = [
    "tests/test_end_to_end.py",
    "tests/jobs/test_ray_executor.py",
    "tests/api/test_fine_tuning_reinforcement.py",
    "tests/api/test_job_lifecycle.py",
]


def pytest_collection_modifyitems(config, items):
    """The longest files first (RUN_FIRST). The PostgreSQL pass runs only the tests that use the
    database, less those marked `one_database`: the others ran, identically, in the SQLite pass
    (scripts/test.sh runs both)."""

    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return RUN_FIRST.index(path) if path in RUN_FIRST else len(RUN_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
    if not PG_ADMIN_URL:
        return
    keep = [
        item
        for item in items
        if DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("one_database") is None
    ]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@contextmanager
def fresh_database(home: Path):
    if not PG_ADMIN_URL:
        yield None  # SQLite in the home folder (the default)
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"tunehouse_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_settings(home: Path, tiny_model_dir: Path, database_url: str | None) -> Settings:
    """A fresh home with the tiny model registered as a base model."""
    return Settings(
        home=home,
        database_url=database_url,
        models_dir=MODELS_DIR,
        base_models={TINY_MODEL: tiny_model_dir},
        admin_key="sk-test-admin",
        # Fine-tuning jobs skip the forgetting and safety checks unless a test asks for them
        # (evaluation.general_checks): they would add an engine load and two generations to each.
        general_checks=False,
        # No throughput probe before each fresh home's first job (seconds each); the tests of the
        # estimate (tests/api/test_export_gguf.py) turn it on.
        throughput_probe=False,
        job_retry_seconds=0.5,  # retries back off 0.5 s, 1 s, 2 s, ... (5 s, 10 s, ... by default)
    )


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path):
    with fresh_database(tmp_path) as url:
        yield make_settings(tmp_path / "home", tiny_model_dir, url)
