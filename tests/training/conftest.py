"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and tests share the CPU with other processes:
    OpenMP threads spinning against each other can make a run 5x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def learnable_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model, made able to say things with confidence through LoRA alone: a random init's
    final RMSNorm bounds logits to ~1 (a loss floor of ~9.7 nats), in weights LoRA does not touch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("learnable-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
