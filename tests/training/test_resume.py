"""Resumable training state and continued training (state_dir / init_adapter_path), for real on
the tiny 2-layer model (CPU, about a second per train() call)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.training.helpers import COLORS
from tunehouse.training import state
from tunehouse.training.hparams import Hyperparameters
from tunehouse.training.loop import TrainingStopped, TrainSpec
from tunehouse.training.recipes.supervised import train

# 12 lines, batch 4: 3 steps per epoch, 6 steps in all; epoch ends after steps 3 and 6.
HP = Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=10)
# Dropout draws from the torch RNG on every forward: a resumed run only matches if the RNG state
# at the step boundary is restored (also after a stop inside a step).
DROPOUT = 0.1


def write_data(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Name color number {i}."},
                {"role": "assistant", "content": f"Color {i} is {c}."},
            ]
        }
        for i, c in enumerate(COLORS)
    ]
    train_file, valid_file = folder / "train.jsonl", folder / "valid.jsonl"
    train_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    valid_file.write_text("".join(json.dumps(line) + "\n" for line in lines[:4]))
    return train_file, valid_file


class Plain:
    """The four required hooks only: no on_resume / on_state_saved."""

    def __init__(self, stop=None) -> None:
        self.total_steps: int | None = None
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path, bool]] = []
        self.stop = stop or (lambda hooks: False)
        self.polls_since_metrics = 0

    def on_start(self, *, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_metrics(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))
        self.polls_since_metrics = 0

    def on_checkpoint(self, *, step: int, path: Path, metrics: dict[str, float], is_final: bool) -> None:
        self.checkpoints.append((step, path, is_final))

    def should_stop(self) -> bool:
        self.polls_since_metrics += 1
        return self.stop(self)

    def steps(self) -> list[int]:
        return [s for s, _ in self.metrics]

    def losses(self) -> list[float]:
        return [m["train_loss"] for _, m in self.metrics]


class Recorder(Plain):
    def __init__(self, stop=None, on_saved=None) -> None:
        super().__init__(stop)
        self.resumed: list[int] = []
        self.saved: list[int] = []
        self.on_saved = on_saved

    def on_resume(self, *, step: int) -> None:
        assert self.total_steps is not None  # on_start came first
        self.resumed.append(step)

    def on_state_saved(self, *, step: int, path: Path) -> None:
        assert (path / "state.json").is_file()
        assert json.loads((path / "state.json").read_text())["step"] == step
        assert leftovers(path) == []  # the swap is done, the old state already gone
        self.saved.append(step)
        if self.on_saved:
            self.on_saved(step, path)


def leftovers(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.parent.iterdir() if p.name.startswith(f"{state_dir.name}."))


def after_metrics(n: int, poll: int = 1):
    """should_stop: True at the `poll`-th poll after the n-th on_metrics (1: before the next step
    starts; 2: after its first micro-batch, inside the step)."""
    return lambda hooks: len(hooks.metrics) >= n and hooks.polls_since_metrics >= poll


def make_spec(root: Path, model_dir: Path, data: tuple[Path, Path], **kw) -> TrainSpec:
    return TrainSpec(
        base_model_path=model_dir,
        train_file=data[0],
        valid_file=data[1],
        output_dir=root / "out",
        hyperparameters=kw.pop("hp", HP),
        seed=kw.pop("seed", 3),
        lora_dropout=kw.pop("lora_dropout", DROPOUT),
        **kw,
    )


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def assert_same_metrics(got: list[tuple[int, dict]], want: list[tuple[int, dict]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, g), (_, w) in zip(got, want, strict=True):
        assert g.keys() == w.keys(), step
        assert g == pytest.approx(w, rel=0, abs=1e-6), step


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, data, tmp_path_factory):
    """The reference: one run, no state_dir (today's behaviour)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("uninterrupted")
    hooks = Plain()
    try:
        result = train(make_spec(root, tiny_model_dir, data), hooks)
    finally:
        torch.set_num_threads(before)
    assert result.resumed_from_step is None and result.steps == 6
    assert not any(p.name.startswith("state") for p in root.iterdir())  # no state without state_dir
    return hooks, result


@pytest.mark.parametrize(
    ("stop", "saved_at"),
    [
        pytest.param(after_metrics(2), 2, id="between-steps"),
        pytest.param(after_metrics(2, poll=2), 2, id="inside-a-step"),  # step 3 discarded, redone
        pytest.param(after_metrics(3), 3, id="at-epoch-end"),  # the epoch-end state, not saved twice
    ],
)
def test_stop_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path, data, uninterrupted, stop, saved_at
) -> None:
    ref_hooks, ref = uninterrupted
    state_dir = tmp_path / "state"
    spec = make_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir)

    first = Recorder(stop=stop)
    with pytest.raises(TrainingStopped):
        train(spec, first)
    assert first.steps() == list(range(1, saved_at + 1))
    assert first.saved == [saved_at] and first.resumed == []
    info = json.loads((state_dir / "state.json").read_text())
    assert info["step"] == saved_at
    assert (info["epoch"], info["batch_in_epoch"]) == divmod(saved_at, 3)
    assert leftovers(state_dir) == []

    second = Recorder()
    result = train(spec, second)  # the same spec again: continues from the state
    assert result.resumed_from_step == saved_at and second.resumed == [saved_at]
    assert second.total_steps == 6
    # Hooks only for the steps after the resumed one.
    assert second.steps() == list(range(saved_at + 1, 7))
    assert [(s, final) for s, _, final in second.checkpoints] == [(s, s == 6) for s in (3, 6) if s > saved_at]
    assert second.saved == [s for s in (3, 6) if s > saved_at]
    # Step for step the same run: losses, accuracies, valid and full-valid metrics, and weights.
    assert_same_metrics(first.metrics + second.metrics, ref_hooks.metrics)
    assert result.final_adapter_path == tmp_path / "out" / "checkpoints" / "step-6"
    assert_same_weights(adapter_weights(result.final_adapter_path), adapter_weights(ref.final_adapter_path))
    assert_same_weights(adapter_weights(state_dir / "adapter"), adapter_weights(ref.final_adapter_path))

    # A finished state: nothing left to do, no step redone, the final checkpoint reported back.
    third = Recorder()
    done = train(spec, third)
    assert done.resumed_from_step == 6 and third.resumed == [6]
    assert third.metrics == third.checkpoints == third.saved == []
    assert done.final_adapter_path == result.final_adapter_path and done.steps == 6


