"""Rollouts (inference/rollout.py) answer as the model being trained would: greedy answers equal
transformers' own `generate` over the PEFT model with its adapter on, both through the fast decode
step over merged weights and through the fallback for models it does not cover; each prompt's
group is handed over once complete; the training model is left as it was."""

from __future__ import annotations

import pytest
import torch

from tunehouse.inference.decode import fast_decoder
from tunehouse.inference.rollout import sample_groups

PROMPTS = [[1, 5, 9, 42, 7, 3, 11, 2], [4, 8, 15, 16], [23, 42, 99, 100, 101, 7]]
STEPS = 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(path, *, covered: bool, targets=TARGETS):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if not covered:  # a RoPE the fast decode step does not compute: decoded by the model's forward
        config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    assert (fast_decoder(model) is not None) == covered
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; an adapter that changes the answers
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def _generate(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "covered, targets",
    [(True, TARGETS), (True, ["q_proj", "v_proj"]), (False, TARGETS)],
    # q/v only: the layers without an adapter are not copied, each keeps its own matmul
    ids=["fast-decoder", "fast-decoder-q-v-only", "model-forward"],
)
def test_greedy_rollouts_answer_as_the_model_with_its_adapter(tiny_model_dir, covered, targets):
    model = _lora_model(tiny_model_dir, covered=covered, targets=targets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups: dict[int, list[list[int]]] = {}

    def on_group(i, answers):
        assert i not in groups
        groups[i] = [list(a) for a in answers]

    with torch.no_grad():
        answers = sample_groups(
            model, PROMPTS, n=2, max_new_tokens=STEPS, temperature=0.0, seed=0,
            eos_ids=set(), pad_id=0, on_group=on_group,
        )  # fmt: skip
        want = [_generate(model, p) for p in PROMPTS]
        with model.disable_adapter():
            without = [_generate(model, p) for p in PROMPTS]
    assert answers == [[w, w] for w in want]
    assert want != without  # the adapter matters: the rollout used it
    assert groups == dict(enumerate(answers))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sampled_rollouts_follow_their_seed(tiny_model_dir):
    model = _lora_model(tiny_model_dir, covered=True)
    kwargs = dict(n=3, max_new_tokens=STEPS, temperature=1.0, eos_ids=set(), pad_id=0)
    with torch.no_grad():
        first = sample_groups(model, PROMPTS, seed=7, **kwargs)
        again = sample_groups(model, PROMPTS, seed=7, **kwargs)
        other = sample_groups(model, PROMPTS, seed=8, **kwargs)
    assert first == again != other
    assert all(len({tuple(a) for a in group}) > 1 for group in first)  # a group's answers differ


def test_constrained_rollouts_follow_the_response_format(tiny_model_dir):
    import json

    from transformers import AutoTokenizer

    from tunehouse.inference.constrained import build_tokenizer, validate_response_format
    from tunehouse.inference.rollout import Constraint

    model = _lora_model(tiny_model_dir, covered=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    grammar = validate_response_format(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    )
    constraint = Constraint(build_tokenizer(tokenizer, [tokenizer.eos_token_id]), grammar)
    kwargs = dict(n=3, max_new_tokens=16, seed=2, eos_ids={tokenizer.eos_token_id}, pad_id=0)
    with torch.no_grad():
        free = sample_groups(model, PROMPTS, temperature=1.0, **kwargs)
        shaped = sample_groups(model, PROMPTS, temperature=1.0, constraint=constraint, **kwargs)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for group in shaped for a in group]
    assert not any(tokenizer.decode(a).startswith("{") for group in free for a in group)
    for text, answer in zip(texts, [a for group in shaped for a in group], strict=True):
        compact = "".join(text.split())  # JSON may space its tokens (whitespace is cut here)
        assert compact.startswith('{"n":') or '{"n":'.startswith(compact), text
        if answer[-1] == tokenizer.eos_token_id:  # ended by itself: a whole document
            assert set(json.loads(text)) == {"n"}
