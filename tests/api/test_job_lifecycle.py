"""Pause and resume, continued training from an ft: model, and a training process killed with -9:
each continues from saved training state, and the record (metrics, checkpoints) stays whole."""

import json
import math
import os
import signal
import subprocess
import time

import openai
import pytest

from tests.api.conftest import LiveServer, chat_line, wait_for_job, write_jsonl
from tests.conftest import TINY_MODEL

# Long enough (120 steps) that a pause or a kill lands mid-run even when the tiny model trains fast.
LINES = [chat_line(f"Count to {i}", " ".join(str(k) for k in range(i % 12 + 10))) for i in range(40)]
HYPER = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 2}
STEPS = 120


def _metrics(client, job_id):
    events = client.fine_tuning.jobs.list_events(job_id, limit=10000).data
    return sorted((e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics")


def _wait_steps(client, job_id, n, timeout=120):
    deadline = time.time() + timeout
    while len(_metrics(client, job_id)) < n:
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)


def _settled_step_count(client, job_id, timeout=60):
    """The number of steps once no new one has appeared for 3 s (a busy machine may take a few
    seconds to stop a training process)."""
    deadline = time.time() + timeout
    n = len(_metrics(client, job_id))
    while True:
        time.sleep(3)
        now = len(_metrics(client, job_id))
        if now == n:
            return n
        assert time.time() < deadline, "the training process did not stop"
        n = now


def _create(client, tmp_path, **kw):
    f = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", LINES).open("rb"), purpose="fine-tune")
    return client.fine_tuning.jobs.create(
        model=kw.pop("model", TINY_MODEL), training_file=f.id, seed=3, hyperparameters=HYPER, **kw
    )


@pytest.mark.one_database  # checks training, the same on either database
def test_pause_and_resume_continue_the_same_loss_curve(server, client, tmp_path):
    reference = wait_for_job(client, _create(client, tmp_path).id)
    assert reference.status == "succeeded"

    job = _create(client, tmp_path)
    _wait_steps(client, job.id, 8)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    n = _settled_step_count(client, job.id)  # the process saves its state and stops
    time.sleep(2)
    assert len(_metrics(client, job.id)) == n < STEPS, "a paused job does not train"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    done = wait_for_job(client, job.id)
    assert done.status == "succeeded", done.error
    steps = _metrics(client, job.id)
    assert [s for s, _ in steps] == list(range(1, STEPS + 1)), "every step exactly once"
    for (_, a), (_, b) in zip(steps, _metrics(client, reference.id), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert "Fine-tuning job paused" in messages and "Fine-tuning job resumed" in messages
    assert any(m.startswith("Fine-tuning job resumed from step ") for m in messages)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [120, 80, 40]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)


@pytest.mark.one_database  # checks training, the same on either database
def test_continue_training_from_a_fine_tuned_model(server, client, tmp_path):
    first = wait_for_job(client, _create(client, tmp_path).id)
    second = _create(client, tmp_path, model=first.fine_tuned_model, suffix="more")
    assert second.model == first.fine_tuned_model
    second = wait_for_job(client, second.id)
    assert second.status == "succeeded", second.error
    assert second.fine_tuned_model.startswith(f"ft:{TINY_MODEL}:default:more:")
    # It starts where the first job ended, not from the base.
    assert _metrics(client, second.id)[0][1] < _metrics(client, first.id)[0][1]


def test_a_killed_training_process_resumes_from_its_saved_state(settings, tmp_path):
    settings.state_save_seconds = 0  # save after every step, so the kill loses nothing
    with LiveServer(settings) as live:
        client = live.client()
        job = _create(client, tmp_path)
        _wait_steps(client, job.id, 6)
        pids = subprocess.run(
            ["pgrep", "-f", f"tunehouse.jobs.runner train {job.id}"], capture_output=True, text=True
        ).stdout.split()
        assert pids
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        done = wait_for_job(client, job.id)
        assert done.status == "succeeded", done.error
        assert [s for s, _ in _metrics(client, job.id)] == list(range(1, STEPS + 1))
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
        assert any(m.startswith("Retrying in ") and "the training process was killed" in m for m in messages)
        assert any(m.startswith("Fine-tuning job resumed from step ") for m in messages)


# Preference lines for the DPO tests: a warm greeting preferred over a curt one.
GREETING_PAIRS = [
    json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": f"Greet customer {i}."}]},
            "preferred_output": [{"role": "assistant", "content": f"Hello customer {i}, welcome!"}],
            "non_preferred_output": [{"role": "assistant", "content": "What do you want?"}],
        }
    )
    for i in range(12)
]


