"""Direct Preference Optimization (DPO) on OpenAI preference JSONL: a LoRA adapter, or every weight.

Same shape and contract as the supervised recipe (TrainHooks / TrainResult / TrainingStopped,
fine_tuning_type, init_adapter_path, resumable state_dir), and its helpers are reused, not copied:

    1. resolve    device, dtype, seeds
    2. load base  model + tokenizer, LoRA on every attention/MLP projection (or all weights, full)
    3. build data each line -> two sequences: prompt + preferred, prompt + non-preferred; only the
                  final assistant message is trained (earlier assistant turns get weight 0)
    4. reference  log-probs of both sequences under the model training starts from, computed ONCE
                  before training (no second copy of the model in memory), and they never change
    5. train      AdamW, warm-up + linear decay, DPO loss (Rafailov et al. 2023)
                      loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
                  where pi_x / ref_x are sequence log-probs summed over the trained tokens
    6. checkpoint adapter (or model folder) + tokenizer + tunehouse.json at every epoch end

The reference is the model as it is before the first step, as OpenAI's DPO on a fine-tuned model
uses that model as its reference:
    from a base model, fresh LoRA   the base: the same model with its adapter disabled
    from an ft: LoRA model          that model: its adapter (init_adapter_path) is trained further,
                                    and the reference log-probs are taken with it, before step 1
    full fine-tuning                the starting weights (the base, an ft: full model's folder, or
                                    the base with an ft: adapter merged in), before step 1
Continuing the ft: adapter itself (rather than merging it and training a fresh adapter on top)
keeps the result an ordinary adapter on the base: served, exported and continued like any other.

With a state_dir the full training state is saved as in the supervised recipe, plus the reference
log-probs (a resumed run must not take them again from the half-trained policy); a stopped,
paused or killed run continues step for step as if never interrupted.

Metrics (per step, via hooks.on_metrics):
    train_loss                  the mean DPO loss over the step's pairs
    train_mean_token_accuracy   the *preference* accuracy: the fraction of pairs whose chosen reward
                                beta * (pi_c - ref_c) is strictly greater than the rejected one (0 at
                                the first step, where policy == reference). There is no meaningful
                                token accuracy in DPO; this fills the same slot of the results file.
    train_rewards_chosen        mean beta * (pi_c - ref_c)
    train_rewards_rejected      mean beta * (pi_r - ref_r)
    train_reward_margin         mean chosen - rejected reward
    valid_loss / valid_mean_token_accuracy (small rotating batch), full_valid_* (each epoch end):
                                the same two quantities on the validation pairs.

Billing (trained_tokens): per pair, the tokens of (prompt + preferred) plus the tokens of
(prompt + non-preferred), each truncated to max_length, times n_epochs. That is what
tunehouse.data.analysis estimates for a DPO file (`_sequences` + `len(input_ids)` per sequence), so
the estimate and the job's trained_tokens agree.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from tunehouse.training.hparams import MAX_BETA, DpoHyperparameters, auto_beta
from tunehouse.training.recipes.supervised import (
    IGNORE,
    MAX_GRAD_NORM,
    MAX_VALID_POINTS,
    STATE_TRAINER,
    STATE_VERSION,
    Example,
    TrainHooks,
    TrainingStopped,
    TrainResult,
    TrainSpec,
    build_example,
    capture_rng,
    check_state_matches,
    epoch_order,
    file_sha256,
    load_trainable_model,
    lr_lambda,
    read_state_info,
    recover_state_dir,
    resolve_device,
    resolve_dtype,
    restore_rng,
    save_checkpoint,
    seed_everything,
    split_by_length,
    state_weights_dir,
    unwrap,
    write_state,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DpoSpec",
    "Pair",
    "TrainHooks",
    "TrainResult",
    "TrainingStopped",
    "build_pair",
    "dpo_loss",
    "pair_batches",
    "read_pairs",
    "reference_logps",
    "sequence_logps",
    "train",
]


@dataclass
class DpoSpec(TrainSpec):
    """TrainSpec plus beta. `hyperparameters` may be a plain Hyperparameters or a
    DpoHyperparameters (from resolve_dpo_hyperparameters); `beta=None` takes the latter's beta,
    else auto_beta() (0.1). After construction `beta` is always a float in (0, 2]."""

    beta: float | None = None

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # TrainSpec may grow one
            parent()
        hp_beta = getattr(self.hyperparameters, "beta", None)
        if self.beta is None:
            self.beta = hp_beta if hp_beta is not None else auto_beta()
        elif hp_beta is not None and float(hp_beta) != float(self.beta):
            raise ValueError(f"beta {self.beta} disagrees with hyperparameters.beta {hp_beta}")
        self.beta = float(self.beta)
        if not 0 < self.beta <= MAX_BETA:
            raise ValueError(f"beta must be in (0, {MAX_BETA:g}], got {self.beta}")


# ----------------------------------------------------------------------------------------------
# 3. data: one preference line -> two training sequences
# ----------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One preference line. `ref_*` are the reference model's sequence log-probs (filled in once,
    before training)."""

    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def billable_tokens(self) -> int:
        return self.chosen.billable_tokens + self.rejected.billable_tokens

    @property
    def trainable(self) -> bool:
        return bool(self.chosen.n_trained and self.rejected.n_trained)

    @property
    def width(self) -> int:
        return max(len(self.chosen.inputs), len(self.rejected.inputs))


