"""int8 serving (`TUNEHOUSE_INFERENCE_QUANTIZATION=int8`), opt-in: faster decoding on a CPU, answers
close to but not identical with the full-precision model's.

Decoding one token reads every weight of the model once, so on a CPU a step's time is mostly memory
traffic, and int8 weights cut it. Each output channel of a linear layer keeps one scale (symmetric,
round to nearest). What computes with them depends on the model's dtype, i.e. on the CPU:

- bf16 (CPUs with AMX / AVX512-BF16): weight-only int8 (`Int8Linear`). Activations stay bf16 and
  `aten._weight_int8pack_mm` dequantizes the weights on the fly.
- fp32 (other x86 CPUs, where bf16 is emulated and slow): that kernel is slow with fp32 activations,
  so activations are quantized too, one scale per token, and the product runs on int8 units
  (`torch._int_mm`; AVX512-VNNI here: 3-4x an fp32 matmul). A token's few large channels would
  set its scale and crush the rest, so the input channels with the largest magnitudes on a short
  calibration text (`CALIBRATION_CHAT`) stay in full precision, in a side matmul (LLM.int8()'s
  decomposition, with the outlier channels fixed at load time). Layers that read the same
  activations (q/k/v of an attention block, gate/up of an MLP; found in the calibration pass)
  quantize them once and share one matmul (`_SharedInput`).
  On SmolLM2-135M the mean KL divergence from fp32's next-token distribution is 0.007 (bf16's:
  0.001; weight-only int8 on bf16: 0.005), and greedy answers stay coherent but part from fp32's
  after some tokens, as bf16's do (`bench/int8_quality.py`).

Embeddings and norms are untouched; LoRA adapters stay in the model's dtype on top of the quantized
base layers.
"""

from __future__ import annotations

import torch
from torch import nn

# Rendered with the model's own chat template to find each layer's outlier channels. Varied on
# purpose (prose, lists, numbers, JSON, code): outlier channels are a property of the model, but a
# single short sentence might not light them all up.
CALIBRATION_CHAT = [
    {"role": "system", "content": "You are a helpful assistant. Answer precisely."},
    {
        "role": "user",
        "content": "Summarise the history of bread in two sentences, then list three facts about oceans.",
    },
    {
        "role": "assistant",
        "content": "Bread was first baked about 14,000 years ago, long before farming; leavened loaves "
        "spread from Egypt across the Mediterranean.\n1. Oceans cover 71% of the Earth.\n"
        "2. They hold 97% of its water.\n3. The deepest point, the Challenger Deep, is 10,935 m down.",
    },
    {
        "role": "user",
        "content": 'Return {"name": ..., "age": ...} for a fictional person, and a Python function that adds two numbers.',
    },
    {
        "role": "assistant",
        "content": '{"name": "Ada Quill", "age": 37, "tags": ["engineer", null, true]}\n\n'
        "def add(a: int, b: int) -> int:\n    return a + b\n",
    },
]


