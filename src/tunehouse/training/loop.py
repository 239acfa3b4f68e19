"""The one training loop every method shares: a recipe (recipes/) brings its data and its loss, the
loop does everything else. Reads top to bottom, like nanoGPT's train.py or a torchtune recipe:

    1. resolve    device, dtype, seeds
    2. load       model + tokenizer; a LoRA adapter on every attention/MLP projection
                  (fine_tuning_type "lora"), or every weight trains (fine_tuning_type "full")
    3. data       the recipe reads its training and validation items (recipe.load_data)
    4. prepare    what the recipe needs before the first step (DPO: the reference log-probs),
                  or what it saved in the state it continues from
    5. train      AdamW, warm-up + linear decay, gradient clipping; each step's items go through
                  the recipe's micro-steps (forward, loss, backward), the loop steps the optimizer
    6. checkpoint adapter (or model folder) + tokenizer + tunehouse.json at every epoch end

Resumable state: with `TrainSpec.state_dir` the full training state (weights, optimizer,
scheduler, step and data position, RNG, what the recipe adds) is saved atomically (training/
state.py) at every epoch end, periodically and before stopping; a later run with the same
state_dir continues from it, step for step as if never interrupted.

Stopping: `hooks.should_stop()` is polled before every step and between a step's micro-batches,
so a cancel or pause lands within one forward/backward. A stop inside a step discards that step's
gradients: the weights and optimizer have not moved since the last boundary, so the state saved is
that boundary's and a resumed run redoes the whole step.

Data parallel: when torch.distributed is initialised (the runner does it for a job trained by
several Ray Train workers), each worker takes its share of every step's items, gradients and the
step's sums are added up across workers before the optimizer step (what DistributedDataParallel
does; done by hand because the recipes call the decoder and the lm_head separately, which bypasses
DDP's forward and would leave its gradient hooks unarmed), and only rank 0 evaluates and writes
checkpoints and state. Every method gets it, because the loop is the only place that steps.

Why our own loop instead of TRL's trainers: the three things that make training fast on a CPU are
awkward to get from them: (a) computing the 49k-vocabulary logits only at the trained positions
instead of over every token (the lm_head + cross-entropy is the largest single cost for a small
model), (b) right-padded, length-sorted micro-batches that need no attention mask at all, and (c)
bf16 frozen weights with fp32 adapters. The loop is also the only way to poll `should_stop`
between micro-batches.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tunehouse.data.analysis import context_length_for
from tunehouse.hardware import resolve_device, resolve_dtype
from tunehouse.training import state as saved_state
from tunehouse.training.hparams import LORA_TARGET_MODULES, Hyperparameters, base_learning_rate

logger = logging.getLogger(__name__)
# Warm-up over the first 3% of steps (at least one), then linear decay to zero, as OpenAI-like.
WARMUP_FRACTION = 0.03
MAX_GRAD_NORM = 1.0
# The small validation batch (valid_loss) is measured on this many steps over the run at most,
# so validation costs a bounded share of the time whatever the number of steps.
MAX_VALID_POINTS = 100


# ----------------------------------------------------------------------------------------------
# The contract with the job runner
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainSpec:
    base_model_path: Path
    train_file: Path  # JSONL in the method's format, already validated
    valid_file: Path | None
    output_dir: Path  # everything is written here
    hyperparameters: Hyperparameters
    seed: int
    # Training context: longer examples are truncated from the end. None: the model's own context
    # (its config's max_position_embeddings), so only memory bounds it.
    max_length: int | None = None
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: LORA_TARGET_MODULES
    # "lora": train a LoRA adapter on frozen base weights. "full": train every weight (fp32 master
    # weights, bf16 autocast where fast); checkpoints are then whole model folders.
    fine_tuning_type: str = "lora"
    device: str = "auto"  # cuda if available, else cpu
    dtype: str = "auto"  # bf16 on CUDA with bf16, or CPUs with AMX / AVX512-BF16; else fp32
    # The full training state (adapter, optimizer, LR scheduler, step and data position, RNG, last
    # metrics) is kept in this folder, replaced atomically at every save: at each epoch end, every
    # `save_state_every_seconds` (checked after each optimizer step) and before stopping.
    state_dir: Path | None = None
    save_state_every_seconds: float | None = None  # None: only at epoch ends and on stop
    resume: bool = True  # continue from the state in state_dir if there is one
    # Start from this PEFT LoRA adapter folder (an earlier job's) instead of a fresh LoRA; its
    # adapter_config.json then decides rank, alpha, dropout and targets (the lora_* above are unused).
    # With fine_tuning_type "full" the adapter is merged into the base weights, which then all train.
    # (To continue a fully fine-tuned model, make its folder the base_model_path.)
    init_adapter_path: Path | None = None

    def __post_init__(self) -> None:
        if self.fine_tuning_type not in ("lora", "full"):
            raise ValueError(f"fine_tuning_type must be 'lora' or 'full', got {self.fine_tuning_type!r}")
        if self.max_length is None:
            self.max_length = context_length_for(self.base_model_path)

    @property
    def learning_rate(self) -> float:
        return base_learning_rate(self.fine_tuning_type) * self.hyperparameters.learning_rate_multiplier


class TrainHooks(Protocol):
    def on_start(self, *, total_steps: int) -> None: ...

    def on_metrics(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, *, step: int, path: Path, metrics: dict[str, float], is_final: bool) -> None: ...

    def should_stop(self) -> bool: ...

    # Optional: called only when the hooks object defines them (looked up with getattr).

    def on_resume(self, *, step: int) -> None:
        """After on_start, when the run continues from a state saved after `step` optimizer steps:
        on_metrics / on_checkpoint then come only for later steps."""

    def on_state_saved(self, *, step: int, path: Path) -> None:
        """After the state at `step` (optimizer steps done) was put in place at `path`."""

    def on_samples(self, *, step: int, samples: list[dict]) -> None:
        """After on_metrics, for a recipe that samples (RFT): a few of the step's prompts with
        their answers and rewards."""


class TrainingStopped(Exception):
    """Raised when hooks.should_stop() turned True; the last saved checkpoint stays on disk, and
    with a state_dir the state at the last optimizer-step boundary was saved first."""


@dataclass
class TrainResult:
    trained_tokens: int  # billable: sum of min(n_tokens, max_length) over examples, x n_epochs
    final_adapter_path: Path  # the last checkpoint: an adapter folder, or a model folder (full)
    steps: int
    resumed_from_step: int | None = None  # the step a saved state continued from; None: fresh


# ----------------------------------------------------------------------------------------------
# The contract with a recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class Model:
    """The model being trained, as a recipe's loss sees it."""

    model: Any  # a PeftModel (LoRA) or a plain transformers model (full)
    tokenizer: Any
    decoder: Any  # the transformer body: input ids -> hidden states
    lm_head: Any  # hidden states -> logits (a recipe applies it only where the loss needs logits)
    softcap: float | None  # Gemma 2 style final-logit soft-capping, when the model has it
    device: str
    autocast: AbstractContextManager
    pad_id: int