def build_pair(tokenizer, line: dict, max_length: int) -> Pair:
    """{"input": {"messages", "tools"?, ...}, "preferred_output": [msg], "non_preferred_output": [msg]}
    -> two Examples. Assistant turns inside `input` are context (weight 0); the output message is
    always trained, whatever weight it carries."""
    inp = line["input"]
    extra = {k: v for k, v in inp.items() if k != "messages"}  # tools, parallel_tool_calls
    context = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in inp["messages"]]

    def sequence(key: str) -> Example:
        answer = {k: v for k, v in line[key][0].items() if k != "weight"}
        return build_example(tokenizer, {**extra, "messages": [*context, answer]}, max_length)

    return Pair(chosen=sequence("preferred_output"), rejected=sequence("non_preferred_output"))


def read_pairs(tokenizer, path: Path, max_length: int) -> list[Pair]:
    from tunehouse.data.validation import iter_examples

    return [build_pair(tokenizer, line, max_length) for _lineno, line in iter_examples(path, method="dpo")]


def pair_batches(pairs: list[Pair], pad_id: int) -> Iterator[tuple[object, object, list[Pair], int]]:
    """Micro-batches of whole pairs: rows [0, k) are the chosen sequences of the k pairs, rows
    [k, 2k) their rejected ones, right-padded (no attention mask needed, as in supervised's
    micro_batches). Pairs are sorted by width and cut with supervised's split_by_length, each pair
    counting as two rows. Yields (inputs [2k, L], labels [2k, L], the k pairs, n_real_tokens)."""
    import torch

    todo = sorted(pairs, key=lambda p: p.width, reverse=True)
    start = 0
    for end in split_by_length([2 * p.width for p in todo]):
        chunk, start = todo[start:end], end
        rows = [p.chosen for p in chunk] + [p.rejected for p in chunk]
        longest = max(len(ex.inputs) for ex in rows)
        inputs = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        for row, ex in enumerate(rows):
            inputs[row, : len(ex.inputs)] = torch.tensor(ex.inputs)
            labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
        yield inputs, labels, chunk, sum(len(ex.inputs) for ex in rows)


# ----------------------------------------------------------------------------------------------
# 4-5. log-probs and the loss
# ----------------------------------------------------------------------------------------------


