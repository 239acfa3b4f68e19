"""Fixtures shared by the inference tests: one engine per module and the tiny model as a ModelRef."""

from pathlib import Path

import pytest

from tunehouse.inference.engine import ModelRef
from tunehouse.inference.hf import HFEngine


@pytest.fixture(scope="module")
def engine():
    eng = HFEngine()
    yield eng
    eng.close()


@pytest.fixture
def tiny(tiny_model_dir: Path) -> ModelRef:
    return ModelRef(name="tiny", base_path=tiny_model_dir)
