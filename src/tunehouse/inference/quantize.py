"""Weight-only int8 for serving (`TUNEHOUSE_INFERENCE_QUANTIZATION=int8`).

Decoding one token reads every weight of the model once, so on a CPU a step's time is mostly memory
traffic: int8 weights halve it against bf16. Each output channel of a linear layer keeps one scale
(symmetric, round to nearest), activations stay in the model's dtype and the matmul dequantizes on
the fly (`aten._weight_int8pack_mm`). Answers stay close to bf16's but are not identical to them,
which is why it is opt-in. Embeddings and norms are untouched; LoRA adapters stay in the model's
dtype on top of the quantized base layers.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Linear):
    """An `nn.Linear` whose weight is int8 with one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("qweight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight (for code that inspects it, e.g. its dtype; not used to compute)."""
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> int:
    """Replace every `nn.Linear` of a model (the output head included) with an `Int8Linear`; the
    number replaced. The model must be in bf16 (the kernel's activations) on the CPU."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
                replaced += 1
    return replaced


def int8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int8pack_mm")