class Int8Linear(nn.Linear):
    """bf16 models: an `nn.Linear` whose weight is int8 with one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight, scales = _quantize_channels(linear.weight.detach().float())
        self.register_buffer("qweight", qweight)
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


class _SharedInput:
    """fp32 models: the int8 weights of the linear layers that read one input, stacked, and the
    input's outlier channels. The first member called computes every member's output in one matmul;
    the others take theirs from it, and once all have, it is dropped."""

    def __init__(self, linears: list[nn.Linear], channel_max: torch.Tensor):
        weight = torch.cat([linear.weight.detach().float() for linear in linears])
        n_in = weight.shape[1]
        self.outliers = channel_max.topk(min(n_in, max(8, n_in // 48))).indices
        keep = torch.ones(n_in)
        keep[self.outliers] = 0.0
        self.keep = keep  # multiplies the outlier channels out of the quantized part
        self.outlier_weight = weight[:, self.outliers].t().contiguous()  # [outliers, out]
        self.qweight, self.scales = _quantize_channels(weight * keep)
        self.dequant = self.scales / 127.0  # with a row's peak: the product's scale
        self.qweight_t = self.qweight.t()  # [in, out] view: `_int_mm`'s fast layout
        biases = [linear.bias for linear in linears]
        self.bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b.detach().float() if b is not None else weight.new_zeros(linear.out_features)
                    for b, linear in zip(biases, linears, strict=True)
                ]
            )
        )
        ends = torch.tensor([linear.out_features for linear in linears]).cumsum(0).tolist()
        self.spans = list(zip([0, *ends[:-1]], ends, strict=True))
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor | None] = []

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x or self._outputs[member] is None:
            self._input, self._outputs = x, self._compute(x)
        out = self._outputs[member]
        self._outputs[member] = None
        if all(o is None for o in self._outputs):
            self._input = None  # every member has its output: hold on to nothing
        return out

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        rows = x.reshape(-1, x.shape[-1])
        inner = rows * self.keep
        # abs().amax(): linalg.vector_norm(ord=inf) is several times slower on a batch of rows.
        peak = inner.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8)  # each row's scale is peak / 127
        # In place, and no `127 / peak` (a Python-level reversed division): every op counts at one row.
        quantized = inner.mul_(127.0).div_(peak).round_().to(torch.int8)
        out = torch._int_mm(quantized, self.qweight_t).mul(peak).mul_(self.dequant)
        out = out.addmm_(rows.index_select(1, self.outliers), self.outlier_weight)
        if self.bias is not None:
            out += self.bias
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        if len(self.spans) == 1:
            return [out]
        return [out[..., start:end] for start, end in self.spans]


class W8A8Linear(nn.Linear):
    """fp32 models: one member of a `_SharedInput`; behaves as the `nn.Linear` it replaces."""

    def __init__(self, linear: nn.Linear, group: _SharedInput, member: int):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # for inspection: the group adds it
        self.group, self.member = group, member
        start, end = group.spans[member]
        self.scales = group.scales[start:end]  # LoRA wrappers read the activation dtype here

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight, outlier columns included (for inspection; not used to compute)."""
        start, end = self.group.spans[self.member]
        weight = self.group.qweight[start:end].float() * self.scales[:, None]
        weight[:, self.group.outliers] = self.group.outlier_weight[:, start:end].t()
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.member, x)


def _quantize_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per output channel (row)."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


def quantize_int8(model: nn.Module, calibration_ids: list[int] | None = None) -> int:
    """Replace every `nn.Linear` of a model (the output head included) with its int8 version; the
    number replaced. bf16 models get weight-only int8; fp32 models get int8 activations too, which
    needs `calibration_ids` (a short tokenized text, e.g. `CALIBRATION_CHAT` rendered)."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        return _replace(model, lambda name, linear: Int8Linear(linear))
    if dtype != torch.float32:
        raise ValueError(f"int8 quantization needs a bf16 or fp32 model, not {dtype}")
    if not calibration_ids:
        raise ValueError("int8 quantization of an fp32 model needs calibration tokens")
    members: dict[str, tuple[_SharedInput, int]] = {}
    for names, linears, channel_max in _calibrate(model, calibration_ids):
        group = _SharedInput(linears, channel_max)
        members.update({name: (group, i) for i, name in enumerate(names)})
    return _replace(model, lambda name, linear: W8A8Linear(linear, *members[name]))


def _calibrate(model: nn.Module, ids: list[int]):
    """One forward pass over `ids`: the linear layers grouped by the input tensor they read (in call
    order), with each input's largest magnitude per channel."""
    seen: list[tuple[str, nn.Linear, torch.Tensor]] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0])))
        for name, module in model.named_modules()
        if type(module) is nn.Linear
    ]
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[tuple[list[str], list[nn.Linear], torch.Tensor]] = []
    for name, linear, x in seen:
        if groups and groups[-1][2] is x:
            groups[-1][0].append(name)
            groups[-1][1].append(linear)
        else:
            groups.append(([name], [linear], x))
    return [
        (names, linears, x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float())
        for names, linears, x in groups
    ]


def _replace(model: nn.Module, make) -> int:
    names = {module: name for name, module in model.named_modules()}
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, make(names[child], child))
                replaced += 1
    return replaced


def int8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")
    return dtype == torch.float32 and hasattr(torch, "_int_mm")
