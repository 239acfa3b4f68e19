"""Data parallelism lives in the shared loop, so every method has it: two processes (gloo, CPU)
that each take half of every step train the same steps with the same loss curve as one process
(fp32, where only the order of the gradient sums differs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.training.helpers import Recorder, write_jsonl
from tests.training.test_dpo import make_pairs
from tests.training.test_supervised import make_examples
from tunehouse.training.hparams import DpoHyperparameters, Hyperparameters
from tunehouse.training.loop import TrainSpec
from tunehouse.training.recipes import dpo, supervised

WORLD = 2


def spec_for(method: str, model_dir: Path, data_dir: Path, out: Path) -> TrainSpec:
    common = dict(
        base_model_path=model_dir,
        valid_file=None,
        output_dir=out,
        seed=5,
        dtype="fp32",
        device="cpu",
    )
    if method == "dpo":
        hp = DpoHyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=20, beta=0.5)
        return dpo.DpoSpec(train_file=data_dir / "dpo.jsonl", hyperparameters=hp, beta=0.5, **common)
    hp = Hyperparameters(n_epochs=1, batch_size=4, learning_rate_multiplier=10)
    return TrainSpec(train_file=data_dir / "sft.jsonl", hyperparameters=hp, **common)


def run(method: str, model_dir: Path, data_dir: Path, out: Path) -> list[float]:
    hooks = Recorder()
    recipe = dpo if method == "dpo" else supervised
    recipe.train(spec_for(method, model_dir, data_dir, out), hooks)
    return hooks.losses()


def rank_main(rank: int, method: str, model_dir: str, data_dir: str, out: str, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        losses = run(method, Path(model_dir), Path(data_dir), Path(out) / f"rank{rank}")
        (Path(out) / f"losses{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["supervised", "dpo"])
def test_two_processes_train_as_one_does(method: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "sft.jsonl", make_examples())
    write_jsonl(tmp_path / "dpo.jsonl", make_pairs())
    alone = run(method, tiny_model_dir, tmp_path, tmp_path / "alone")

    out = tmp_path / "parallel"
    out.mkdir()
    args = (method, str(tiny_model_dir), str(tmp_path), str(out), str(tmp_path / "rendezvous"))
    mp.spawn(rank_main, args=args, nprocs=WORLD, join=True)
    together = [json.loads((out / f"losses{rank}.json").read_text()) for rank in range(WORLD)]

    assert len(alone) == 3  # 12 lines (10 pairs) in steps of 4
    assert together[0] == pytest.approx(alone, rel=1e-4)
    assert together[1] == together[0]  # every rank reports the summed step
    assert (out / "rank0" / "checkpoints").is_dir() and not (out / "rank1" / "checkpoints").exists()
