"""The tests' tiny model: a 2-layer Llama with SmolLM2's tokenizer and chat template, random weights
(seed 0). Shared by the test fixtures and the benchmarks that need a fast stand-in base model."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(tokenizer_dir: Path, out: Path) -> Path:
    """Write the tiny model (weights and tokenizer) into the folder `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # No pad_token_id: SmolLM2 pads with <|im_end|>, and an embedding's padding row is zeroed,
        # which (tied to the output) would leave the model unable to ever end an answer.
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