def test_periodic_state_saves_are_atomic_and_resumable(
    tmp_path: Path, tiny_model_dir: Path, data, uninterrupted
) -> None:
    ref_hooks, ref = uninterrupted
    state_dir = tmp_path / "state"
    middle = tmp_path / "middle-state"

    def copy_step_4(step: int, path: Path) -> None:
        if step == 4:  # inside the second epoch
            shutil.copytree(path, middle)

    hooks = Recorder(on_saved=copy_step_4)
    spec = make_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir, save_state_every_seconds=0)
    result = train(spec, hooks)
    assert hooks.saved == [1, 2, 3, 4, 5, 6]  # after every step (epoch ends: after the checkpoint)
    assert result.resumed_from_step is None
    assert leftovers(state_dir) == []
    assert sorted(p.name for p in state_dir.iterdir()) == ["adapter", "state.json", "trainer.pt"]
    # Saving the state does not change the run.
    assert_same_metrics(hooks.metrics, ref_hooks.metrics)
    info = json.loads((middle / "state.json").read_text())
    assert (info["step"], info["epoch"], info["batch_in_epoch"]) == (4, 1, 1)
    assert info["full_valid_metrics"].keys() == {"full_valid_loss", "full_valid_mean_token_accuracy"}

    # A state copied from the middle of the run continues it (elsewhere: another output folder).
    other = tmp_path / "other"
    resumed = Recorder()
    result = train(make_spec(other, tiny_model_dir, data, state_dir=middle), resumed)
    assert result.resumed_from_step == 4 and resumed.resumed == [4]
    assert_same_metrics(resumed.metrics, ref_hooks.metrics[4:])
    assert [(s, final) for s, _, final in resumed.checkpoints] == [(6, True)]
    assert_same_weights(adapter_weights(result.final_adapter_path), adapter_weights(ref.final_adapter_path))
    assert leftovers(middle) == []


