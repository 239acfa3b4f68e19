"""Reinforcement fine-tuning (RFT) by GRPO: learn to score well on a grader, from prompts alone.

OpenAI's `method: {type: "reinforcement"}`; the recipe is GRPO (DeepSeekMath, with DAPO's token-level
loss and TRL GRPOTrainer's defaults). The shared loop (training/loop.py) does the rest; this recipe
brings, for each optimizer step's prompts:

    rollout   `group_size` answers per prompt, sampled from the weights as they are now (the job
              gives the sampler: inference/rollout.py, all the step's answers decoded as one batch)
    reward    each answer graded (the job gives the grader: graders/, python graders in their
              sandbox, model graders through the serving engine), a prompt's answers as soon as
              they are all complete, while the others still decode; an answer the grader fails on
              scores 0 and counts as an error, and a step where most do stops the job
    advantage (reward - mean of its group) / (std of its group + 1e-4): an answer is pushed up or
              down only relative to the other answers to the same prompt; a group whose answers
              all scored the same teaches nothing and is skipped
    loss      the clipped policy loss, -min(ratio * A, clip(ratio, 1 ± epsilon) * A) per answer
              token, summed over the step's answer tokens and divided by their number (DAPO); one
              policy update per rollout, so ratio = 1 in value and the gradient is A * grad log p.
              With kl_beta > 0, plus kl_beta times the k3 estimate of KL to the base model (the
              LoRA adapter switched off: no second copy of the model)
    report    reward mean and spread, grader error rate, answer length, time decoding, waiting for
              grades after decoding, and training; a few prompts with their answers and rewards
              (`step_samples`)

Validation (every `eval_interval` steps, `eval_samples` validation prompts; the whole validation
file at each epoch end, which is what checkpoints carry): one greedy answer per prompt, graded:
valid_reward. Resuming is step for step: each step's sampling seed is drawn from torch's RNG,
which the loop saves and restores at step boundaries.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tunehouse.data.chat import prompt_ids
from tunehouse.training.examples import IGNORE, Example, padded, read_jsonl, split_by_length
from tunehouse.training.loop import Data, Model, TrainHooks, TrainResult, TrainSpec, run

logger = logging.getLogger(__name__)
ADVANTAGE_EPS = 1e-4
SAMPLES_REPORTED = 4  # prompts per step whose answers and rewards are reported


class Sampler(Protocol):
    def __call__(
        self,
        model: Any,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        eos_ids: set[int],
        pad_id: int,
        on_group: Callable[[int, list[list[int]]], None] | None = None,
    ) -> list[list[list[int]]]:
        """`n` answers (token ids) for each prompt, sampled from `model` as it is now; each
        prompt's answers handed to `on_group(prompt index, answers)` as soon as they are complete."""


# (the training lines, one answer text per line) -> (reward, error message or None) per answer.
Rewarder = Callable[[list[dict], list[str]], list[tuple[float, str | None]]]


class GraderFailed(RuntimeError):
    """Most answers of a step could not be graded: training on zeros would teach nothing."""


@dataclass
class ReinforcementSpec(TrainSpec):
    sampler: Sampler | None = None
    rewarder: Rewarder | None = None
    group_size: int = 8  # answers per prompt (TRL's num_generations)
    max_completion_tokens: int = 256
    temperature: float = 1.0
    epsilon: float = 0.2  # the policy ratio's clip range
    kl_beta: float = 0.0  # weight of the KL penalty to the base model (0: none, as TRL's default)
    eval_interval: int = 1  # steps between validation rewards
    eval_samples: int = 8  # validation prompts scored each time
    max_error_rate: float = 0.5  # above this share of ungradable answers in a step, the job fails


@dataclass
class Rollout:
    answers: list[list[list[int]]]  # per prompt, its answers' token ids
    rewards: list[float]  # per answer, prompt by prompt (0 where the grader failed)
    n_errors: int  # answers the grader failed on
    texts: list[str]  # per answer, as graded
    generation_s: float  # decoding
    grading_s: float  # waiting for grades after the last answer (the rest overlapped decoding)


