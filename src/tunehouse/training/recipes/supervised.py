"""Supervised fine-tuning (SFT) on OpenAI chat-format JSONL: a LoRA adapter, or every weight.

Reads top to bottom, like nanoGPT's train.py or a torchtune recipe:

    1. resolve    device, dtype, seeds
    2. load base  model + tokenizer, wrap every attention/MLP projection in a LoRA adapter
                  (fine_tuning_type "lora"), or train all weights (fine_tuning_type "full")
    3. build data chat template -> token ids + mask of assistant tokens (tunehouse.data.chat)
    4. train      AdamW, warm-up + linear decay, loss on assistant tokens only
    5. checkpoint adapter + tokenizer + tunehouse.json at the end of every epoch (full: the whole
                  model as a Hugging Face folder, config + safetensors + tokenizer)

With `TrainSpec.state_dir` the full training state (adapter, optimizer, scheduler, step, data
position, RNG) is also saved, atomically, at every epoch end, periodically, and before stopping;
a later `train(spec)` with the same state_dir continues from it, step for step as if never
interrupted (see "resumable state" below). `init_adapter_path` starts from an earlier adapter.

Data parallel: when torch.distributed is initialised (the runner does it for a job trained by
several Ray Train workers), each worker takes its share of every step's examples, the gradients
are summed across workers before the optimizer step, and only rank 0 evaluates and writes
checkpoints and state (see "data parallel" below).

Why our own loop instead of TRL's SFTTrainer: the three things that make training fast on a CPU
are awkward to get from the Trainer: (a) computing the 49k-vocabulary logits only at the trained
positions instead of over every token (the lm_head + cross-entropy is the largest single cost for
a small model), (b) right-padded, length-sorted micro-batches that need no attention mask at all,
and (c) bf16 frozen weights with fp32 adapters. The loop is also the only way to poll
`should_stop` between micro-batches, so cancellation lands within one forward/backward.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tunehouse.hardware import cpu_has_fast_bf16
from tunehouse.training.hparams import LORA_TARGET_MODULES, Hyperparameters, base_learning_rate

logger = logging.getLogger(__name__)
# Upper bound on padded tokens (rows x longest row) in one forward/backward: bounds activation
# memory (~1 MB per token for the 135M default in bf16) independently of `batch_size`.
MICRO_BATCH_TOKENS = 4096
# The fixed cost of one more forward/backward (Python, kernel launches, smaller matmuls), counted
# in padded tokens: splitting a step in two must save at least this much padding to be worth it.
MICRO_BATCH_OVERHEAD = 128
# Warm-up over the first 3% of steps (at least one), then linear decay to zero, as OpenAI-like.
WARMUP_FRACTION = 0.03
MAX_GRAD_NORM = 1.0
# The small validation batch (valid_loss) is measured on this many steps over the run at most,
# so validation costs a bounded share of the time whatever the number of steps.
MAX_VALID_POINTS = 100
IGNORE = -100  # label value of untrained positions


# ----------------------------------------------------------------------------------------------
# The contract with the job runner
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainSpec:
    base_model_path: Path
    train_file: Path  # OpenAI chat JSONL, already validated
    valid_file: Path | None
    output_dir: Path  # everything is written here
    hyperparameters: Hyperparameters
    seed: int
    max_length: int = 2048  # training context; longer examples are truncated from the end
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
# 1. resolve: device, dtype
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    # No fp16: it would need loss scaling, and every GPU without bf16 is better off in fp32 here.
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype != "auto":
        if dtype not in names:
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
        return names[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device == "cpu" and cpu_has_fast_bf16() else torch.float32


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds CUDA; LoRA's A matrices are drawn from it


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the training examples in `epoch` (0-based), a function of the seed and the
    epoch only, so a resumed run finds it again: the draws of one Random(seed) that shuffles a
    fresh range(n) once per epoch."""
    rng = random.Random(seed)
    for _ in range(epoch + 1):
        order = list(range(n))
        rng.shuffle(order)
    return order