def test_init_adapter_continues_an_earlier_job(
    tmp_path: Path, tiny_model_dir: Path, data, uninterrupted
) -> None:
    ref_hooks, _ = uninterrupted
    # Job A: rank 4, no dropout.
    job_a = train(make_spec(tmp_path / "a", tiny_model_dir, data, lora_rank=4, lora_dropout=0.0), Plain())
    a_weights = adapter_weights(job_a.final_adapter_path)

    # Job B from A's adapter; paused before its first step, its state holds A's weights as they were.
    state_dir = tmp_path / "b-state"
    spec_b = make_spec(
        tmp_path / "b", tiny_model_dir, data, init_adapter_path=job_a.final_adapter_path, state_dir=state_dir
    )
    paused = Recorder(stop=lambda hooks: True)
    with pytest.raises(TrainingStopped):
        train(spec_b, paused)
    assert paused.metrics == [] and paused.saved == [0]
    assert_same_weights(adapter_weights(state_dir / "adapter"), a_weights)
    # The LoRA settings are the adapter's (rank 4, no dropout), not the spec's (16, 0.1).
    config = json.loads((state_dir / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_dropout"]) == (4, 0.0)

    hooks = Recorder()
    job_b = train(spec_b, hooks)  # resumes from step 0
    assert job_b.resumed_from_step == 0 and hooks.resumed == [0]
    assert hooks.steps() == list(range(1, 7))
    # Already trained: B's first loss is below a fresh adapter's first loss on the same data.
    assert hooks.losses()[0] < ref_hooks.losses()[0]
    meta = json.loads((job_b.final_adapter_path / "tunehouse.json").read_text())
    assert meta["lora"]["rank"] == 4
    assert meta["init_adapter_path"] == str(job_a.final_adapter_path)
    assert json.loads((job_b.final_adapter_path / "adapter_config.json").read_text())["r"] == 4

    # Without a state, B starts from A's adapter too: the same first loss.
    fresh_b = Plain(stop=after_metrics(1))
    with pytest.raises(TrainingStopped):
        train(
            make_spec(tmp_path / "b2", tiny_model_dir, data, init_adapter_path=job_a.final_adapter_path),
            fresh_b,
        )
    assert fresh_b.losses() == pytest.approx(hooks.losses()[:1], rel=0, abs=1e-6)


def test_hooks_without_the_optional_methods_and_resume_false(
    tmp_path: Path, tiny_model_dir: Path, data
) -> None:
    state_dir = tmp_path / "state"
    spec = make_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir)
    with pytest.raises(TrainingStopped):
        train(spec, Plain(stop=after_metrics(1)))
    assert json.loads((state_dir / "state.json").read_text())["step"] == 1

    resumed = Plain(stop=after_metrics(1))  # resumed at 1; stops after step 2, saving it
    with pytest.raises(TrainingStopped):
        train(spec, resumed)
    assert resumed.steps() == [2]
    assert json.loads((state_dir / "state.json").read_text())["step"] == 2

    # resume=False: a fresh run that replaces the state as it goes.
    fresh = Recorder()
    result = train(make_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir, resume=False), fresh)
    assert result.resumed_from_step is None and fresh.resumed == []
    assert fresh.steps() == list(range(1, 7)) and fresh.saved == [3, 6]


def test_a_state_from_another_run_is_refused(tmp_path: Path, tiny_model_dir: Path, data) -> None:
    state_dir = tmp_path / "state"
    with pytest.raises(TrainingStopped):
        train(make_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir), Plain(stop=after_metrics(1)))
    other_hp = Hyperparameters(n_epochs=3, batch_size=4, learning_rate_multiplier=10)
    with pytest.raises(ValueError, match="different run.*hyperparameters"):
        train(make_spec(tmp_path, tiny_model_dir, data, state_dir=state_dir, hp=other_hp), Plain())


def test_publish_replaces_a_state_atomically_and_recovers_after_a_crash(tmp_path: Path, monkeypatch) -> None:
    def folder(name: str, step: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "state.json").write_text(json.dumps({"step": step}))
        return path

    def step_of(path: Path) -> int:
        return json.loads((path / "state.json").read_text())["step"]

    state_dir = tmp_path / "state"
    state.publish_dir(folder("state.tmp-1", 1), state_dir)  # first save: a plain rename
    assert step_of(state_dir) == 1 and leftovers(state_dir) == []

    new = folder("state.tmp-2", 2)
    state.publish_dir(new, state_dir)  # renameat2 exchange: the old state ends up at `new`
    assert step_of(state_dir) == 2 and step_of(new) == 1

    shutil.rmtree(new)
    monkeypatch.setattr(state, "exchange_paths", lambda a, b: False)  # no exchange: rename aside
    new = folder("state.tmp-3", 3)
    state.publish_dir(new, state_dir)
    assert step_of(state_dir) == 3 and step_of(new) == 2
    shutil.rmtree(new)
    assert leftovers(state_dir) == []

    # A crash between the two renames of the fallback: the old state is aside, the new one (and
    # a half-written tmp) beside it. Recovery puts the old state back and clears the rest.
    aside = tmp_path / "state.old-x"
    aside.mkdir()
    state_dir.rename(aside / "state")
    folder("state.tmp-4", 4)
    state.recover_state_dir(state_dir)
    assert step_of(state_dir) == 3 and leftovers(state_dir) == []