def sequence_logps(decoder, lm_head, inputs, labels, softcap: float | None = None):
    """Per row, the sum of log p(label) over its trained positions: a [B] fp32 tensor.

    As in supervised's trained_token_loss, only the trained positions go through the lm_head."""
    import torch
    import torch.nn.functional as F

    hidden = decoder(input_ids=inputs, use_cache=False).last_hidden_state  # [B, L, d]
    trained = labels != IGNORE  # [B, L]
    rows = trained.nonzero(as_tuple=True)[0]  # [N] row of each trained position
    logits = lm_head(hidden[trained]).float()  # [N, V]
    if softcap:
        logits = softcap * (logits / softcap).tanh()
    token_logps = -F.cross_entropy(logits, labels[trained], reduction="none")  # [N]
    out = torch.zeros(inputs.shape[0], dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, rows, token_logps)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss and the implicit rewards beta * (pi - ref) of each side."""
    import torch.nn.functional as F

    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def reference_logps(
    model,
    decoder,
    lm_head,
    pairs: list[Pair],
    pad_id: int,
    *,
    device,
    autocast,
    softcap=None,
    should_stop=None,
    disable_adapter: bool = True,
) -> None:
    """Fills pair.ref_chosen / ref_rejected, under no_grad and in eval mode: the base model's
    log-probs, i.e. the PEFT model with its adapter disabled; with `disable_adapter=False` (or a
    plain model) the model's own, as it is now."""
    import torch

    was_training = model.training
    model.eval()
    off = model.disable_adapter() if disable_adapter and hasattr(model, "disable_adapter") else nullcontext()
    try:
        with torch.no_grad(), off:
            for inputs, labels, chunk, _ in pair_batches(pairs, pad_id):
                if should_stop is not None and should_stop():
                    raise TrainingStopped("stopped while computing the reference log-probs")
                with autocast:
                    logps = sequence_logps(decoder, lm_head, inputs.to(device), labels.to(device), softcap)
                k = len(chunk)
                for i, pair in enumerate(chunk):
                    pair.ref_chosen, pair.ref_rejected = logps[i].item(), logps[k + i].item()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------