@dataclass
class Data:
    """What a recipe read: the items one step draws from (examples, pairs, prompts), the
    validation items, and the billable tokens of the whole run."""

    train: list
    valid: list
    trained_tokens: int
    # What a saved state must agree on to be continued, beyond what the loop checks itself.
    run_key: dict = field(default_factory=dict)


class Recipe(Protocol):
    """A method: its data, its loss and the metrics it reports. One instance per run."""

    # Extra fields in state.json and in each checkpoint's tunehouse.json (e.g. {"method": "dpo"}).
    state_info: dict
    checkpoint_info: dict
    n_sums: int  # how many sums each micro-step yields (the loss first)

    def load_data(self, spec: TrainSpec, tokenizer) -> Data: ...

    def prepare(self, m: Model, data: Data, *, saved: dict | None, should_stop) -> None:
        """Before the first step. `saved`: trainer.pt of the state this run continues from (the
        recipe finds what it added there through `state_extra`), None on a fresh start."""

    def state_extra(self) -> dict:
        """More tensors for trainer.pt (DPO: the reference log-probs)."""

    def normaliser(self, items: Sequence) -> float:
        """What a step's loss is a mean over (trained tokens, pairs, …), over the whole step."""

    def micro_steps(
        self, m: Model, items: Sequence, *, normaliser: float | None
    ) -> Iterator[tuple[list[float], int]]:
        """Forward `items` in micro-batches; with a normaliser, backward loss / normaliser after
        each. Yields, per micro-batch, its sums (loss first, then what `metrics` reads) and its real
        tokens; the loop may stop between two yields."""

    def metrics(self, sums: list[float], n: float) -> dict[str, float]:
        """A training step's `train_*` metrics from the sums of its micro-batches. (Evaluation
        reports the first two sums over n as the loss and the accuracy.)"""

    # Optional, looked up with hasattr (the reinforcement recipe has them):
    #   valid_schedule(total_steps, n_valid) -> (every how many steps, how many validation items)
    #   evaluate(m, items) -> {name: value}: validation measured the recipe's own way (reported
    #       as valid_<name>, and full_valid_<name> at epoch ends) instead of loss and accuracy
    #   step_samples() -> a few of the last step's items with what the model made of them,
    #       handed to hooks.on_samples