# ----------------------------------------------------------------------------------------------
# data parallel
#
# What DistributedDataParallel does, done by hand: our loss calls the decoder and the lm_head
# separately (trained_token_loss), which bypasses DDP's forward, so its gradient hooks would never
# be armed. Every worker starts from the same weights (broadcast from rank 0), computes the loss of
# its share of the step's examples normalised by the trained tokens of the whole step, and the
# gradients are summed across workers: the step is then exactly the single-worker step.
# ----------------------------------------------------------------------------------------------


def distributed() -> tuple[int, int]:
    """(rank, number of workers); (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_weights(params) -> None:
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def sum_gradients(params, loss_sum: float, correct: int) -> tuple[float, int]:
    """Sum every parameter's gradient, and the step's loss and correct count, across workers (a
    worker whose share of a small step was empty contributes zeros)."""
    import torch
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    totals = torch.tensor([loss_sum, float(correct)], dtype=torch.float64, device=params[0].device)
    dist.all_reduce(totals)
    return totals[0].item(), int(totals[1].item())


def rank0_says(flag: bool, device) -> bool:
    """Rank 0's flag, on every worker: they must all stop at the same step."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ----------------------------------------------------------------------------------------------
# 3. data: chat lines -> (inputs, labels) with loss only on assistant tokens
# ----------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One chat line, ready to train on. `inputs[t]` predicts `labels[t]` (= the next token, or
    IGNORE where that token is not trained)."""

    inputs: list[int]
    labels: list[int]
    billable_tokens: int  # min(n_tokens, max_length): what OpenAI bills per epoch
    n_trained: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_trained = sum(label != IGNORE for label in self.labels)


def read_jsonl(path: Path) -> list[dict]:
    # The validator's reader: it skips what validation only warned about (a BOM, blank lines).
    from tunehouse.data.validation import iter_examples

    return [example for _line, example in iter_examples(path)]


def build_example(tokenizer, line: dict, max_length: int) -> Example:
    from tunehouse.data.chat import tokenize_chat

    tok = tokenize_chat(tokenizer, line, max_length=max_length)
    ids, trained = tok.input_ids, tok.trained
    # Shift by one: position t sees tokens 0..t and predicts token t+1.
    inputs = ids[:-1]
    labels = [nxt if is_trained else IGNORE for nxt, is_trained in zip(ids[1:], trained[1:], strict=True)]
    # Tokens after the last trained one cannot change the loss (attention is causal): drop them.
    # This trims the closing "<|im_end|>\n" and any trailing user turn for free.
    last = max((t for t, label in enumerate(labels) if label != IGNORE), default=-1)
    return Example(inputs=inputs[: last + 1], labels=labels[: last + 1], billable_tokens=len(ids))


def split_by_length(lengths: list[int]) -> list[int]:
    """Where to cut a list of lengths sorted longest first into micro-batches (end indices).

    Exact dynamic programme over contiguous runs: minimise padded tokens (rows x longest row) plus
    MICRO_BATCH_OVERHEAD per micro-batch, with at most MICRO_BATCH_TOKENS padded tokens in each.
    For a batch of 8 lines of 60..330 tokens this takes padding from ~45% (one block) to ~10%.
    """
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[i]: cheapest split of the first i
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i - 1, -1, -1):  # last micro-batch = lengths[j:i], as wide as lengths[j]
            padded = (i - j) * lengths[j]
            if padded > MICRO_BATCH_TOKENS and i - j > 1:
                break  # only gets wider as j moves left
            cost = best[j] + padded + MICRO_BATCH_OVERHEAD
            if cost < best[i]:
                best[i], cut[i] = cost, j
    ends, i = [], n
    while i:
        ends.append(i)
        i = cut[i]
    return ends[::-1]


def micro_batches(examples: list[Example], pad_id: int) -> Iterator[tuple[object, object, int]]:
    """One optimizer step's examples as padded tensors, little padding, bounded memory.

    Examples are sorted by length and cut into runs of similar length (split_by_length). Padding
    goes on the right, where the causal mask already stops every real token from seeing it, so no
    attention mask is needed and SDPA takes its fast `is_causal` path; padded labels are IGNORE so
    they carry no loss. Yields (inputs [B, L], labels [B, L], n_real_tokens).
    """
    import torch

    todo = sorted((ex for ex in examples if ex.n_trained), key=lambda ex: len(ex.inputs), reverse=True)
    start = 0
    for end in split_by_length([len(ex.inputs) for ex in todo]):
        chunk, start = todo[start:end], end
        longest = len(chunk[0].inputs)
        inputs = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), longest), IGNORE, dtype=torch.long)
        for row, ex in enumerate(chunk):
            inputs[row, : len(ex.inputs)] = torch.tensor(ex.inputs)
            labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
        yield inputs, labels, sum(len(ex.inputs) for ex in chunk)


# ----------------------------------------------------------------------------------------------
# 4. the loss, computed only where it counts
# ----------------------------------------------------------------------------------------------


def trained_token_loss(decoder, lm_head, inputs, labels, softcap: float | None = None):
    """Sum of cross-entropy and count of correct argmax predictions over the trained positions.

    The decoder gives hidden states for every position, but only the trained ones go through the
    lm_head: [n_trained, vocab] logits instead of [B, L, vocab]. For SmolLM2 (vocab 49,152,
    hidden 576) the full projection alone would cost as much as ~10 decoder layers.
    """
    import torch.nn.functional as F

    hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state  # [B, L, d]
    trained = labels != IGNORE  # [B, L]
    logits = lm_head(hidden[trained]).float()  # [N, V], fp32 for a stable softmax
    if softcap:  # Gemma 2 style final-logit soft-capping
        logits = softcap * (logits / softcap).tanh()
    targets = labels[trained]  # [N]
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return loss_sum, correct


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
# the recipe
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
    import torch
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


def state_weights_dir(spec: TrainSpec, state_dir: Path, *, check: bool = False) -> Path:
    """Where a state keeps its weights: adapter/ (LoRA) or model/ (full). With `check`, refuse a
    state saved with the other kind, before trying to load it."""
    path = state_dir / (STATE_MODEL if spec.fine_tuning_type == "full" else STATE_ADAPTER)
    if check and not path.is_dir():
        raise ValueError(
            f"the training state in {state_dir} was saved by a different run (fine_tuning_type "
            "differs); remove it or set resume=False to start over"
        )
    return path


def check_target_modules(model_path: Path, names: list[str]) -> list[str]:
    """The names in `names` that match no module of the model at `model_path` (PEFT matches a
    name against the end of each module's dotted path). Builds the model on the meta device: no
    weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [t for t in names if not any(n == t or n.endswith(f".{t}") for n in linear)]


def train(spec: TrainSpec, hooks: TrainHooks) -> TrainResult:
    import torch
    from transformers import AutoTokenizer

    hp = spec.hyperparameters
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(spec.state_dir) if spec.state_dir is not None else None
    rank, world = distributed()  # (0, 1) unless several data-parallel workers train this run
    saved = None  # the state.json of the state this run continues from
    if state_dir is not None:
        if rank == 0:
            recover_state_dir(state_dir)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the others read the state once rank 0 has tidied it
        saved = read_state_info(state_dir) if spec.resume else None

    # -- 1. resolve ---------------------------------------------------------------------------
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    seed_everything(spec.seed)
    logger.info("training on %s in %s, seed %d, %s", device, dtype, spec.seed, hp)

    # -- 2. load base, add LoRA (or train it all) ----------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    model, named_params = load_trainable_model(
        spec,
        device=device,
        dtype=dtype,
        state_weights=state_weights_dir(spec, state_dir, check=True) if saved else None,
    )
    base = unwrap(model)
    decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    params = [p for _, p in named_params]
    logger.info("%s: %d trainable parameters", spec.fine_tuning_type, sum(p.numel() for p in params))
    if world > 1:
        broadcast_weights(params)  # the same seed gives the same weights; this makes it certain
        logger.info("data parallel: worker %d of %d", rank, world)
    # Autocast runs the fp32 adapter (or master-weight) matmuls in bf16 too; the loss itself is
    # computed in fp32 (see trained_token_loss).
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=dtype)
        if dtype != torch.float32
        else nullcontext()
    )

    # -- 3. data ------------------------------------------------------------------------------
    train_set = [build_example(tokenizer, line, spec.max_length) for line in read_jsonl(spec.train_file)]
    valid_set = (
        [build_example(tokenizer, line, spec.max_length) for line in read_jsonl(spec.valid_file)]
        if spec.valid_file
        else []
    )
    valid_set = [ex for ex in valid_set if ex.n_trained]
    if not train_set:
        raise ValueError("the training file has no examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps_per_epoch = math.ceil(len(train_set) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    trained_tokens = sum(ex.billable_tokens for ex in train_set) * hp.n_epochs
    valid_every = max(1, math.ceil(total_steps / MAX_VALID_POINTS))
    valid_batch = min(hp.batch_size, len(valid_set))
    logger.info(
        "%d training examples (%d valid), %d epochs x %d steps, %d billable tokens",
        len(train_set), len(valid_set), hp.n_epochs, steps_per_epoch, trained_tokens,
    )  # fmt: skip

    @torch.no_grad()
    def evaluate(examples: list[Example]) -> tuple[float, float]:
        """(mean loss, mean token accuracy) over the trained tokens of `examples`."""
        model.eval()
        loss_sum, correct, n = 0.0, 0, sum(ex.n_trained for ex in examples)
        for inputs, labels, _ in micro_batches(examples, pad_id):
            with autocast:
                ls, c = trained_token_loss(decoder, lm_head, inputs.to(device), labels.to(device), softcap)
            loss_sum, correct = loss_sum + ls.item(), correct + c.item()
        model.train()
        return loss_sum / max(1, n), correct / max(1, n)

    # -- 4. train -----------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps))
    # What a saved state must agree on to be continued: the same steps over the same data.
    run_key = {
        **({"fine_tuning_type": "full"} if spec.fine_tuning_type == "full" else {}),
        "train_sha256": file_sha256(Path(spec.train_file)),
        "n_train_examples": len(train_set),
        "seed": spec.seed,
        "max_length": spec.max_length,
        "hyperparameters": hp.to_dict(),
        "total_steps": total_steps,
        "trainable_parameters": [name for name, _ in named_params],
    }
    step, epoch, batch_index, final_path = 0, 0, 0, output_dir
    metrics: dict[str, float] = {}
    full_valid: dict[str, float] = {}
    if saved:
        check_state_matches(saved, run_key, state_dir)
        if saved["base_model_path"] != str(Path(spec.base_model_path).resolve()):
            logger.warning("the state in %s was saved with base %s", state_dir, saved["base_model_path"])
        trainer_state = torch.load(state_dir / STATE_TRAINER, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        restore_rng(trainer_state["rng"])  # last: loading the model above drew from the RNG
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
            "version": STATE_VERSION,
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
        rng = boundary_rng if boundary_rng is not None else capture_rng()
        write_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, info=info,
            weights=state_weights_dir(spec, state_dir).name,
        )  # fmt: skip
        last_saved_step, last_save_time = step, time.monotonic()
        logger.info("training state at step %d saved to %s", step, state_dir)
        on_state_saved = getattr(hooks, "on_state_saved", None)
        if on_state_saved is not None:
            on_state_saved(step=step, path=state_dir)

    def stop_if_asked(boundary_rng: dict | None, partial: bool) -> None:
        """Polled between steps and between a step's micro-batches. A stop inside a step
        (`partial`) discards that step's gradients: the weights and optimizer have not moved since
        the last boundary, so the state saved is that boundary's and a resumed run redoes the
        whole step."""
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
            boundary_rng = capture_rng() if state_dir is not None else None
            stop_if_asked(boundary_rng, partial=False)
            first = batch_index * hp.batch_size
            batch = [train_set[i] for i in order[first : first + hp.batch_size]]
            # Normalise by the trained tokens of the whole step, not of each micro-batch, so the
            # loss is the mean over trained tokens however the step is split.
            n_trained = max(1, sum(ex.n_trained for ex in batch))
            loss_sum, correct = 0.0, 0
            # Data parallel: this worker's share of the step (all of it when training alone).
            for inputs, labels, n_real in micro_batches(batch[rank::world], pad_id):
                with autocast:
                    ls, c = trained_token_loss(
                        decoder, lm_head, inputs.to(device), labels.to(device), softcap
                    )
                (ls / n_trained).backward()
                loss_sum, correct, real_tokens = (
                    loss_sum + ls.item(),
                    correct + c.item(),
                    real_tokens + n_real,
                )
                # Between micro-batches too: a big step can take a while. (Not with several
                # workers: their shares may have different numbers of micro-batches, and they must
                # all stop at the same point.)
                if world == 1:
                    stop_if_asked(boundary_rng, partial=True)
            if world > 1:
                loss_sum, correct = sum_gradients(params, loss_sum, correct)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, batch_index = step + 1, batch_index + 1

            metrics = {"train_loss": loss_sum / n_trained, "train_mean_token_accuracy": correct / n_trained}
            if valid_set and rank == 0 and (step % valid_every == 0 or step == total_steps):
                # A small rotating slice of the validation set: cheap, and over the run it covers all.
                k = (step // valid_every - 1) * valid_batch
                sample = [valid_set[(k + i) % len(valid_set)] for i in range(valid_batch)]
                metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = evaluate(sample)
            end_of_epoch = batch_index == steps_per_epoch
            if end_of_epoch and valid_set and rank == 0:
                metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = evaluate(valid_set)
                full_valid = {k: v for k, v in metrics.items() if k.startswith("full_valid_")}
            logger.debug("step %d/%d %s", step, total_steps, metrics)
            hooks.on_metrics(step=step, total_steps=total_steps, metrics=metrics)
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

        # -- 5. checkpoint at each epoch end --------------------------------------------------
        if rank == 0:
            final_path = save_checkpoint(model, tokenizer, spec, output_dir, step=step, metrics=metrics)
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
        trained_tokens=trained_tokens,
        final_adapter_path=final_path,
        steps=step,
        resumed_from_step=resumed_from,
    )


def save_checkpoint(model, tokenizer, spec: TrainSpec, output_dir: Path, *, step: int, metrics: dict) -> Path:
    """A self-describing folder: the PEFT adapter (adapter_config.json names the base path) or,
    for full fine-tuning, the whole model (config.json, generation_config.json, fp32 safetensors:
    a plain Hugging Face model folder); the tokenizer with its chat template; and tunehouse.json
    with the base path, step, metrics."""
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
    if getattr(spec, "init_adapter_path", None):
        meta["init_adapter_path"] = str(spec.init_adapter_path)
    (path / "tunehouse.json").write_text(json.dumps(meta, indent=2))
    return path


# ----------------------------------------------------------------------------------------------
# resumable state
#
# state_dir/
#     adapter/        PEFT adapter (adapter_config.json + adapter_model.safetensors), fp32
#     model/          instead of adapter/ for full fine-tuning: the whole model, fp32 safetensors
#     trainer.pt      torch.save of {"optimizer", "scheduler", "rng"} state dicts (weights_only),
#                     plus whatever a recipe adds (DPO: the reference log-probs)
#     state.json      step, epoch, batch_in_epoch, metrics, last checkpoint, what the run was
#
# A save writes a new folder <state_dir.name>.tmp-XXXX beside state_dir, fsyncs it, then swaps
# it into place with one atomic rename (renameat2 RENAME_EXCHANGE on Linux), so a reader sees the
# old complete state or the new one. Where the exchange is not available, the old state is
# renamed aside to <name>.old-XXXX first; recover_state_dir puts it back if a crash fell between.
# ----------------------------------------------------------------------------------------------

STATE_VERSION = 1
STATE_ADAPTER = "adapter"
STATE_MODEL = "model"
STATE_TRAINER = "trainer.pt"
STATE_INFO = "state.json"


def read_state_info(state_dir: Path) -> dict | None:
    """The state.json of a saved state, or None when state_dir holds none."""
    path = Path(state_dir) / STATE_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("version") != STATE_VERSION:
        raise ValueError(
            f"{state_dir}: training state version {info.get('version')}, expected {STATE_VERSION}"
        )
    return info


def check_state_matches(info: dict, run_key: dict, state_dir: Path) -> None:
    """Refuse to continue a state saved for other data, seed or hyperparameters."""
    saved = info["run"]
    diff = sorted(k for k in run_key.keys() | saved.keys() if saved.get(k) != run_key.get(k))
    if diff:
        raise ValueError(
            f"the training state in {state_dir} was saved by a different run ({', '.join(diff)} differ); "
            "remove it or set resume=False to start over"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def capture_rng() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, as tensors and plain values (weights_only)."""
    import numpy as np
    import torch

    _, key, pos, has_gauss, gauss = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    import numpy as np
    import torch

    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def write_state(
    state_dir: Path,
    *,
    model,
    optimizer,
    scheduler,
    rng: dict,
    info: dict,
    weights: str = STATE_ADAPTER,
    extra: dict | None = None,
) -> None:
    """Write a complete state beside state_dir, then swap it into place atomically. `weights`:
    the folder name the model saves itself under; `extra`: more tensors for trainer.pt."""
    import torch

    state_dir = Path(state_dir)
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{state_dir.name}.tmp-", dir=state_dir.parent))
    try:
        model.save_pretrained(tmp / weights)
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            **(extra or {}),
        }
        torch.save(trainer, tmp / STATE_TRAINER)
        (tmp / STATE_INFO).write_text(json.dumps(info, indent=2))
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(Path(folder))
        publish_dir(tmp, state_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only by a failure, or the swapped-out old state


def publish_dir(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` at `dest` in one atomic step; the old `dest`, if any, ends
    up at `tmp` (the caller removes it)."""
    if not dest.exists():
        os.rename(tmp, dest)
    elif not exchange_paths(tmp, dest):
        old = Path(tempfile.mkdtemp(prefix=f"{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "state")
        os.rename(tmp, dest)
        os.rename(old / "state", tmp)
        old.rmdir()
    fsync_path(dest.parent)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    logger.debug("renameat2 exchange unavailable: %s", os.strerror(errno))
    return False


def recover_state_dir(state_dir: Path) -> None:
    """Clean what an interrupted save left beside state_dir: half-written <name>.tmp-* folders go;
    an old state renamed aside (<name>.old-*/state) goes back if state_dir itself is missing."""
    state_dir = Path(state_dir)
    if not state_dir.parent.is_dir():
        return
    for path in sorted(state_dir.parent.iterdir()):
        if path.name.startswith(f"{state_dir.name}.old-"):
            if not state_dir.exists() and (path / "state" / STATE_INFO).is_file():
                os.rename(path / "state", state_dir)
                logger.warning("recovered the training state in %s from %s", state_dir, path)
            shutil.rmtree(path, ignore_errors=True)
    for path in state_dir.parent.iterdir():
        if path.name.startswith(f"{state_dir.name}.tmp-"):
            shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
