"""Generation for evals, in a job's own process: many prompts through the inference engine at once.

An eval run (and a fine-tuning job scoring its checkpoints) has all its prompts up front. Sending
them one by one, as a chat client would, leaves the engine decoding one sequence at a time;
`Generator.generate` submits every prompt at once, so the engine's scheduler decodes them together
in batches (up to its batch size) and each result is handed back as soon as its sequence ends: a
run writes its output items as they come, so a kill loses at most the items still decoding.

The engine (torch, transformers, the model) loads on first use: a process that only looks a job's
kind up never pays for it (an allowed deferred import, see pyproject.toml).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunehouse.config import Settings
from tunehouse.errors import ModelNotFound
from tunehouse.graders import Completion
from tunehouse.inference.engine import (
    ContextLengthExceeded,
    Delta,
    ModelRef,
    PartialChoice,
    SamplingParams,
    Usage,
)
from tunehouse.store.blobs import open_blobs
from tunehouse.store.catalog import is_base_model, resolve_base_model
from tunehouse.store.tables import Checkpoint


@dataclass
class GenResult:
    text: str = ""
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the prompt could not run (too long for the context, say)
    # Every choice with its logprobs (`run` takes any n; `text`/`finish_reason` are choice 0's).
    choices: list[PartialChoice] = field(default_factory=list)


def resolve_model(settings: Settings, session: Session, name: str, *, param: str = "model") -> ModelRef:
    """A served model by name: a base model, or a fine-tuned model or checkpoint (`ft:…`).

    No tenancy check here: whoever queued the work checked, at create time, that its project may
    use the model (api/models/service.py `resolve_for_inference`)."""
    if is_base_model(settings, name):
        return ModelRef(name=name, base_path=resolve_base_model(settings, name, param=param).path)
    row = session.scalar(select(Checkpoint).where(Checkpoint.model_name == name))
    if row is None:
        raise ModelNotFound(name, param=param)
    base = resolve_base_model(settings, row.base_model, param=param)
    return ModelRef(
        name=name, base_path=base.path, adapter_path=open_blobs(settings, "weights").path(row.path)
    )


class Generator:
    """Batched generation on one inference engine, created on first use (or given: a test, or a
    process that already has one)."""

    def __init__(self, settings: Settings, *, engine: Any = None):
        self.settings = settings
        self._engine = engine
        self._owns_engine = engine is None
        self._lock = threading.Lock()

    @property
    def engine(self):
        with self._lock:
            if self._engine is None:
                from tunehouse.inference.hf import HFEngine  # torch loads here, on first generation

                self._engine = HFEngine.from_settings(self.settings)
            return self._engine

    def generate(
        self,
        model: ModelRef,
        prompts: list[list[dict]],
        params: SamplingParams,
        on_result: Callable[[int, GenResult], None],
        *,
        should_stop: Callable[[], bool] = lambda: False,
        tools: list | None = None,
    ) -> None:
        """Run every prompt (chat messages) with `params` (one choice each) and call
        `on_result(index, result)` from this thread as each finishes, in finishing order. Returns
        when all have finished, or early, cancelling what still runs, once `should_stop()`."""
        if params.n != 1:
            raise ValueError("eval generation samples one choice per prompt")
        engine = self.engine
        requests = []
        for index, messages in enumerate(prompts):
            try:
                requests.append((index, engine.encode_chat(model, messages, tools=tools), params))
            except (ContextLengthExceeded, ValueError) as e:
                on_result(index, GenResult(finish_reason="error", error=str(e)))
        self.run(model, requests, on_result, should_stop=should_stop)

    def run(
        self,
        model: ModelRef,
        requests: list[tuple[int, list[int], SamplingParams]],
        on_result: Callable[[int, GenResult], None],
        *,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """`generate` for prompts already tokenized, each (index, token ids, params) with its own
        sampling parameters and any `n` (a batch's requests: jobs/batch.py). Everything is
        submitted at once; `on_result(index, result)` as each finishes."""
        engine = self.engine
        done: queue.SimpleQueue[tuple[int, GenResult]] = queue.SimpleQueue()
        handles = []
        pending = 0
        for index, ids, params in requests:
            try:
                handles.append(engine.submit(model, ids, params, _Collector(index, len(ids), done.put)))
                pending += 1
            except (ContextLengthExceeded, ValueError) as e:
                on_result(index, GenResult(finish_reason="error", error=str(e)))
        try:
            while pending:
                try:
                    index, result = done.get(timeout=0.5)
                except queue.Empty:
                    if should_stop():
                        return
                    continue
                pending -= 1
                on_result(index, result)
        finally:
            for handle in handles:
                handle.cancel()  # a no-op for those that finished

    def complete(self, model: ModelRef, messages: list[dict], params: SamplingParams) -> GenResult:
        """One prompt, waited for (a model grader's call; many run at once from grader threads)."""
        results: list[GenResult] = []
        self.generate(model, [messages], params, lambda _, r: results.append(r))
        return results[0]

    def sampler(self, session_factory: Callable[[], Session]) -> EngineSampler:
        """A sampler that resolves model names itself (a job's process: the API checked them)."""
        refs: dict[str, ModelRef] = {}

        def resolve(name: str) -> ModelRef:
            if name not in refs:
                with session_factory() as session:
                    refs[name] = resolve_model(self.settings, session, name)
            return refs[name]

        return EngineSampler(self, resolve)

    def close(self) -> None:
        if self._engine is not None and self._owns_engine:
            self._engine.close()
            self._engine = None


class EngineSampler:
    """The graders' ModelSampler on an engine: score_model and label_model sample the models they
    name, resolved by `resolve` (which raises ModelNotFound for a name it does not know);
    `on_usage(model, prompt_tokens, completion_tokens)` is told what each call cost."""

    def __init__(
        self,
        generator: Generator,
        resolve: Callable[[str], ModelRef],
        *,
        on_usage: Callable[[str, int, int], None] | None = None,
    ):
        self.generator = generator
        self.resolve = resolve
        self.on_usage = on_usage

    def complete(
        self,
        model: str,
        messages: list[dict],
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        response_format: dict | None = None,
    ) -> Completion:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            response_format=response_format,
        )
        ref = self.resolve(model)
        result = self.generator.complete(ref, messages, params)
        if result.error is not None:
            raise RuntimeError(result.error)
        if self.on_usage is not None:
            self.on_usage(model, result.prompt_tokens, result.completion_tokens)
        return Completion(
            text=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            model=model,
        )


class _Collector:
    """Gathers one request's events (on the engine's thread) into one GenResult."""

    def __init__(self, index: int, prompt_tokens: int, put: Callable[[tuple[int, GenResult]], None]):
        self.index = index
        self.result = GenResult(prompt_tokens=prompt_tokens)
        self.put = put

    def __call__(self, event: Delta | Usage | BaseException) -> None:
        if isinstance(event, Delta):
            choices = self.result.choices
            while len(choices) <= event.index:
                choices.append(PartialChoice(len(choices)))
            choices[event.index].add(event)
            if event.index == 0:
                self.result.text += event.text
                if event.finish_reason:
                    self.result.finish_reason = event.finish_reason
        elif isinstance(event, Usage):
            self.result.prompt_tokens = event.prompt_tokens
            self.result.completion_tokens = event.completion_tokens
            self.put((self.index, self.result))
        else:
            self.result.finish_reason = "error"
            self.result.error = f"{type(event).__name__}: {event}"
            self.put((self.index, self.result))
