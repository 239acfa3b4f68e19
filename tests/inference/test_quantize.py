"""int8 serving (`TUNEHOUSE_INFERENCE_QUANTIZATION=int8`): int8 weights and activations around fp32,
close to the full-precision model, adapters intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.inference.test_hf_engine import MESSAGES, adapters, greedy  # noqa: F401
from tunehouse.inference.engine import ModelRef
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.lora import MultiLora
from tunehouse.inference.quantize import CALIBRATION_CHAT, W8A8Linear, quantize_int8

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])


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


def test_adapters_on_int8_layers_change_the_logits_as_in_full_precision(tiny_model_dir, adapters):  # noqa: F811
    a, _ = adapters
    plain, quantized = _model(tiny_model_dir, torch.float32), _model(tiny_model_dir, torch.float32)
    quantize_int8(quantized, _calibration_ids(tiny_model_dir))
    results = {}
    for name, model in (("full", plain), ("int8", quantized)):
        lora = MultiLora(model, n_slots=2)
        lora.set_rows([lora.load(a), -1])  # row 0 on the adapter, row 1 on the base
        results[name] = _logits(model, rows=2)
    error = (results["int8"] - results["full"]).abs().max()
    assert error <= 0.05 * results["full"].abs().max()
    # The adapter's effect survives quantization: far larger than the quantization error.
    assert (results["int8"][0] - results["int8"][1]).abs().max() > 4 * error


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_an_int8_engine_serves_base_and_adapter(tiny_model_dir, adapters, dtype):  # noqa: F811
    engine = HFEngine(dtype=dtype, quantization="int8")
    assert engine.dtype == torch.float32  # around the int8 matmuls, even where bf16 would be chosen
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
    with pytest.raises(ValueError, match="computes in float32; dtype bfloat16"):
        HFEngine(dtype="bfloat16", quantization="int8")
    with pytest.raises(ValueError, match="needs an x86 CPU"):
        HFEngine(device="cuda", quantization="int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        HFEngine(quantization="int4")


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


def test_a_loud_row_does_not_crush_a_quiet_one(tiny_model_dir):
    """Each row is quantized with its own scale although fbgemm takes one per tensor."""
    model = _model(tiny_model_dir, torch.float32)
    reference = model.model.layers[0].mlp.down_proj
    layer = _model(tiny_model_dir, torch.float32)
    quantize_int8(layer, _calibration_ids(tiny_model_dir))
    layer = layer.model.layers[0].mlp.down_proj
    quiet = torch.randn(1, reference.in_features, generator=torch.Generator().manual_seed(0))
    loud = 1000 * torch.randn(1, reference.in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = reference(quiet)
        alone, together = layer(quiet), layer(torch.cat([quiet, loud]))[:1]
    # One scale for both rows would give the quiet one ~1000x coarser steps: nothing would be left.
    assert (alone - want).abs().max() <= 0.05 * want.abs().max()
    assert (together - want).abs().max() <= 0.05 * want.abs().max()


def test_a_model_needs_calibration_tokens_and_fp32(tiny_model_dir):
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(_model(tiny_model_dir, torch.float32), [])
    with pytest.raises(ValueError, match="computes in float32"):
        quantize_int8(_model(tiny_model_dir, torch.bfloat16), [1, 2, 3])
