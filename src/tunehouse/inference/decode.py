"""The decode step of Llama-architecture models (SmolLM2 and the Llama family), without transformers'
per-call machinery.

A decode step feeds one token per sequence. On a CPU, with a small model, the time around the
matmuls counts: transformers' forward builds a 4D mask, computes the rotary tables, goes through
its attention-interface dispatch, output-recording hooks and keyword plumbing in every layer, and
normalises with seven ops where `F.rms_norm` does one. `LlamaDecoder.step` computes the same
thing in a plain loop over the same modules (so LoRA slots and int8 layers work unchanged) and the
same KV cache: about 3 ms less per step for SmolLM2-135M on a 2-core CPU, 10-15% of a
one-stream step. On fp32 its
logits equal transformers' bit for bit (tests/inference/test_decode.py); prompts (prefill) still go
through transformers.

Only what this was checked against is taken (`fast_decoder` returns None otherwise, and the engine
keeps transformers' forward): `model_type` "llama", default RoPE, a SiLU MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fast_decoder(model: nn.Module) -> LlamaDecoder | None:
    config = model.config
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if (
        config.model_type != "llama"
        or getattr(rotary, "rope_type", None) != "default"
        or config.hidden_act != "silu"
        or getattr(config, "pretraining_tp", 1) != 1
    ):
        return None
    return LlamaDecoder(model)


class LlamaDecoder:
    def __init__(self, model: nn.Module):
        inner, config = model.model, model.config
        self.embed, self.layers, self.norm, self.head = (
            inner.embed_tokens,
            inner.layers,
            inner.norm,
            model.lm_head,
        )
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.layers[0].self_attn.scaling
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.rope_scale = inner.rotary_emb.attention_scaling
        # transformers' RMSNorm computes in fp32 and scales after casting back; `F.rms_norm` equals it
        # only for fp32 models, so other dtypes keep the norm modules.
        self.fp32 = self.embed.weight.dtype == torch.float32

    def _norm(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (self.hidden,), module.weight, self.eps) if self.fp32 else module(h)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """`ids` and `positions` [batch, 1]; `mask` [batch, cache length + 1], 0 over left padding;
        `cache` the engine's KV cache, appended to. The next-token logits [batch, vocabulary]."""
        rows = ids.shape[0]
        h = self.embed(ids)
        freqs = positions.reshape(rows, 1).float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scale).to(h.dtype)[:, None, None, :]
        sin = (angles.sin() * self.rope_scale).to(h.dtype)[:, None, None, :]
        # transformers rotates as x * cos + cat(-x2, x1) * sin. Rolling x by half a head gives
        # cat(x2, x1); the sign moves onto sin: one op per tensor instead of four, same numbers.
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            x = self._norm(layer.input_layernorm, h)
            # [rows, heads, 1, dim] directly: with one position, the same layout as transformers'
            # view-then-transpose, one op less each.
            q = attention.q_proj(x).view(rows, heads, 1, dim)
            k = attention.k_proj(x).view(rows, kv_heads, 1, dim)
            v = attention.v_proj(x).view(rows, kv_heads, 1, dim)
            q = q * cos + q.roll(half, dims=-1) * sin
            k = k * cos + k.roll(half, dims=-1) * sin
            k, v = kv.update(k, v)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attend, scale=self.scale, enable_gqa=kv_heads != heads
            )
            h = h + attention.o_proj(out.reshape(rows, 1, heads * dim))
            x = self._norm(layer.post_attention_layernorm, h)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self.head(self._norm(self.norm, h)[:, -1])
