"""The fast decode step covers the Llama, Mistral, Qwen2, Qwen3 and Gemma families: on tiny random
models of each (built from transformers' configs, the default model's tokenizer), its logits equal
transformers' forward, with padding and LoRA adapters, in fp32 and bf16, and greedy decoding through
the engine gives the tokens transformers' `generate` gives. Other architectures fall back to
transformers' forward with one line in the log."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.inference.test_decode import _decode_both_ways
from tests.tiny_families import FAMILIES
from tunehouse.inference.decode import LlamaDecoder, fast_decoder
from tunehouse.inference.engine import ModelRef, SamplingParams
from tunehouse.inference.lora import MultiLora

pytestmark = pytest.mark.one_database


def _model(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _adapter(path, out, seed: int):
    """A LoRA adapter on q/k/v/o and the MLP with non-zero B, so it changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(
        _model(path, torch.float32),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_equal_transformers(family, tiny_family_dirs, tmp_path):
    path = tiny_family_dirs[family]
    model = _model(path, torch.float32)
    lora = MultiLora(model, n_slots=2)
    a = lora.load(_adapter(path, tmp_path / "a", seed=1))
    lora.set_rows([a, -1, a])
    decoder = fast_decoder(model)
    assert isinstance(decoder, LlamaDecoder), family
    # q/k/v fused into one matmul (with their biases, for Qwen2).
    assert all(f.weight is not None for f in decoder.qkv)
    if family == "qwen2":
        assert all(f.bias is not None for f in decoder.qkv)
    want, got = _decode_both_ways(model, decoder)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    bf16 = _model(path, torch.bfloat16)
    want, got = _decode_both_ways(bf16, fast_decoder(bf16))
    torch.testing.assert_close(got.float(), want.float(), rtol=0.03, atol=0.03)


def test_engine_greedy_answers_equal_generate(tiny_family_dirs):
    """Through the engine (prefill by transformers, decode steps by the fast decoder), fp32: the
    greedy answer of each family is the one transformers' own generate gives."""
    from transformers import AutoTokenizer

    from tunehouse.inference.hf import HFEngine
    from tunehouse.inference.models import stop_token_ids

    engine = HFEngine(dtype="float32", prefix_cache_mb=0)
    messages = [{"role": "user", "content": "Name three colours."}]
    try:
        for family in FAMILIES:
            path = tiny_family_dirs[family]
            tokenizer = AutoTokenizer.from_pretrained(path)
            ref = ModelRef(name=family, base_path=path)
            prompt = engine.encode_chat(ref, messages)
            model = _model(path, torch.float32)
            stops = stop_token_ids(model.config, model.generation_config, tokenizer)
            with torch.inference_mode():
                out = model.generate(
                    torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stops
                )
            tokens = out[0, len(prompt) :].tolist()
            tokens = tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]
            got = engine.chat(ref, messages, SamplingParams(temperature=0, max_tokens=12))
            assert got.choices[0].text == tokenizer.decode(tokens), family
    finally:
        engine.close()


def test_other_architectures_fall_back_with_a_log_line(default_model_dir, tmp_path, caplog):
    import transformers

    config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with caplog.at_level(logging.INFO, logger="tunehouse.inference.decode"):
        assert fast_decoder(model) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "tunehouse.inference.decode"]
    assert len(lines) == 1 and "gpt2" in lines[0] and "transformers' forward" in lines[0]
    # A Mistral with a sliding window shorter than its context is not covered either.
    mistral = transformers.MistralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, sliding_window=512,
    )  # fmt: skip
    assert fast_decoder(transformers.AutoModelForCausalLM.from_config(mistral)) is None
