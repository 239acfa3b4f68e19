"""int8 serving (`TUNEHOUSE_INFERENCE_QUANTIZATION=int8`), opt-in: faster decoding on a CPU, answers
close to but not identical with the full-precision model's.

Decoding one token reads every weight of the model once, so on a CPU a step's time is mostly memory
traffic, and int8 weights cut it. Each output channel of a linear layer keeps one scale (symmetric,
round to nearest), and the activations are quantized too, so the products run on the CPU's int8
units through fbgemm (`quantized::linear_dynamic`, the kernel of PyTorch's dynamic quantization).
The model computes in fp32 around the int8 matmuls, whatever the CPU's bf16 support: measured on a
2-core EPYC with AVX512-BF16, the 4 matmuls of all 30 layers of SmolLM2-135M take 5.7 ms for one
row and 7.8 ms for 16 (weights not in cache), against 14.3 / 15.1 ms in bf16 and 5.6 / 18.6 ms
with int8 weights and bf16 activations (`aten._weight_int8pack_mm`, which this replaced).

- fbgemm quantizes its input with one scale for the whole tensor. Each row is divided by its own
  peak first (and the output multiplied back: the layer is linear), so every token gets its own
  scale, as if quantized alone: a batch's loudest row does not crush the others.
- A token's few large channels would set its scale and crush the rest, so the input channels with
  the largest magnitudes on a short calibration text (`CALIBRATION_CHAT`) stay in full precision,
  in a side matmul (LLM.int8()'s decomposition, with the outlier channels fixed at load time).
  Layers that read the same activations (q/k/v of an attention block, gate/up of an MLP; found in
  the calibration pass) quantize them once and share one matmul (`SharedInput`).

On SmolLM2-135M the mean KL divergence from fp32's next-token distribution is about 0.009 (bf16's:
0.001), and greedy answers stay coherent but part from fp32's after some tokens, as bf16's do
(`bench/int8_quality.py`). SmoothQuant-style scaling instead of the outlier matmul was tried and
doubled the divergence.

Embeddings and norms are untouched. LoRA adapters stay in fp32 on top of the quantized base layers,
but for their A's in the decode step, which become extra rows of their block's int8 matmul
(`packed_with`; see `tunehouse.inference.decode._Projections`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tunehouse.inference.native import native_ops

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


class SharedInput:
    """The int8 weights of the linear layers that read one input, stacked, and the input's outlier
    channels. The first member called computes every member's output in one matmul; the others
    take theirs from it, and once all have, it is dropped."""

    def __init__(self, linears: list[nn.Linear], channel_max: torch.Tensor):
        weight = torch.cat([linear.weight.detach().float() for linear in linears])
        n_in = weight.shape[1]
        self.outliers = channel_max.topk(min(n_in, max(8, n_in // 48))).indices
        keep = torch.ones(n_in)
        keep[self.outliers] = 0.0
        self.keep = keep  # multiplies the outlier channels out of the quantized part
        self.outlier_weight = weight[:, self.outliers].t().contiguous()  # [outliers, out]
        qweight, self.scales = _quantize_channels(weight * keep)
        self.packed = _pack(qweight, self.scales)  # the bias is added afterwards (outputs get rescaled)
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
        self.native = native_ops()  # the input preparation in one op, where it can be built

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is not x or self._outputs[member] is None:
            self._input, self._outputs = x, self._compute(x)
        out = self._outputs[member]
        self._outputs[member] = None
        if all(o is None for o in self._outputs):
            self._input = None  # every member has its output: hold on to nothing
        return out

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        out = self.full(x)
        if len(self.spans) == 1:
            return [out]
        return [out[..., start:end] for start, end in self.spans]

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, side by side."""
        rows = x.reshape(-1, x.shape[-1])
        out = self.matmul(rows)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def matmul(self, rows: torch.Tensor, packed=None, outlier_weight=None) -> torch.Tensor:
        """`rows` [n, in] times the weight, but for the bias: the int8 matmul plus the outlier
        channels' full-precision one. `packed` and `outlier_weight`: a weight from `packed_with`
        and its outlier columns instead of the group's own."""
        packed = self.packed if packed is None else packed
        outlier_weight = self.outlier_weight if outlier_weight is None else outlier_weight
        # One native op for the five below (for one row too: dividing by its peak changes ~nothing).
        # Inputs are fp32: quantize_int8 takes fp32 models only.
        if self.native is not None:
            scaled, peak, outliers = self.native.int8_inputs(rows, self.keep, self.outliers)
            out = torch.ops.quantized.linear_dynamic(scaled, packed, _REDUCE_RANGE).mul_(peak)
            return out.addmm_(outliers, outlier_weight)
        inner = rows * self.keep
        if rows.shape[0] == 1:  # one row: fbgemm's scale for the tensor is the row's own
            out = torch.ops.quantized.linear_dynamic(inner, packed, _REDUCE_RANGE)
        else:
            # abs().amax(): linalg.vector_norm(ord=inf) is several times slower on a batch of rows.
            peak = inner.abs().amax(dim=1, keepdim=True).clamp_(min=1e-8)
            out = torch.ops.quantized.linear_dynamic(inner.div_(peak), packed, _REDUCE_RANGE).mul_(peak)
        return out.addmm_(rows.index_select(1, self.outliers), outlier_weight)

    def packed_with(self, extra: torch.Tensor):
        """The group's int8 weight with more output rows after its own: `extra` [k, in], full
        precision, quantized as the rest (one scale per row, the outlier channels left out: their
        share goes into an outlier matmul as the group's does). Unpacks the group's weight: ~4 ms
        for a block of SmolLM2-135M, so callers keep the result."""
        own = torch.ops.quantized.linear_unpack(self.packed)[0]
        qextra, scales = _quantize_channels(extra.float() * self.keep)
        return _pack(
            torch.cat([own.int_repr(), qextra]), torch.cat([own.q_per_channel_scales().float(), scales])
        )


