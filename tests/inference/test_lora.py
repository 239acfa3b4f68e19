"""The batched multi-LoRA layers give the logits PEFT gives, for every mix of adapters in a batch."""

from pathlib import Path

import pytest
import torch

from tests.inference.test_hf_engine import adapters  # noqa: F401
from tunehouse.inference.lora import MultiLora, UnsupportedAdapter


def _peft_logits(base_dir: Path, adapter: Path | None, ids: torch.Tensor, dtype) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_peft(tiny_model_dir, adapters, dtype):  # noqa: F811
    from transformers import AutoModelForCausalLM

    a, b = adapters
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    expected = {ref: _peft_logits(tiny_model_dir, ref, ids, dtype) for ref in (None, a, b)}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    lora = MultiLora(model, n_slots=2)
    slot = {None: -1, a: lora.load(a), b: lora.load(b)}
    # Every row of one batch on its own adapter (or none), in an order unlike the load order.
    order = [b, None, a, b, a]
    lora.set_rows([slot[ref] for ref in order])
    with torch.inference_mode():
        got = model(input_ids=ids.repeat(len(order), 1)).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: ~3 significant digits
    for row, ref in enumerate(order):
        scale = expected[ref].abs().max()
        assert (got[row] - expected[ref][0]).abs().max() <= tol * scale
    assert (expected[a] - expected[None]).abs().max() > 10 * tol * expected[None].abs().max()

    # A third adapter when both slots are taken gets a new slot; unloading frees and clears one.
    third = lora.load(a)
    assert third == 2 and lora.n_slots == 3
    lora.unload(slot[b])
    lora.set_rows([slot[b]])
    with torch.inference_mode():
        cleared = model(input_ids=ids).logits.float()
    assert (cleared[0] - expected[None][0]).abs().max() <= tol * expected[None].abs().max()


def test_unsupported_adapter_is_refused(tiny_model_dir, adapters, tmp_path):  # noqa: F811
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    dora = tmp_path / "dora"
    shutil.copytree(adapters[0], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        MultiLora(model, n_slots=1).load(dora)
