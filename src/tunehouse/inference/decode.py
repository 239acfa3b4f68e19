"""The decode step of Llama-architecture models (SmolLM2 and the Llama family), without transformers'
per-call machinery.

A decode step feeds one token per sequence. On a CPU, with a small model, the time around the
matmuls counts: transformers' forward builds a 4D mask, computes the rotary tables, goes through
its attention-interface dispatch, output-recording hooks and keyword plumbing in every layer, and
normalises with seven ops where `F.rms_norm` does one. `LlamaDecoder.step` computes the same
thing in a plain loop over the same modules (so LoRA slots and int8 layers work unchanged) and the
same KV cache: about 3 ms less per step for SmolLM2-135M on a 2-core CPU, 10-15% of a
one-stream step. Besides:
- q/k/v and gate/up run as one matmul each (`_Fused`), for plain full-precision layers;
- a bf16 model on a CPU attends in fp32 against a cache kept in fp32 (`LlamaDecoder._attend`).
On fp32 its logits equal transformers' within 1e-5 (tests/inference/test_decode.py); prompts
(prefill) still go through transformers.

Only what this was checked against is taken (`fast_decoder` returns None otherwise, and the engine
keeps transformers' forward): `model_type` "llama", default RoPE, a SiLU MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunehouse.inference.lora import LoraLinear


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
        self.fp32 = self.embed.weight.dtype == torch.float32
        self.qkv = [_Fused(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers]
        self.gate_up = [_Fused(layer.mlp, ("gate_proj", "up_proj")) for layer in self.layers]

    def _norm(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            return F.rms_norm(h, (self.hidden,), module.weight, self.eps)
        # transformers' RMSNorm: normalise in fp32, cast back, then scale; three ops instead of seven.
        return module.weight * F.rms_norm(h.float(), (self.hidden,), None, self.eps).to(h.dtype)

    def _attend(self, q, k, v, mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """One query position against the cache: [rows, heads, 1, dim] → [rows, 1, heads * dim].
        `mask` is boolean (None: attend to everything), `bias` the same as -inf/0, in fp32."""
        rows, heads, _, dim = q.shape
        if k.dtype == q.dtype:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_kv_heads != heads
            )
            return out.reshape(rows, 1, heads * dim)
        # A cache kept in fp32 for a bf16 model on a CPU (see `_GrowingLayer` in hf.py): PyTorch's
        # bf16 CPU kernels are slow for this, the attention kernel (16 rows, 80 cached positions:
        # 900 µs against 120 µs here) and oneDNN's batched matmul, which builds a new kernel for
        # every new cache length (~0.6 ms). In fp32, as plain matmuls: heads sharing a KV head are
        # one matmul (grouped-query attention without expanding the cache).
        grouped = q.to(k.dtype).view(rows, self.n_kv_heads, heads // self.n_kv_heads, dim)
        scores = torch.matmul(grouped, k.transpose(-1, -2)) * self.scale
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return out.to(q.dtype).view(rows, 1, heads * dim)

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
        attend = bias = None
        if not bool(mask.all()):
            attend = mask.bool()[:, None, None, :]
            if getattr(cache.layers[0], "dtype", h.dtype) != h.dtype:  # `_attend`'s fp32 matmuls
                bias = torch.zeros(attend.shape, device=h.device).masked_fill_(~attend, float("-inf"))
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        for layer, kv, qkv, gate_up in zip(self.layers, cache.layers, self.qkv, self.gate_up, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            x = self._norm(layer.input_layernorm, h)
            q, k, v = qkv(x)
            # [rows, heads, 1, dim] directly: with one position, the same layout as transformers'
            # view-then-transpose, one op less each.
            q = q.view(rows, heads, 1, dim)
            k = k.view(rows, kv_heads, 1, dim)
            v = v.view(rows, kv_heads, 1, dim)
            q = q * cos + q.roll(half, dims=-1) * sin
            k = k * cos + k.roll(half, dims=-1) * sin
            k, v = kv.append(k, v)
            h = h + attention.o_proj(self._attend(q, k, v, attend, bias))
            x = self._norm(layer.post_attention_layernorm, h)
            gate, up = gate_up(x)
            h = h + mlp.down_proj(F.silu(gate) * up)
        return self.head(self._norm(self.norm, h)[:, -1])


class _Fused:
    """The projections of one block that read the same input (q/k/v; gate/up), computed together.

    Base weights: plain `nn.Linear`s without bias are moved into one tensor, of which each layer's
    weight becomes a view, so transformers' forward (prefills) sees the same layers and no memory is
    added. A bf16 matmul of 16 rows by 576 costs nearly as much for 192 outputs (k, v) as for 576
    (q): fused, q/k/v take 90 µs, not 147. int8 layers stay as they are (they share one matmul per
    input already, see quantize.py).

    LoRA updates: every member's A (the slots in use) side by side, and their B as one
    block-diagonal matrix, so the updates of all members take two matmuls instead of two each
    (16 rows, 4 adapters: ~20 µs a matmul, mostly fixed cost). Rebuilt when adapters change."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...]):
        self.parent, self.names = parent, names
        linears = [getattr(parent, name) for name in names]
        linears = [m.base if isinstance(m, LoraLinear) else m for m in linears]
        self.sizes = [m.out_features for m in linears]
        self.weight: torch.Tensor | None = None
        if all(type(m) is nn.Linear and m.bias is None for m in linears) and (
            len({(m.weight.dtype, m.weight.device) for m in linears}) == 1
        ):
            self.weight = torch.cat([m.weight.detach() for m in linears])
            for m, view in zip(linears, self.weight.split(self.sizes), strict=True):
                m.weight = nn.Parameter(view, requires_grad=False)
        self._lora_key: tuple | None = None
        self._lora: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        modules = [getattr(self.parent, name) for name in self.names]
        if self.weight is not None:
            outs = list(F.linear(x, self.weight).split(self.sizes, dim=-1))
        else:
            outs = [m.base(x) if isinstance(m, LoraLinear) else m(x) for m in modules]
        delta = self._lora_delta(x, modules)
        if delta is not None:
            outs = [o + d.to(o.dtype) for o, d in zip(outs, delta.split(self.sizes, dim=-1), strict=True)]
        return outs

    def _lora_delta(self, x: torch.Tensor, modules: list[nn.Module]) -> torch.Tensor | None:
        wrapped = [m for m in modules if isinstance(m, LoraLinear)]
        if not wrapped or wrapped[0].context.mask is None:
            return None
        context = wrapped[0].context
        width = context.mask.shape[-1]
        key = (context.version, width, tuple(id(m) for m in wrapped))
        if key != self._lora_key:
            self._lora_key, self._lora = key, self._stack(modules, width)
        A, B, n = self._lora
        down = F.linear(x.to(A.dtype), A)
        mask = context.tiled(n)  # [batch, 1, n * width]
        return F.linear(down * (mask if down.dim() == 3 else mask.squeeze(1)), B)

    def _stack(self, modules: list[nn.Module], width: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        wrapped = [m for m in modules if isinstance(m, LoraLinear)]
        A = torch.cat([m.A_all[:width] for m in wrapped])
        B = A.new_zeros((sum(self.sizes), len(wrapped) * width))
        column, row = 0, 0
        for m, size in zip(modules, self.sizes, strict=True):
            if isinstance(m, LoraLinear):
                B[row : row + size, column : column + width] = m.B_all[:, :width]
                column += width
            row += size
        return A, B, len(wrapped)