class W8A8Linear(nn.Linear):
    """One member of a `SharedInput`; behaves as the `nn.Linear` it replaces."""

    def __init__(self, linear: nn.Linear, group: SharedInput, member: int):
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
        weight = torch.ops.quantized.linear_unpack(self.group.packed)[0].dequantize()[start:end].float()
        weight[:, self.group.outliers] = self.group.outlier_weight[:, start:end].t()
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.member, x)


# Without VNNI, fbgemm sums pairs of u8 x s8 products in int16, which can saturate: 7-bit
# activations then, as PyTorch's own dynamic quantization does.
_REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def _pack(qweight: torch.Tensor, scales: torch.Tensor):
    """int8 weights [out, in] with one scale per output channel, in fbgemm's packed layout."""
    with warnings.catch_warnings():
        # PyTorch 2.13 deprecates creating quantized tensors (we pin torch below 2.14); fbgemm's
        # kernels themselves are not deprecated.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        weight = torch._make_per_channel_quantized_tensor(
            qweight, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0
        )
    return torch.ops.quantized.linear_prepack(weight, None)


def _quantize_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per output channel (row)."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


def quantize_int8(model: nn.Module, calibration_ids: list[int]) -> int:
    """Replace every `nn.Linear` of an fp32 model (the output head included) with its int8 version;
    the number replaced. `calibration_ids` is a short tokenized text (e.g. `CALIBRATION_CHAT`
    rendered) that finds each input's outlier channels."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"int8 quantization computes in float32; the model is {dtype}")
    if not calibration_ids:
        raise ValueError("int8 quantization needs calibration tokens")
    members: dict[str, tuple[SharedInput, int]] = {}
    for names, linears, channel_max in _calibrate(model, calibration_ids):
        group = SharedInput(linears, channel_max)
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


def int8_supported(device: torch.device) -> bool:
    """fbgemm, PyTorch's int8 kernels for x86 CPUs, is there. (Checked, not run: a parallel op in
    the caller's thread would make OpenMP throttle the scheduler thread's; see bench/serve_speed.py.)"""
    return (
        device.type == "cpu"
        and "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch.ops.quantized, "linear_dynamic")
        and hasattr(torch.ops.quantized, "linear_prepack")
    )
