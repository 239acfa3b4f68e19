"""Weight-only int8 serving (`TUNEHOUSE_INFERENCE_QUANTIZATION=int8`): close to bf16, adapters intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.inference.test_hf_engine import MESSAGES, adapters, greedy  # noqa: F401
from tunehouse.inference.engine import ModelRef
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.lora import MultiLora
from tunehouse.inference.quantize import Int8Linear, quantize_int8

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])


def _bf16_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()


def _logits(model, rows: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS.repeat(rows, 1)).logits.float()


def test_every_linear_layer_is_quantized_and_stays_close(tiny_model_dir):
    reference = _bf16_model(tiny_model_dir)
    model = _bf16_model(tiny_model_dir)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert quantize_int8(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    want, got = _logits(reference), _logits(model)
    # One scale per output channel: a few tenths of a percent per layer, a few percent at the end.
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert not torch.equal(got, want)  # it really is another computation


def test_adapters_on_int8_layers_change_the_logits_as_on_bf16(tiny_model_dir, adapters):  # noqa: F811
    a, _ = adapters
    plain, quantized = _bf16_model(tiny_model_dir), _bf16_model(tiny_model_dir)
    quantize_int8(quantized)
    results = {}
    for name, model in (("bf16", plain), ("int8", quantized)):
        lora = MultiLora(model, n_slots=2)
        lora.set_rows([lora.load(a), -1])  # row 0 on the adapter, row 1 on the base
        results[name] = _logits(model, rows=2)
    scale = results["bf16"].abs().max()
    assert (results["int8"] - results["bf16"]).abs().max() <= 0.05 * scale
    # The adapter's effect survives quantization: far larger than the quantization error.
    effect = (results["int8"][0] - results["int8"][1]).abs().max()
    assert effect > 4 * (results["int8"] - results["bf16"]).abs().max()


def test_an_int8_engine_serves_and_is_refused_where_it_cannot_run(tiny_model_dir, adapters):  # noqa: F811
    engine = HFEngine(dtype="bfloat16", quantization="int8")
    try:
        base = ModelRef(name="tiny", base_path=tiny_model_dir)
        tuned = ModelRef(name="ft:tiny", base_path=tiny_model_dir, adapter_path=adapters[0])
        first, again = engine.chat(base, MESSAGES, greedy(12)), engine.chat(base, MESSAGES, greedy(12))
        assert first.choices[0].text and first.choices[0].text == again.choices[0].text
        assert first.completion_tokens > 0
        assert engine.chat(tuned, MESSAGES, greedy(12)).choices[0].text != first.choices[0].text
    finally:
        engine.close()
    with pytest.raises(ValueError, match="int8 quantization needs bf16"):
        HFEngine(dtype="float32", quantization="int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        HFEngine(quantization="int4")