# ----------------------------------------------------------------------------------------------
# 1. resolve: seeds, the order of the data
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds CUDA; LoRA's A matrices are drawn from it


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training items in `epoch` (0-based), a function of the seed and the
    epoch only, so a resumed run finds it again: the draws of one Random(seed) that shuffles a
    fresh range(n) once per epoch."""
    rng = random.Random(seed)
    for _ in range(epoch + 1):
        order = list(range(n))
        rng.shuffle(order)
    return order


def lr_lambda(total_steps: int):
    """Multiplier of the peak rate after `step` optimizer steps: short linear warm-up, then linear
    decay that reaches zero only after the last step (so the last step still learns)."""
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


# ----------------------------------------------------------------------------------------------
# data parallel
# ----------------------------------------------------------------------------------------------


def distributed() -> tuple[int, int]:
    """(rank, number of workers); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_weights(params) -> None:
    for p in params:
        dist.broadcast(p.data, src=0)


def sum_across_workers(params, sums: list[float]) -> list[float]:
    """Sum every parameter's gradient, and the step's sums, across workers (a worker whose share
    of a small step was empty contributes zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    totals = torch.tensor(sums, dtype=torch.float64, device=params[0].device)
    dist.all_reduce(totals)
    return totals.tolist()


def rank0_says(flag: bool, device) -> bool:
    """Rank 0's flag, on every worker: they must all stop at the same step."""
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------
# 2. the model to train
# ----------------------------------------------------------------------------------------------


