"""The fast decode step (`tunehouse.inference.decode`) computes what transformers' forward computes."""

from __future__ import annotations

import pytest
import torch

from tests.inference.test_hf_engine import MESSAGES, adapters, greedy  # noqa: F401
from tests.inference.test_quantize import _calibration_ids, _model
from tunehouse.inference.cache import new_cache
from tunehouse.inference.decode import LlamaDecoder, fast_decoder
from tunehouse.inference.engine import ModelRef
from tunehouse.inference.hf import HFEngine
from tunehouse.inference.lora import LoraLinear, MultiLora
from tunehouse.inference.quantize import quantize_int8

# Three prompts of different lengths, left-padded as the engine pads them.
PROMPTS = [[1, 5, 9, 42, 7, 3, 11, 2], [4, 8, 15, 16], [23, 42, 99, 100, 101, 7]]


def _decode_both_ways(model, decoder: LlamaDecoder, steps: int = 6, prompts=PROMPTS, kv_dtype=None):
    """Prefill the prompts, then decode `steps` tokens with transformers' forward and with the
    decoder, each from its own copy of the prefilled cache (the decoder's kept in `kv_dtype`),
    feeding both the same tokens."""
    length = max(map(len, prompts))
    ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :], mask[i, length - len(p) :] = torch.tensor(p), 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches, next_ids = [], None
    with torch.inference_mode():
        for store in (None, kv_dtype):
            cache = new_cache(model.config, store)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
            caches.append(cache)
            next_ids = out.logits[:, -1:].argmax(-1)
        theirs, ours = [], []
        position = positions[:, -1:]
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
            position = position + 1
            want = model(
                input_ids=next_ids, attention_mask=mask, position_ids=position, past_key_values=caches[0]
            ).logits[:, -1]
            got = decoder.step(next_ids, position, mask, caches[1])
            theirs.append(want)
            ours.append(got)
            next_ids = want.argmax(-1, keepdim=True)
    return torch.stack(theirs), torch.stack(ours)


def test_fp32_decode_steps_equal_transformers_with_padding_and_adapters(tiny_model_dir, adapters):  # noqa: F811
    model = _model(tiny_model_dir, torch.float32)
    lora = MultiLora(model, n_slots=2)
    a, b = lora.load(adapters[0]), lora.load(adapters[1])
    lora.set_rows([a, -1, b])  # every row a different adapter (or none)
    decoder = fast_decoder(model)
    assert isinstance(decoder, LlamaDecoder)
    # q/k/v and gate/up as one matmul each, the layers' weights views of it (LoRA on top).
    assert all(f.weight is not None for f in decoder.qkv + decoder.gate_up)
    k_proj = model.model.layers[0].self_attn.k_proj
    storage = getattr(k_proj, "base", k_proj).weight.untyped_storage()
    assert storage.data_ptr() == decoder.qkv[0].weight.untyped_storage().data_ptr()
    want, got = _decode_both_ways(model, decoder)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # No padding at all: attention runs without a mask.
    want, got = _decode_both_ways(model, decoder, prompts=[p[:4] for p in PROMPTS])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_int8_and_bf16_decode_steps_stay_with_transformers(tiny_model_dir):
    int8 = _model(tiny_model_dir, torch.float32)
    quantize_int8(int8, _calibration_ids(tiny_model_dir))
    want, got = _decode_both_ways(int8, fast_decoder(int8))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bf16 = _model(tiny_model_dir, torch.bfloat16)
    want, got = _decode_both_ways(bf16, fast_decoder(bf16))
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    # As the engine runs bf16 on a CPU: the cache in fp32, attention as fp32 matmuls.
    want, got = _decode_both_ways(bf16, fast_decoder(bf16), kv_dtype=torch.float32)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


