"""Tiny randomly initialised models of each family the fast decoder covers (Llama, Qwen2, Qwen3,
Mistral, Gemma), built from transformers' own configs with the default model's tokenizer and chat
template: no downloads. Shared by the decoder and the base-model registry tests."""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma")


def tiny_config(family: str, vocab_size: int, *, bos: int | None, eos: int | None):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":  # q/k/v with bias
        return transformers.Qwen2Config(**common)
    if family == "qwen3":  # q/k RMSNorm over the head dimension
        # head_dim 128, as every Qwen3: transformers' GGUF loader assumes it (tests/api/
        # test_base_models.py reads a GGUF export back), and it is wider than hidden / heads.
        return transformers.Qwen3Config(**common, head_dim=128)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "gemma":  # embeddings scaled by sqrt(hidden), (1 + w) RMSNorm, tanh-GeLU MLP
        return transformers.GemmaConfig(**common, head_dim=16)
    raise ValueError(family)


def build_tiny_family(family: str, tokenizer_dir: Path, out: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(family, len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases start at 1 or 0: move them off it, so their math counts
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