def lora_config(spec: TrainSpec):
    """A fresh LoRA adapter on every attention and MLP projection, shaped by the spec."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.lora_target_modules or LORA_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )


def load_trainable_model(spec: TrainSpec, *, device: str, dtype, state_weights: Path | None):
    """The model to train and its trainable (name, parameter) pairs.

    LoRA: frozen base weights in the compute dtype (bf16 halves memory and, with AMX/AVX512-BF16
    or a GPU, runs matmuls natively); PEFT keeps the adapter in fp32 (autocast_adapter_dtype) so
    AdamW's small updates are not rounded away. The adapter is the saved state's, else
    init_adapter_path's, else a fresh one.

    Full: every weight in fp32 (master weights: a bf16 weight would round most 2e-5 updates
    away), computed in bf16 under autocast where that is fast. The weights are the saved
    state's, else base_model_path's with init_adapter_path merged in (continued training of a LoRA
    model), in fp32 so the merge rounds once.
    """
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if spec.fine_tuning_type == "full":
        source = state_weights if state_weights is not None else spec.base_model_path
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        if state_weights is None and spec.init_adapter_path is not None:
            model = PeftModel.from_pretrained(model, Path(spec.init_adapter_path)).merge_and_unload()
            logger.info("LoRA adapter %s merged into the weights to train", spec.init_adapter_path)
        model.to(device).requires_grad_(True)
        return model, list(model.named_parameters())

    model = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=dtype).to(device)
    model.config.use_cache = False
    # A saved state carries its own adapter (which, for a continued job, began as init_adapter_path).
    start_adapter = state_weights if state_weights is not None else spec.init_adapter_path
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, Path(start_adapter), is_trainable=True)
        if model.peft_config["default"].peft_type != "LORA":
            raise ValueError(f"{start_adapter} is not a LoRA adapter")
        logger.info("LoRA adapter loaded from %s", start_adapter)
    else:
        model = get_peft_model(model, lora_config(spec))
    return model, [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def unwrap(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def check_target_modules(model_path: Path, names: list[str]) -> list[str]:
    """The names in `names` that match no module of the model at `model_path` (PEFT matches a
    name against the end of each module's dotted path). Builds the model on the meta device: no
    weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [t for t in names if not any(n == t or n.endswith(f".{t}") for n in linear)]


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def run(spec: TrainSpec, recipe: Recipe, hooks: TrainHooks) -> TrainResult:
    from transformers import AutoTokenizer

    hp = spec.hyperparameters
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(spec.state_dir) if spec.state_dir is not None else None
    rank, world = distributed()  # (0, 1) unless several data-parallel workers train this run
    saved = None  # the state.json of the state this run continues from
    if state_dir is not None:
        if rank == 0:
            saved_state.recover_state_dir(state_dir)
        if world > 1:
            dist.barrier()  # the others read the state once rank 0 has tidied it
        saved = saved_state.read_state_info(state_dir) if spec.resume else None

    # -- 1. resolve ---------------------------------------------------------------------------
    device = str(resolve_device(spec.device))
    dtype = resolve_dtype(spec.dtype, device, allow_fp16=False)
    seed_everything(spec.seed)
    logger.info("%s on %s in %s, seed %d, %s", type(recipe).__name__, device, dtype, spec.seed, hp)

    # -- 2. load the model: LoRA on the base, or every weight -----------------------------------
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    model, named_params = load_trainable_model(
        spec,
        device=device,
        dtype=dtype,
        state_weights=saved_state.weights_dir(state_dir, spec.fine_tuning_type, check=True)
        if saved
        else None,
    )
    base = unwrap(model)
    params = [p for _, p in named_params]
    logger.info("%s: %d trainable parameters", spec.fine_tuning_type, sum(p.numel() for p in params))
    if world > 1:
        broadcast_weights(params)  # the same seed gives the same weights; this makes it certain
        logger.info("data parallel: worker %d of %d", rank, world)
    m = Model(
        model=model,
        tokenizer=tokenizer,
        decoder=base.get_decoder(),
        lm_head=base.get_output_embeddings(),
        softcap=getattr(base.config, "final_logit_softcapping", None),
        device=device,
        # Autocast runs the fp32 adapter (or master-weight) matmuls in bf16 too; the recipes
        # compute their losses in fp32.
        autocast=(
            torch.autocast(device_type=device.split(":")[0], dtype=dtype)
            if dtype != torch.float32
            else nullcontext()
        ),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )

    # -- 3. data ------------------------------------------------------------------------------
    data = recipe.load_data(spec, tokenizer)
    train_set, valid_set = data.train, data.valid
    steps_per_epoch = math.ceil(len(train_set) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    valid_every = max(1, math.ceil(total_steps / MAX_VALID_POINTS))
    valid_batch = min(hp.batch_size, len(valid_set))
    if hasattr(recipe, "valid_schedule"):  # a recipe whose validation costs more (RFT samples)
        valid_every, valid_batch = recipe.valid_schedule(total_steps, len(valid_set))
    logger.info(
        "%d training items (%d valid), %d epochs x %d steps, %d billable tokens",
        len(train_set), len(valid_set), hp.n_epochs, steps_per_epoch, data.trained_tokens,
    )  # fmt: skip

    # -- 4. prepare: what the recipe needs first, or what the saved state holds ---------------
    # What a saved state must agree on to be continued: the same steps over the same data.
    run_key = {
        **data.run_key,
        "train_sha256": saved_state.file_sha256(Path(spec.train_file)),
        "seed": spec.seed,
        "max_length": spec.max_length,
        "hyperparameters": hp.to_dict(),
        "total_steps": total_steps,
        "trainable_parameters": [name for name, _ in named_params],
    }
    trainer_state = None
    if saved:
        saved_state.check_state_matches(saved, run_key, state_dir)
        if saved["base_model_path"] != str(Path(spec.base_model_path).resolve()):
            logger.warning("the state in %s was saved with base %s", state_dir, saved["base_model_path"])
        trainer_state = torch.load(
            state_dir / saved_state.STATE_TRAINER, map_location="cpu", weights_only=True
        )
    recipe.prepare(m, data, saved=trainer_state, should_stop=hooks.should_stop)

    def evaluate(items: list, prefix: str) -> dict[str, float]:
        """`{prefix}loss` and `{prefix}mean_token_accuracy` over `items`, as the recipe defines
        them, or what the recipe's own `evaluate` measures (RFT: the reward)."""
        model.eval()
        try:
            if hasattr(recipe, "evaluate"):
                with torch.no_grad():
                    return {f"{prefix}{k}": v for k, v in recipe.evaluate(m, items).items()}
            sums = [0.0] * recipe.n_sums
            with torch.no_grad():
                for mb_sums, _ in recipe.micro_steps(m, items, normaliser=None):
                    sums = [a + b for a, b in zip(sums, mb_sums, strict=True)]
        finally:
            model.train()
        n = max(1, recipe.normaliser(items))
        return {f"{prefix}loss": sums[0] / n, f"{prefix}mean_token_accuracy": sums[1] / n}

    # -- 5. train -----------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps))
    step, epoch, batch_index, final_path = 0, 0, 0, output_dir
    metrics: dict[str, float] = {}
    full_valid: dict[str, float] = {}
    if saved:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        saved_state.restore_rng(trainer_state["rng"])  # last: loading the model above drew from the RNG
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        metrics, full_valid = saved["metrics"], saved["full_valid_metrics"]
        if saved["last_checkpoint"]:
            final_path = Path(saved["last_checkpoint"])
        logger.info("resuming from the state at step %d/%d in %s", step, total_steps, state_dir)
    resumed_from = step if saved else None
    last_saved_step = step if saved else None
    last_save_time = time.monotonic()

    def save_state(boundary_rng: dict | None = None) -> None:
        """Save the state after `step` optimizer steps. `boundary_rng`: the RNG as it was at that
        step boundary, when a partial step has drawn from it since."""
        nonlocal last_saved_step, last_save_time
        if rank != 0:  # rank 0 saves for all: every worker holds the same weights and optimizer
            return
        info = {
            "version": saved_state.STATE_VERSION,
            **recipe.state_info,
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,  # the epoch the next step belongs to (n_epochs when all are done)
            "batch_in_epoch": batch_index,  # index of the next batch in epoch_order(.., epoch)
            "steps_per_epoch": steps_per_epoch,
            "metrics": metrics,  # of the last step
            "full_valid_metrics": full_valid,  # of the last epoch end, if there is a valid_file
            "last_checkpoint": str(final_path) if final_path != output_dir else None,
            "init_adapter_path": str(spec.init_adapter_path) if spec.init_adapter_path else None,
            "base_model_path": str(Path(spec.base_model_path).resolve()),
            "saved_at": time.time(),
            "run": run_key,
        }
        saved_state.write_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
            rng=boundary_rng if boundary_rng is not None else saved_state.capture_rng(), info=info,
            weights=saved_state.weights_dir(state_dir, spec.fine_tuning_type).name,
            extra=recipe.state_extra(),
        )  # fmt: skip
        last_saved_step, last_save_time = step, time.monotonic()
        logger.info("training state at step %d saved to %s", step, state_dir)
        on_state_saved = getattr(hooks, "on_state_saved", None)
        if on_state_saved is not None:
            on_state_saved(step=step, path=state_dir)

    def stop_if_asked(boundary_rng: dict | None, partial: bool) -> None:
        """Polled between steps and between a step's micro-batches (see the module docstring)."""
        stop = hooks.should_stop()
        if world > 1:
            stop = rank0_says(stop, params[0].device)
        if not stop:
            return
        logger.info("stop requested at step %d%s", step, " (partial step discarded)" if partial else "")
        if state_dir is not None:
            optimizer.zero_grad(set_to_none=True)
            if last_saved_step != step:
                save_state(boundary_rng)
        raise TrainingStopped(f"stopped at step {step} of {total_steps}")

    hooks.on_start(total_steps=total_steps)
    if resumed_from is not None:
        on_resume = getattr(hooks, "on_resume", None)
        if on_resume is not None:
            on_resume(step=resumed_from)
    model.train()
    real_tokens, started = 0, time.perf_counter()
    while epoch < hp.n_epochs:
        order = epoch_order(len(train_set), spec.seed, epoch)
        while batch_index < steps_per_epoch:
            # The RNG at this step boundary, for a state saved on a stop inside the step.
            boundary_rng = saved_state.capture_rng() if state_dir is not None else None
            stop_if_asked(boundary_rng, partial=False)
            first = batch_index * hp.batch_size
            batch = [train_set[i] for i in order[first : first + hp.batch_size]]
            # The loss is a mean over the whole step (its trained tokens, its pairs), not over each
            # micro-batch, so the step is the same however it is split, and across workers.
            n = max(1, recipe.normaliser(batch))
            sums = [0.0] * recipe.n_sums
            # Data parallel: this worker's share of the step (all of it when training alone).
            for mb_sums, n_real in recipe.micro_steps(m, batch[rank::world], normaliser=n):
                sums = [a + b for a, b in zip(sums, mb_sums, strict=True)]
                real_tokens += n_real
                # Between micro-batches too: a big step can take a while. (Not with several
                # workers: their shares may have different numbers of micro-batches, and they must
                # all stop at the same point.)
                if world == 1:
                    stop_if_asked(boundary_rng, partial=True)
            if world > 1:
                sums = sum_across_workers(params, sums)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, batch_index = step + 1, batch_index + 1

            metrics = recipe.metrics(sums, n)
            if valid_set and rank == 0 and (step % valid_every == 0 or step == total_steps):
                # A small rotating slice of the validation set: cheap, and over the run it covers all.
                k = (step // valid_every - 1) * valid_batch
                sample = [valid_set[(k + i) % len(valid_set)] for i in range(valid_batch)]
                metrics.update(evaluate(sample, "valid_"))
            end_of_epoch = batch_index == steps_per_epoch
            if end_of_epoch and valid_set and rank == 0:
                metrics.update(evaluate(valid_set, "full_valid_"))
                full_valid = {k: v for k, v in metrics.items() if k.startswith("full_valid_")}
            logger.debug("step %d/%d %s", step, total_steps, metrics)
            hooks.on_metrics(step=step, total_steps=total_steps, metrics=metrics)
            on_samples = getattr(hooks, "on_samples", None)
            if on_samples is not None and hasattr(recipe, "step_samples") and rank == 0:
                on_samples(step=step, samples=recipe.step_samples())
            # Periodic save (after on_metrics, so a resumed run never skips a reported step). The
            # last step of an epoch waits for the epoch-end save, after its checkpoint.
            every = spec.save_state_every_seconds
            if (
                state_dir is not None
                and every is not None
                and not end_of_epoch
                and time.monotonic() - last_save_time >= every
            ):
                save_state()

        # -- 6. checkpoint at each epoch end --------------------------------------------------
        if rank == 0:
            final_path = save_checkpoint(
                model, tokenizer, spec, output_dir, step=step, metrics=metrics, extra=recipe.checkpoint_info
            )
        is_final = epoch == hp.n_epochs - 1
        elapsed = time.perf_counter() - started
        logger.info(
            "epoch %d/%d done at step %d: %s (%.0f real tokens/s)",
            epoch + 1, hp.n_epochs, step, metrics, real_tokens / max(elapsed, 1e-9),
        )  # fmt: skip
        hooks.on_checkpoint(step=step, path=final_path, metrics=metrics, is_final=is_final)
        epoch, batch_index = epoch + 1, 0
        if state_dir is not None:  # after the checkpoint: a resumed run never redoes it
            save_state()

    return TrainResult(
        trained_tokens=data.trained_tokens,
        final_adapter_path=final_path,
        steps=step,
        resumed_from_step=resumed_from,
    )


def save_checkpoint(
    model,
    tokenizer,
    spec: TrainSpec,
    output_dir: Path,
    *,
    step: int,
    metrics: dict,
    extra: dict | None = None,
) -> Path:
    """A self-describing folder: the PEFT adapter (adapter_config.json names the base path) or,
    for full fine-tuning, the whole model (config.json, generation_config.json, fp32 safetensors:
    a plain Hugging Face model folder); the tokenizer with its chat template; and tunehouse.json
    with the base path, step, metrics (and what the recipe adds: `extra`)."""
    path = output_dir / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    meta = {
        "base_model_path": str(Path(spec.base_model_path).resolve()),
        "fine_tuning_type": spec.fine_tuning_type,
        "step": step,
        "metrics": metrics,
        "hyperparameters": spec.hyperparameters.to_dict(),
        "learning_rate": spec.learning_rate,
        "seed": spec.seed,
        "max_length": spec.max_length,
    }
    if spec.fine_tuning_type == "lora":
        # The adapter's own LoRA settings: those of init_adapter_path when training continued from one.
        config = getattr(model, "peft_config", {}).get("default")
        meta["lora"] = (
            {
                "rank": config.r,
                "alpha": config.lora_alpha,
                "dropout": config.lora_dropout,
                "target_modules": sorted(config.target_modules),
            }
            if config is not None
            else {"rank": spec.lora_rank, "alpha": spec.lora_alpha, "dropout": spec.lora_dropout}
        )
    if spec.init_adapter_path:
        meta["init_adapter_path"] = str(spec.init_adapter_path)
    meta.update(extra or {})
    (path / "tunehouse.json").write_text(json.dumps(meta, indent=2))
    return path