def test_int8_decode_steps_with_adapters_stay_with_transformers(tiny_model_dir, adapters):  # noqa: F811
    model = _model(tiny_model_dir, torch.float32)
    quantize_int8(model, _calibration_ids(tiny_model_dir))
    lora = MultiLora(model, n_slots=2)
    a, b = lora.load(adapters[0]), lora.load(adapters[1])
    lora.set_rows([b, a, -1])
    decoder = fast_decoder(model)
    # Every block's int8 layers are one group, LoRA updates computed with it.
    assert all(p.int8 is not None for p in decoder.qkv + decoder.o + decoder.gate_up + decoder.down)
    want, got = _decode_both_ways(model, decoder)
    # The step's LoRA A's are int8 (rows of the int8 matmul), transformers' fp32: close (how close
    # layer by layer: the next test).
    torch.testing.assert_close(got, want, rtol=0, atol=0.05)
    # Without adapters the step computes exactly what transformers' forward does.
    lora.set_rows([-1, -1, -1])
    want, got = _decode_both_ways(model, decoder)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_int8_lora_down_projections_ride_in_the_int8_matmul(tiny_model_dir, adapters):  # noqa: F811
    model = _model(tiny_model_dir, torch.float32)
    quantize_int8(model, _calibration_ids(tiny_model_dir))
    lora = MultiLora(model, n_slots=3)
    a, b = lora.load(adapters[0]), lora.load(adapters[1])  # a on q/v, b on o/up/down
    decoder = fast_decoder(model)
    block = model.model.layers[0]
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lora.set_rows([-1, -1, -1])
        plain = decoder.qkv[0](x).clone()
        lora.set_rows([a, b, -1])
        members = [getattr(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")]
        assert [isinstance(m, LoraLinear) for m in members] == [True, False, True]
        exact = plain + torch.cat(
            [m.delta(x) if isinstance(m, LoraLinear) else x.new_zeros(3, m.out_features) for m in members],
            dim=1,
        )
        got = decoder.qkv[0](x)
        # Row 0's adapter changes q and v, in int8 close to the fp32 update; row 1's adapter does
        # not touch q/k/v and row 2 has none: their outputs stay the base model's.
        update = (exact[0] - plain[0]).abs().max()
        assert update > 0.05
        assert (got[0] - exact[0]).abs().max() < 0.05 * update
        torch.testing.assert_close(got[1:], plain[1:])
        # A slot no row uses still takes part (the packed weight covers every loaded adapter)...
        lora.set_rows([a, -1, -1])
        torch.testing.assert_close(decoder.qkv[0](x)[0], got[0])
        # ...and loading another adapter repacks it.
        packed = decoder.qkv[0]._side[0]
        c = lora.load(adapters[0])
        lora.set_rows([c, -1, -1])
        torch.testing.assert_close(decoder.qkv[0](x)[0], got[0])
        assert decoder.qkv[0]._side[0] is not packed
        # The packed width follows the highest loaded slot as adapters leave.
        lora.unload(c)
        assert lora.context.loaded == 2
        lora.unload(a)
        assert lora.context.loaded == 2  # b still sits in slot 1
        lora.unload(b)
        assert lora.context.loaded == 0


@pytest.mark.parametrize(
    ("attribute", "value"), [("model_type", "phi"), ("sliding_window", 512), ("pretraining_tp", 2)]
)
def test_architectures_it_was_not_checked_against_keep_transformers_forward(tiny_model_dir, attribute, value):
    model = _model(tiny_model_dir, torch.float32)
    setattr(model.config, attribute, value)
    assert fast_decoder(model) is None


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 0.05)])
def test_the_engine_decodes_with_it_and_answers_as_transformers_would(
    tiny_model_dir,
    adapters,  # noqa: F811
    dtype,
    tolerance,
):
    engine = HFEngine(dtype=dtype, device="cpu")

    def answers():  # text and each token's logprob, for the base and an adapter
        results = [engine.chat(m, MESSAGES, greedy(12, logprobs=True)).choices[0] for m in (base, tuned)]
        return [(c.text, [e.logprob for e in c.logprobs]) for c in results]

    try:
        base = ModelRef(name="tiny", base_path=tiny_model_dir)
        tuned = ModelRef(name="ft:tiny", base_path=tiny_model_dir, adapter_path=adapters[0])
        fast = answers()
        loaded = engine._base(tiny_model_dir)
        assert isinstance(loaded.decoder, LlamaDecoder)
        # bf16 on a CPU keeps its cache in fp32 (transformers' forward gets it cast back).
        assert loaded.kv_dtype == (torch.float32 if dtype == "bfloat16" else None)
        loaded.decoder = None  # transformers' forward for every step from here on
        slow = answers()
        for (fast_text, fast_logprobs), (slow_text, slow_logprobs) in zip(fast, slow, strict=True):
            assert fast_text == slow_text
            assert fast_logprobs == pytest.approx(slow_logprobs, abs=tolerance)
        assert fast[0] != fast[1]
    finally:
        engine.close()