@pytest.mark.one_database  # checks training, the same on either database
def test_dpo_job_on_preference_data(server, client, tmp_path):
    f = client.files.create(
        file=write_jsonl(tmp_path / "pref.jsonl", GREETING_PAIRS).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=f.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.hyperparameters is None  # OpenAI returns the legacy field only for supervised jobs
    hp = job.method.dpo.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.beta) == (2, 4, 0.1)
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(metrics) == 6 and all("train_reward_margin" in m for m in metrics)
    out = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert out.model == job.fine_tuned_model

    # A chat-format file for a DPO job is one clear error, not a crash.
    chat = client.files.create(
        file=write_jsonl(tmp_path / "chat.jsonl", LINES).open("rb"), purpose="fine-tune"
    )
    bad = wait_for_job(
        client,
        client.fine_tuning.jobs.create(model=TINY_MODEL, training_file=chat.id, method={"type": "dpo"}).id,
    )
    assert bad.status == "failed" and bad.error.param == "training_file"
    assert "preference" in bad.error.message


# ------------------------------------------------------------------------------------------------
# Full fine-tuning and DPO from a fine-tuned model, end to end over the SDK
# ------------------------------------------------------------------------------------------------

SHORT = LINES[:12]  # batch 4: 3 steps per epoch
PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count to 3"}]


def _hyper(job) -> dict:
    d = job.to_dict()["method"]
    return d[d["type"]]["hyperparameters"]


def _greedy_transformers(folder, messages, max_tokens):
    """What plain transformers generates from an exported folder: greedy, until end of turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    n = next((i for i, t in enumerate(new) if t in eos), len(new))
    return tokenizer.decode(new[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.one_database  # checks training, the same on either database
def test_full_fine_tuning_end_to_end(settings, tmp_path):
    from tunehouse.export import export_model

    settings.dtype = "float32"  # training and serving in fp32: greedy tokens compare exactly
    with LiveServer(settings) as live:
        client = live.client()
        f = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", SHORT).open("rb"), purpose="fine-tune")
        hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 50, "fine_tuning_type": "full"}
        job = client.fine_tuning.jobs.create(
            model=TINY_MODEL,
            training_file=f.id,
            seed=1,
            method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        )
        assert _hyper(job)["fine_tuning_type"] == "full" and "lora_rank" not in _hyper(job)
        job = wait_for_job(client, job.id)
        assert job.status == "succeeded", job.error
        assert _hyper(job) == {**hyper, "fine_tuning_type": "full"}  # echoed, resolved values
        steps = _metrics(client, job.id)
        assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6] and steps[-1][1] < steps[0][1]
        ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert sorted(c.step_number for c in ckpts) == [3, 6]

        # Servable by name: the model and its checkpoint answer, and differently from the base.
        def ask(model):
            out = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)
            assert out.model == model
            return out.choices[0].message.content

        answer = ask(job.fine_tuned_model)
        assert answer != ask(TINY_MODEL)
        ask(next(c.fine_tuned_model_checkpoint for c in ckpts if c.step_number == 3))

        # Export: the whole model folder (--merged changes nothing), loads with plain transformers
        # and generates what the server generated.
        out = export_model(settings, job.fine_tuned_model, tmp_path / "export", merged=True)
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        assert json.loads((out / "tunehouse.json").read_text())["format"] == "full"
        assert _greedy_transformers(out, PROMPT, 8) == answer

        # Continued training from it: full again ("auto" takes the model's type), from its weights.
        more = client.fine_tuning.jobs.create(
            model=job.fine_tuned_model,
            training_file=f.id,
            seed=1,
            hyperparameters={"n_epochs": 1, "batch_size": 4},
        )
        assert _hyper(more)["fine_tuning_type"] == "full"
        more = wait_for_job(client, more.id)
        assert more.status == "succeeded", more.error
        assert _metrics(client, more.id)[0][1] < steps[0][1]
        # A LoRA adapter on top of full weights is refused at once, naming the parameter.
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(
                model=job.fine_tuned_model,
                training_file=f.id,
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"fine_tuning_type": "lora"}},
                },
            )
        assert e.value.body["param"] == "method.supervised.hyperparameters.fine_tuning_type"


@pytest.mark.one_database  # checks training, the same on either database
def test_dpo_from_a_fine_tuned_model(server, client, tmp_path):
    chat = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", SHORT).open("rb"), purpose="fine-tune")
    sft = client.fine_tuning.jobs.create(
        model=TINY_MODEL,
        training_file=chat.id,
        seed=2,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "lora_rank": 4},
    )
    sft = wait_for_job(client, sft.id)
    assert sft.status == "succeeded", sft.error

    pref = client.files.create(
        file=write_jsonl(tmp_path / "p.jsonl", GREETING_PAIRS).open("rb"), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=pref.id,
        suffix="dpo",
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}},
        },
    )
    assert job.model == sft.fine_tuned_model and _hyper(job)["fine_tuning_type"] == "lora"
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{TINY_MODEL}:default:dpo:")
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    first = min((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    # The policy starts as the fine-tuned model and that model is the reference: at step 1 the
    # two agree exactly (loss log 2, zero rewards). With the base as reference they would not.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["train_rewards_chosen"] == pytest.approx(0, abs=1e-5)
    out = client.chat.completions.create(model=job.fine_tuned_model, messages=PROMPT, max_tokens=3)
    assert out.model == job.fine_tuned_model
