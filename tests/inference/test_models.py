"""What serving reads from a model folder (`tunehouse.inference.models`) and where it runs
(`tunehouse.hardware`, which training shares): no model is loaded, so these take milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tunehouse import hardware
from tunehouse.hardware import resolve_device, resolve_dtype
from tunehouse.inference.models import stop_token_ids


def test_stop_tokens_are_every_end_token_once_model_config_first():
    config = SimpleNamespace(eos_token_id=[2, 5])
    generation = SimpleNamespace(eos_token_id=[5, 9])
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert stop_token_ids(config, generation, tokenizer) == [2, 5, 9, 7]
    # No generation config, or a config without an end token: the others still count.
    assert stop_token_ids(config, None, tokenizer) == [2, 5, 7]
    assert stop_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None), tokenizer) == [7]
    assert stop_token_ids(SimpleNamespace(), None, SimpleNamespace(eos_token_id=None)) == []


def test_stop_tokens_of_the_tiny_model_are_what_the_engine_stops_at(engine, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = stop_token_ids(AutoConfig.from_pretrained(tiny_model_dir), None, tokenizer)
    assert ids and tokenizer.eos_token_id in ids
    assert engine._base(tiny_model_dir).eos_ids >= set(ids)


def test_device_auto_is_cuda_where_available_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # resolving touches no GPU


def test_named_dtypes_and_fp16_refused_where_asked():
    assert resolve_dtype("bf16", "cpu") is resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("fp32", "cpu") is resolve_dtype("float32", "cpu") is torch.float32
    assert resolve_dtype("fp16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp16'; use auto, bfloat16, bf16, float32, fp32"):
        resolve_dtype("fp16", "cpu", allow_fp16=False)
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        resolve_dtype("int4", "cpu")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, fast):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
    want = torch.bfloat16 if fast else torch.float32
    assert resolve_dtype("auto", "cpu") is resolve_dtype("auto", torch.device("cpu")) is want
    assert resolve_dtype("auto", "meta") is torch.float32  # neither a CPU nor a GPU


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_on_cuda_follows_the_gpu(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: not bf16)  # the CPU does not count
    assert resolve_dtype("auto", "cuda:0") is (torch.bfloat16 if bf16 else torch.float32)
