"""Batched multi-LoRA for serving: many adapters of one base in one forward pass, no per-adapter split.

PEFT's mixed-adapter batches (`adapter_names=`) cut every LoRA layer's input into one slice per
adapter and run each slice separately: a dozen small ops per adapter per layer per step, which on a
CPU costs more than the base model's own matmuls. Here every LoRA-targeted `nn.Linear` is wrapped
once per base in a `LoraLinear` that holds all loaded adapters side by side (punica / S-LoRA style):

    A_all  [slots * r, in]    each adapter's A in its own block of r rows
    B_all  [out, slots * r]   each adapter's B * scale in the matching block of columns
    y = base(x) + ((x @ A_all.T) * row_mask) @ B_all.T

`row_mask` [batch, 1, slots * r] is 1 over the block of the adapter a row uses and 0 elsewhere (all 0
for a row on the base model), built once per forward pass and shared by every layer; it stops at
the highest slot in use (slots are handed out lowest first), and only that many rows of A_all and
columns of B_all take part. Two dense matmuls per layer whatever the mix of adapters; the extra
width (slots * r columns) is small next to the layer's own. Adapters of a smaller rank are
zero-padded to r, which adds exactly nothing. (The decode step goes further and computes the
updates of q/k/v together, in the base layers' own output, and for int8 base layers computes
the A's in the int8 matmul itself: `tunehouse.inference.decode._Projections`.)

Loading reads the adapter's own files (adapter_config.json, adapter_model.safetensors) as PEFT saved
them; what PEFT can express but this does not (DoRA, fan_in_fan_out, trained non-LoRA modules,
per-module alpha, targets that are not linear layers) is refused with a clear error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn


class UnsupportedAdapter(ValueError):
    pass


class LoraContext:
    """Which slot each row of the current forward pass uses; shared by all `LoraLinear`s of a base."""

    def __init__(self) -> None:
        # [batch, 1, width]; None: no LoRA work at all. `width` covers the slots up to the highest
        # one in use (slots are handed out lowest first), so idle slots cost no multiplications.
        self.mask: torch.Tensor | None = None
        self.version = 0  # bumped whenever an adapter's weights change (for what is built from them)
        self.loaded = 0  # the highest slot holding an adapter, plus one
        self._columns: dict[tuple[int, int], torch.Tensor] = {}

    def set_rows(self, slots: list[int], rank: int, dtype, device) -> None:
        """`slots[i]` is row i's adapter slot, -1 for the base model."""
        self._columns = {}
        if rank == 0 or all(s < 0 for s in slots):
            self.mask = None
            return
        used = max(slots) + 1
        onehot = torch.zeros(len(slots), used + 1)
        onehot[torch.arange(len(slots)), torch.tensor(slots)] = 1.0  # -1: the extra last column
        mask = onehot[:, :used].repeat_interleave(rank, dim=1)
        self.mask = mask.to(device=device, dtype=dtype).unsqueeze(1)

    def columns(self, n: int, width: int = 0) -> torch.Tensor:
        """The mask as [batch, n * width]: for `n` layers' updates computed at once, each over
        `width` columns (at least the mask's; zeros past it, for slots no row uses)."""
        width = max(width, self.mask.shape[-1])
        key = (n, width)
        if key not in self._columns:
            mask = self.mask.squeeze(1)
            mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
            self._columns[key] = mask.repeat(1, n)
        return self._columns[key]