def train(spec: DpoSpec, hooks: TrainHooks) -> TrainResult:
    import torch
    from transformers import AutoTokenizer

    beta = float(spec.beta) if spec.beta is not None else auto_beta()
    hp = spec.hyperparameters
    hp = DpoHyperparameters(
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        beta=beta,
    )
    ckpt_spec = replace(spec, hyperparameters=hp, beta=beta)  # tunehouse.json records beta
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(spec.state_dir) if spec.state_dir is not None else None
    saved = None  # the state.json of the state this run continues from
    if state_dir is not None:
        recover_state_dir(state_dir)
        saved = read_state_info(state_dir) if spec.resume else None

    # -- 1. resolve ---------------------------------------------------------------------------
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    seed_everything(spec.seed)
    logger.info("DPO on %s in %s, seed %d, %s", device, dtype, spec.seed, hp)

    # -- 2. load base, add LoRA (as supervised) ---------------------------------------------
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
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=dtype)
        if dtype != torch.float32
        else nullcontext()
    )

    # -- 3. data ------------------------------------------------------------------------------
    all_train = read_pairs(tokenizer, spec.train_file, spec.max_length)
    if not all_train:
        raise ValueError("the training file has no preference pairs")
    # Billing counts every line read, as supervised does; a pair that truncation left without a
    # trained token on either side (analysis reports it as an error) cannot train and is skipped.
    trained_tokens = sum(p.billable_tokens for p in all_train) * hp.n_epochs
    train_set = [p for p in all_train if p.trainable]
    if len(train_set) < len(all_train):
        logger.warning(
            "%d pairs have no trained token left after truncation", len(all_train) - len(train_set)
        )
    if not train_set:
        raise ValueError("no preference pair has a trained token left after truncation")
    valid_set = read_pairs(tokenizer, spec.valid_file, spec.max_length) if spec.valid_file else []
    valid_set = [p for p in valid_set if p.trainable]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps_per_epoch = math.ceil(len(train_set) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    valid_every = max(1, math.ceil(total_steps / MAX_VALID_POINTS))
    valid_batch = min(hp.batch_size, len(valid_set))
    logger.info(
        "%d preference pairs (%d valid), %d epochs x %d steps, beta %g, %d billable tokens",
        len(train_set), len(valid_set), hp.n_epochs, steps_per_epoch, beta, trained_tokens,
    )  # fmt: skip

    # -- 4. reference log-probs, once -----------------------------------------------------------
    # What a saved state must agree on to be continued: the same steps over the same data.
    run_key = {
        "method": "dpo",
        "train_sha256": file_sha256(Path(spec.train_file)),
        "n_train_pairs": len(train_set),
        "n_valid_pairs": len(valid_set),
        "seed": spec.seed,
        "max_length": spec.max_length,
        "hyperparameters": hp.to_dict(),
        "fine_tuning_type": spec.fine_tuning_type,
        "total_steps": total_steps,
        "trainable_parameters": [name for name, _ in named_params],
    }
    trainer_state = None
    if saved:
        check_state_matches(saved, run_key, state_dir)
        trainer_state = torch.load(state_dir / STATE_TRAINER, map_location="cpu", weights_only=True)
        # The reference of the model training started from, not of the half-trained policy.
        reference = trainer_state["reference"]  # [n_train + n_valid, 2] fp64
        for p, (c, r) in zip(train_set + valid_set, reference.tolist(), strict=True):
            p.ref_chosen, p.ref_rejected = c, r
    else:
        started = time.perf_counter()
        reference_logps(
            model, decoder, lm_head, train_set + valid_set, pad_id,
            device=device, autocast=autocast, softcap=softcap, should_stop=hooks.should_stop,
            # A fresh adapter starts as a no-op: "disabled" is the same model, and cheaper. A
            # continued adapter or full weights: the model as it starts is the reference.
            disable_adapter=spec.fine_tuning_type == "lora" and spec.init_adapter_path is None,
        )  # fmt: skip
        logger.info("reference log-probs in %.1f s", time.perf_counter() - started)
    reference = torch.tensor(
        [[p.ref_chosen, p.ref_rejected] for p in train_set + valid_set], dtype=torch.float64
    )

    def pair_stats(pairs: list[Pair], grad_scale: float | None) -> tuple[float, float, float, float]:
        """Sums over `pairs` of (loss, chosen > rejected, chosen reward, rejected reward); with
        `grad_scale`, back-propagates loss * grad_scale micro-batch by micro-batch."""
        nonlocal real_tokens
        sums = [0.0, 0.0, 0.0, 0.0]
        for inputs, labels, chunk, n_real in pair_batches(pairs, pad_id):
            k = len(chunk)
            ref_c = torch.tensor([p.ref_chosen for p in chunk], device=device)
            ref_r = torch.tensor([p.ref_rejected for p in chunk], device=device)
            with autocast:
                logps = sequence_logps(decoder, lm_head, inputs.to(device), labels.to(device), softcap)
            losses, chosen, rejected = dpo_loss(logps[:k], logps[k:], ref_c, ref_r, beta)
            if grad_scale is not None:
                (losses.sum() * grad_scale).backward()
                real_tokens += n_real
                stop_if_asked(boundary_rng, partial=True)  # between micro-batches too
            chosen, rejected = chosen.detach(), rejected.detach()
            sums[0] += losses.detach().sum().item()
            sums[1] += (chosen > rejected).sum().item()
            sums[2] += chosen.sum().item()
            sums[3] += rejected.sum().item()
        return sums[0], sums[1], sums[2], sums[3]

    @torch.no_grad()
    def evaluate(pairs: list[Pair]) -> tuple[float, float]:
        """(mean DPO loss, preference accuracy) over `pairs`."""
        model.eval()
        loss, correct, _, _ = pair_stats(pairs, None)
        model.train()
        return loss / len(pairs), correct / len(pairs)

    # -- 5. train -----------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps))
    step, epoch, batch_index, final_path = 0, 0, 0, output_dir
    metrics: dict[str, float] = {}
    if saved:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        restore_rng(trainer_state["rng"])  # last: loading the model above drew from the RNG
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        metrics = saved["metrics"]
        if saved["last_checkpoint"]:
            final_path = Path(saved["last_checkpoint"])
        logger.info("resuming DPO from the state at step %d/%d in %s", step, total_steps, state_dir)
    resumed_from = step if saved else None
    last_saved_step = step if saved else None
    last_save_time = time.monotonic()
    boundary_rng: dict | None = None

    def save_state(at_boundary: dict | None = None) -> None:
        """As supervised's save_state, with the reference log-probs in trainer.pt."""
        nonlocal last_saved_step, last_save_time
        info = {
            "version": STATE_VERSION,
            "method": "dpo",
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "batch_in_epoch": batch_index,
            "steps_per_epoch": steps_per_epoch,
            "metrics": metrics,
            "full_valid_metrics": {k: v for k, v in metrics.items() if k.startswith("full_valid_")},
            "last_checkpoint": str(final_path) if final_path != output_dir else None,
            "init_adapter_path": str(spec.init_adapter_path) if spec.init_adapter_path else None,
            "base_model_path": str(Path(spec.base_model_path).resolve()),
            "saved_at": time.time(),
            "run": run_key,
        }
        write_state(
            state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
            rng=at_boundary if at_boundary is not None else capture_rng(), info=info,
            weights=state_weights_dir(spec, state_dir).name, extra={"reference": reference},
        )  # fmt: skip
        last_saved_step, last_save_time = step, time.monotonic()
        logger.info("DPO training state at step %d saved to %s", step, state_dir)
        on_state_saved = getattr(hooks, "on_state_saved", None)
        if on_state_saved is not None:
            on_state_saved(step=step, path=state_dir)

    def stop_if_asked(at_boundary: dict | None, partial: bool) -> None:
        """As supervised's: a stop inside a step discards its gradients; the state saved is the
        last step boundary's."""
        if not hooks.should_stop():
            return
        logger.info("stop requested at step %d%s", step, " (partial step discarded)" if partial else "")
        if state_dir is not None:
            optimizer.zero_grad(set_to_none=True)
            if last_saved_step != step:
                save_state(at_boundary)
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
            boundary_rng = capture_rng() if state_dir is not None else None
            stop_if_asked(boundary_rng, partial=False)
            first = batch_index * hp.batch_size
            batch = [train_set[i] for i in order[first : first + hp.batch_size]]
            n = len(batch)
            loss, correct, chosen, rejected = pair_stats(batch, 1.0 / n)  # mean over the step's pairs
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, batch_index = step + 1, batch_index + 1

            metrics = {
                "train_loss": loss / n,
                "train_mean_token_accuracy": correct / n,  # preference accuracy, see the docstring
                "train_rewards_chosen": chosen / n,
                "train_rewards_rejected": rejected / n,
                "train_reward_margin": (chosen - rejected) / n,
            }
            if valid_set and (step % valid_every == 0 or step == total_steps):
                k = (step // valid_every - 1) * valid_batch
                sample = [valid_set[(k + i) % len(valid_set)] for i in range(valid_batch)]
                metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = evaluate(sample)
            end_of_epoch = batch_index == steps_per_epoch
            if end_of_epoch and valid_set:
                metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = evaluate(valid_set)
            logger.debug("step %d/%d %s", step, total_steps, metrics)
            hooks.on_metrics(step=step, total_steps=total_steps, metrics=metrics)
            every = spec.save_state_every_seconds
            if (
                state_dir is not None
                and every is not None
                and not end_of_epoch
                and time.monotonic() - last_save_time >= every
            ):
                save_state()

        # -- 6. checkpoint at each epoch end --------------------------------------------------
        final_path = save_checkpoint(model, tokenizer, ckpt_spec, output_dir, step=step, metrics=metrics)
        meta_path = final_path / "tunehouse.json"
        meta = json.loads(meta_path.read_text())
        meta["method"] = "dpo"
        meta_path.write_text(json.dumps(meta, indent=2))
        is_final = epoch == hp.n_epochs - 1
        logger.info(
            "epoch %d/%d done at step %d: %s (%.0f real tokens/s)",
            epoch + 1, hp.n_epochs, step, metrics, real_tokens / max(time.perf_counter() - started, 1e-9),
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
