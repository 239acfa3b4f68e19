"""int8 serving (`TUNEHOUSE_INFERENCE_QUANTIZATION=int8`): weight-only on bf16 models, int8 activations
too on fp32 models; both close to the full-precision model, adapters intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.inference.test_hf_engine import MESSAGES, adapters, greedy  # noqa: F401
from tunehouse.inference.engine import ModelRef
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.lora import MultiLora
from tunehouse.inference.quantize import CALIBRATION_CHAT, Int8Linear, W8A8Linear, quantize_int8

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])


def _bf16_model(tiny_model_dir):
    return _model(tiny_model_dir, torch.bfloat16)


def _model(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()


def _calibration_ids(tiny_model_dir) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer(tokenizer.apply_chat_template(CALIBRATION_CHAT, tokenize=False))["input_ids"]


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adapters_on_int8_layers_change_the_logits_as_in_full_precision(tiny_model_dir, adapters, dtype):  # noqa: F811
    a, _ = adapters
    plain, quantized = _model(tiny_model_dir, dtype), _model(tiny_model_dir, dtype)
    quantize_int8(quantized, _calibration_ids(tiny_model_dir))  # a bf16 model needs no calibration
    results = {}
    for name, model in (("full", plain), ("int8", quantized)):
        lora = MultiLora(model, n_slots=2)
        lora.set_rows([lora.load(a), -1])  # row 0 on the adapter, row 1 on the base
        results[name] = _logits(model, rows=2)
    error = (results["int8"] - results["full"]).abs().max()
    assert error <= 0.05 * results["full"].abs().max()
    # The adapter's effect survives quantization: far larger than the quantization error.
    assert (results["int8"][0] - results["int8"][1]).abs().max() > 4 * error


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_an_int8_engine_serves_base_and_adapter(tiny_model_dir, adapters, dtype):  # noqa: F811
    engine = HFEngine(dtype=dtype, quantization="int8")
    try:
        base = ModelRef(name="tiny", base_path=tiny_model_dir)
        tuned = ModelRef(name="ft:tiny", base_path=tiny_model_dir, adapter_path=adapters[0])
        first, again = engine.chat(base, MESSAGES, greedy(12)), engine.chat(base, MESSAGES, greedy(12))
        assert first.choices[0].text and first.choices[0].text == again.choices[0].text
        assert first.completion_tokens > 0
        assert engine.chat(tuned, MESSAGES, greedy(12)).choices[0].text != first.choices[0].text
    finally:
        engine.close()


def test_int8_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="int8 quantization needs bf16 or fp32"):
        HFEngine(dtype="float16", quantization="int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        HFEngine(quantization="int4")


# ---- fp32 models: int8 activations, outlier channels in full precision ------------------------------


def test_fp32_layers_that_read_one_input_share_it_and_stay_close(tiny_model_dir):
    reference = _model(tiny_model_dir, torch.float32)
    model = _model(tiny_model_dir, torch.float32)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert quantize_int8(model, _calibration_ids(tiny_model_dir)) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    # The calibration pass found which layers read the same activations.
    assert attention.q_proj.group is attention.k_proj.group is attention.v_proj.group
    assert mlp.gate_proj.group is mlp.up_proj.group
    assert len({id(attention.o_proj.group), id(mlp.down_proj.group), id(attention.q_proj.group)}) == 3
    assert isinstance(model.get_output_embeddings(), W8A8Linear)
    # Outlier input channels keep their full-precision weights; the rest is within half a step.
    original = reference.model.layers[0].self_attn.k_proj.weight
    group = attention.k_proj.group
    dequantized = attention.k_proj.weight
    assert torch.equal(dequantized[:, group.outliers], original[:, group.outliers])
    assert ((dequantized - original).abs() <= attention.k_proj.scales[:, None] / 2 + 1e-6).all()
    want, got = _logits(reference, rows=3), _logits(model, rows=3)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert not torch.equal(got, want)
    # Each member's output is handed out once, then the group holds on to nothing.
    assert all(m.group._input is None for m in model.modules() if isinstance(m, W8A8Linear))


def test_an_fp32_model_needs_calibration_tokens(tiny_model_dir):
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(_model(tiny_model_dir, torch.float32))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        quantize_int8(_model(tiny_model_dir, torch.float16))