class LoraLinear(nn.Module):
    """An `nn.Linear` plus the LoRA updates of every loaded adapter, chosen per row by the context."""

    def __init__(self, base: nn.Linear, context: LoraContext, n_slots: int, rank: int):
        super().__init__()
        self.base = base
        self.context = context
        self.n_slots = n_slots
        self.rank = rank
        # The base layer's activation dtype and device (an int8 layer keeps them in its scales).
        ref = getattr(base, "scales", None)
        if ref is None:
            ref = base.weight
        self.A_all = torch.zeros(n_slots * rank, base.in_features, dtype=ref.dtype, device=ref.device)
        self.B_all = torch.zeros(base.out_features, n_slots * rank, dtype=ref.dtype, device=ref.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = self.delta(x)
        return out if delta is None else out + delta.to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the rows' adapters add to the base layer's output; None when no row has one."""
        mask = self.context.mask
        if mask is None:
            return None
        width = mask.shape[-1]
        down = torch.nn.functional.linear(x.to(self.A_all.dtype), self.A_all[:width])
        down = down * (mask if down.dim() == 3 else mask.squeeze(1))  # [batch, seq, r] or [batch, r]
        return torch.nn.functional.linear(down, self.B_all[:, :width])

    def resize(self, n_slots: int, rank: int) -> None:
        """Make room for more adapters or a larger rank: every slot's block widens, contents kept."""
        old_n, old_r = self.n_slots, self.rank
        A = self.A_all.new_zeros(n_slots * rank, self.A_all.shape[1])
        B = self.B_all.new_zeros(self.B_all.shape[0], n_slots * rank)
        for s in range(old_n):
            A[s * rank : s * rank + old_r] = self.A_all[s * old_r : (s + 1) * old_r]
            B[:, s * rank : s * rank + old_r] = self.B_all[:, s * old_r : (s + 1) * old_r]
        self.A_all, self.B_all, self.n_slots, self.rank = A, B, n_slots, rank

    def put(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Write one adapter's A [r, in] and B [out, r] into a slot (None: this layer is not targeted)."""
        r = self.rank
        self.A_all[slot * r : (slot + 1) * r] = 0
        self.B_all[:, slot * r : (slot + 1) * r] = 0
        if A is not None and B is not None:
            k = A.shape[0]
            self.A_all[slot * r : slot * r + k] = A.to(self.A_all.dtype)
            self.B_all[:, slot * r : slot * r + k] = (B.float() * scale).to(self.B_all.dtype)


def read_adapter(folder: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter's config and its {module name: (A, B)} as PEFT saved them."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"{folder}: only LoRA adapters can be served, not {config.get('peft_type')}")
    for key, what in (
        ("use_dora", "DoRA"),
        ("fan_in_fan_out", "fan_in_fan_out"),
        ("modules_to_save", "fully trained extra modules (modules_to_save)"),
        ("alpha_pattern", "per-module alpha (alpha_pattern)"),
    ):
        if config.get(key):
            raise UnsupportedAdapter(f"{folder}: adapters with {what} are not supported")
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(folder / "adapter_model.safetensors")
    elif (folder / "adapter_model.bin").is_file():
        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise UnsupportedAdapter(f"{folder}: unexpected weight {key} (only LoRA A/B are supported)")
    layers = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UnsupportedAdapter(f"{folder}: {module} lacks its lora_A or lora_B weight")
        layers[module] = (ab["lora_A"], ab["lora_B"])
    return config, layers


def adapter_scale(config: dict, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class MultiLora:
    """The adapters loaded into one base model, each in a slot of every `LoraLinear`."""

    def __init__(self, model: nn.Module, n_slots: int):
        self.model = model
        self.n_slots = n_slots
        self.rank = 0
        self.context = LoraContext()
        self.layers: dict[str, LoraLinear] = {}  # module name → wrapper, created on first need
        self.free = list(range(n_slots))

    def load(self, folder: Path) -> int:
        """Read an adapter into a free slot (a new one if none is free); its slot number."""
        config, weights = read_adapter(folder)
        modules = dict(self.model.named_modules())
        for name in weights:
            target = modules.get(name)
            if isinstance(target, LoraLinear):
                continue
            if not isinstance(target, nn.Linear):
                raise UnsupportedAdapter(f"{folder}: {name} is not a linear layer of the base model")
        rank = max(A.shape[0] for A, _ in weights.values()) if weights else 0
        for name, (A, B) in weights.items():
            target = modules[name]
            base = target.base if isinstance(target, LoraLinear) else target
            if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
                raise UnsupportedAdapter(f"{folder}: {name} does not match the base model's shape")
        if not self.free:  # every slot holds an adapter that running sequences need: add one
            self.free.append(self.n_slots)
            self.n_slots += 1
        if rank > self.rank or any(layer.n_slots != self.n_slots for layer in self.layers.values()):
            self.rank = max(rank, self.rank)
            for layer in self.layers.values():
                layer.resize(self.n_slots, self.rank)
        for name in weights:
            if name not in self.layers:
                self._wrap(name)
        self.free.sort()  # lowest first: the slots in use stay packed at the front (`LoraContext`)
        slot = self.free.pop(0)
        self.context.version += 1
        self._count_loaded()
        for name, layer in self.layers.items():
            pair = weights.get(name)
            if pair is None:
                layer.put(slot, None, None, 0.0)
            else:
                A, B = pair
                layer.put(slot, A, B, adapter_scale(config, A.shape[0]))
        return slot

    def unload(self, slot: int) -> None:
        self.context.version += 1
        for layer in self.layers.values():
            layer.put(slot, None, None, 0.0)
        self.free.append(slot)
        self._count_loaded()

    def _count_loaded(self) -> None:
        self.context.loaded = max((s + 1 for s in range(self.n_slots) if s not in self.free), default=0)

    def _wrap(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = LoraLinear(getattr(parent, child), self.context, self.n_slots, self.rank)
        setattr(parent, child, layer)
        self.layers[name] = layer

    def set_rows(self, slots: list[int]) -> None:
        weight = next(iter(self.layers.values())).A_all if self.layers else None
        if weight is None:
            self.context.mask = None
            return
        self.context.set_rows(slots, self.rank, weight.dtype, weight.device)