@dataclass
class Prompt:
    ids: list[int]
    line: dict  # the whole training line: what the grader reads as {{item.*}}


class Reinforcement:
    """The loop's recipe for GRPO (see the module docstring)."""

    state_info = {"method": "reinforcement"}
    checkpoint_info = {"method": "reinforcement"}
    # loss, reward, reward², errors, answers, answer tokens, generation s, grading s, training s,
    # flat groups
    n_sums = 10

    def __init__(self, spec: ReinforcementSpec):
        if spec.sampler is None or spec.rewarder is None:
            raise ValueError("a reinforcement run needs a sampler and a rewarder")
        if spec.kl_beta and spec.fine_tuning_type != "lora":
            raise ValueError("kl_beta needs a LoRA run: its reference is the base, adapter off")
        self.spec = spec
        self.samples: list[dict] = []

    # -- data -------------------------------------------------------------------------------------

    def load_data(self, spec: TrainSpec, tokenizer) -> Data:
        self.tokenizer = tokenizer
        # The sampler adds the model's own end tokens (those serving stops at).
        self.eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        room = spec.max_length - self.spec.max_completion_tokens

        def prompts(path) -> list[Prompt]:
            out = [
                Prompt(prompt_ids(tokenizer, line), line) for line in read_jsonl(path, method="reinforcement")
            ]
            too_long = [i + 1 for i, p in enumerate(out) if len(p.ids) > room]
            if too_long:  # the data check reports these first; this guards a changed context
                raise ValueError(
                    f"prompts {too_long[:5]} leave no room for {self.spec.max_completion_tokens} answer "
                    f"tokens in the context of {spec.max_length}"
                )
            return out

        train = prompts(spec.train_file)
        if not train:
            raise ValueError("the training file has no prompts")
        valid = prompts(spec.valid_file) if spec.valid_file else []
        hp = spec.hyperparameters
        return Data(
            train=train,
            valid=valid,
            # Billed like OpenAI's per-token methods would: every prompt token of every answer
            # sampled, each epoch (the answers' own tokens are reported in the metrics).
            trained_tokens=sum(len(p.ids) for p in train) * self.spec.group_size * hp.n_epochs,
            run_key={
                "method": "reinforcement",
                "n_train_prompts": len(train),
                "group_size": self.spec.group_size,
                "max_completion_tokens": self.spec.max_completion_tokens,
                "temperature": self.spec.temperature,
                "kl_beta": self.spec.kl_beta,
            },
        )

    def prepare(self, m: Model, data: Data, *, saved: dict | None, should_stop) -> None:
        # The starting model's validation reward, the figure every later one is compared with
        # (reported with each step's metrics; kept in the saved state for a resumed run).
        self.base_valid: dict[str, float] = {}
        if saved is not None and "base_valid_reward" in saved:
            self.base_valid = {"base_valid_reward": float(saved["base_valid_reward"])}
        elif data.valid:
            m.model.eval()
            try:
                with torch.no_grad():
                    self.base_valid = {"base_valid_reward": self.evaluate(m, data.valid)["reward"]}
            finally:
                m.model.train()
            logger.info("validation reward before training: %.4f", self.base_valid["base_valid_reward"])

    def state_extra(self) -> dict:
        return dict(self.base_valid)

    def normaliser(self, items: Sequence[Prompt]) -> float:
        return len(items)  # metrics are per prompt; the loss is normalised by answer tokens itself

    def valid_schedule(self, total_steps: int, n_valid: int) -> tuple[int, int]:
        """(every how many steps, how many validation prompts) a validation reward is measured."""
        return max(1, self.spec.eval_interval), min(self.spec.eval_samples, n_valid)

    # -- one step ---------------------------------------------------------------------------------

    def _answers(
        self, m: Model, prompts: Sequence[Prompt], *, n: int, temperature: float, on_group=None
    ) -> list[list[list[int]]]:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the RNG the loop saves: resumable
        was_training = m.model.training
        m.model.eval()
        try:
            with torch.no_grad(), m.autocast:
                return self.spec.sampler(
                    m.model,
                    [p.ids for p in prompts],
                    n=n,
                    max_new_tokens=self.spec.max_completion_tokens,
                    temperature=temperature,
                    seed=seed,
                    eos_ids=self.eos_ids,
                    pad_id=m.pad_id,
                    on_group=on_group,
                )
        finally:
            m.model.train(was_training)

    def _rollout(self, m: Model, prompts: Sequence[Prompt], *, n: int, temperature: float) -> Rollout:
        """`n` answers per prompt, graded: each prompt's answers go to the grader (on a thread;
        python graders run in sandbox processes of their own) as soon as they are all complete,
        while the other prompts' answers still decode."""
        graded: dict[int, Future] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-grader") as pool:

            def on_group(i: int, group: list[list[int]]) -> None:
                graded[i] = pool.submit(self._grade_group, prompts[i], [list(a) for a in group])

            t0 = time.perf_counter()
            answers = self._answers(m, prompts, n=n, temperature=temperature, on_group=on_group)
            t1 = time.perf_counter()
            groups = [graded[i].result() for i in range(len(prompts))]
            t2 = time.perf_counter()
        graded_answers = [g for group in groups for g in group]
        rewards = [float(r) if err is None else 0.0 for r, err, _ in graded_answers]
        errors = [err for _, err, _ in graded_answers if err is not None]
        if errors and len(errors) / len(graded_answers) > self.spec.max_error_rate:
            raise GraderFailed(
                f"The grader failed on {len(errors)} of {len(graded_answers)} answers in a step (more "
                f"than {self.spec.max_error_rate:.0%}); the first error: {errors[0]}"
            )
        return Rollout(
            answers=answers,
            rewards=rewards,
            n_errors=len(errors),
            texts=[text for _, _, text in graded_answers],
            generation_s=t1 - t0,
            grading_s=t2 - t1,
        )

    def _grade_group(self, prompt: Prompt, answers: list[list[int]]) -> list[tuple[float, str | None, str]]:
        texts = [self.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        graded = self.spec.rewarder([prompt.line] * len(texts), texts)
        return [(reward, err, text) for (reward, err), text in zip(graded, texts, strict=True)]

    def micro_steps(
        self, m: Model, items: Sequence[Prompt], *, normaliser: float | None
    ) -> Iterator[tuple[list[float], int]]:
        g = self.spec.group_size
        rollout = self._rollout(m, items, n=g, temperature=self.spec.temperature)
        answers, rewards, texts = rollout.answers, rollout.rewards, rollout.texts

        rows, advantages, flat = [], [], 0
        for i, p in enumerate(items):
            group = torch.tensor(rewards[i * g : (i + 1) * g])
            if g > 1 and float(group.std()) == 0.0 and self.spec.kl_beta == 0:
                flat += 1  # every answer scored the same: no direction to push
                continue
            adv = (group - group.mean()) / (group.std(unbiased=False) + ADVANTAGE_EPS) if g > 1 else group
            for a, advantage in zip(answers[i], adv.tolist(), strict=True):
                if a:
                    rows.append(_example(p.ids, a))
                    advantages.append(advantage)
        self.samples = [
            {
                "item": p.line,
                "prompt": self.tokenizer.decode(p.ids),
                "answers": texts[i * g : (i + 1) * g],
                "rewards": rewards[i * g : (i + 1) * g],
            }
            for i, p in enumerate(items[:SAMPLES_REPORTED])
        ]
        n_answer_tokens = sum(len(a) for group in answers for a in group)
        r = torch.tensor(rewards)
        # The rollout's figures first, as a micro-batch of no tokens (the loop may stop after it).
        yield (
            [
                0.0,
                float(r.sum()),
                float((r * r).sum()),
                rollout.n_errors,
                len(rewards),
                n_answer_tokens,
                rollout.generation_s,
                rollout.grading_s,
                0.0,
                flat,
            ],
            0,
        )

        total = sum(ex.n_trained for ex in rows)
        order = sorted(range(len(rows)), key=lambda k: len(rows[k].inputs), reverse=True)
        start = 0
        for end in split_by_length([len(rows[k].inputs) for k in order]):
            t1 = time.perf_counter()
            chunk, start = order[start:end], end
            inputs, labels = padded([rows[k] for k in chunk], m.pad_id)
            adv = torch.tensor([advantages[k] for k in chunk])
            with m.autocast:
                loss_sum = self._loss(m, inputs.to(m.device), labels.to(m.device), adv.to(m.device))
            if normaliser is not None:
                (loss_sum / max(1, total)).backward()
            yield (
                [loss_sum.item(), 0.0, 0.0, 0, 0, 0, 0.0, 0.0, time.perf_counter() - t1, 0],
                int(inputs.numel()),
            )

    def _loss(self, m: Model, inputs, labels, advantages):
        """Sum over the answer tokens of the clipped policy loss (+ kl_beta x KL to the base)."""
        trained = labels != IGNORE
        logp = _token_logp(m, inputs, labels, trained)
        per_row = trained.sum(-1)
        adv = advantages.repeat_interleave(per_row)  # each answer token gets its answer's advantage
        ratio = torch.exp(logp - logp.detach())  # 1 in value: one update per rollout
        eps = self.spec.epsilon
        loss = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        if self.spec.kl_beta:
            with torch.no_grad(), m.model.disable_adapter():
                ref = _token_logp(m, inputs, labels, trained)
            delta = ref - logp
            loss = loss + self.spec.kl_beta * (torch.exp(delta) - delta - 1)
        return loss.sum()

    def metrics(self, sums: list[float], n: float) -> dict[str, float]:
        loss, r, r2, errors, answers, tokens, gen_s, grade_s, train_s, flat = sums
        answers = max(1, answers)
        mean = r / answers
        return {
            "train_loss": loss / max(1, tokens),
            "train_reward_mean": mean,
            "train_reward_std": math.sqrt(max(0.0, r2 / answers - mean * mean)),
            "train_grader_error_rate": errors / answers,
            "train_answer_tokens_mean": tokens / answers,
            "train_flat_groups": flat,
            "generation_seconds": gen_s,
            "grading_seconds": grade_s,
            "training_seconds": train_s,
            "generated_tokens": tokens,
            **self.base_valid,
        }

    def step_samples(self) -> list[dict]:
        """A few of the last step's prompts with their answers and rewards."""
        return self.samples

    # -- validation -------------------------------------------------------------------------------

    def evaluate(self, m: Model, items: Sequence[Prompt]) -> dict[str, float]:
        """The mean reward of one greedy answer per validation prompt."""
        rollout = self._rollout(m, items, n=1, temperature=0.0)
        n = max(1, len(rollout.rewards))
        return {"reward": sum(rollout.rewards) / n, "grader_error_rate": rollout.n_errors / n}


def _example(prompt: list[int], answer: list[int]) -> Example:
    ids = prompt + answer
    n = len(prompt)
    # inputs[t] predicts ids[t + 1]: the answer's tokens are predicted from positions n-1 .. end-1.
    labels = [IGNORE] * (n - 1) + answer
    return Example(inputs=ids[:-1], labels=labels, billable_tokens=len(ids))


def _token_logp(m: Model, inputs, labels, trained):
    """log p of each trained (answer) token, in row order: the lm_head runs only there."""
    hidden = m.decoder(input_ids=inputs, use_cache=False).last_hidden_state
    logits = m.lm_head(hidden[trained]).float()
    if m.softcap:
        logits = m.softcap * (logits / m.softcap).tanh()
    return torch.log_softmax(logits, dim=-1).gather(1, labels[trained].unsqueeze(1)).squeeze(1)


def train(spec: TrainSpec, hooks: TrainHooks) -> TrainResult:
    return run(spec, Reinforcement(spec), hooks)
