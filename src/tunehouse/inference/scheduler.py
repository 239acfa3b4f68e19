"""The scheduler: step-level (continuous) batching of requests over the base models, in one thread.

Requests arrive in `submit` (validated by the engine first) and the thread loops:

  1. admit waiting requests: load their base model and adapter if needed, prefill their prompts
     together (left-padded; each from the end of its longest beginning in the prefix cache,
     `tunehouse.inference.prefix`), sample each sequence's first token, and join them to the
     running batch of that base (its KV cache padded on the left to a common length,
     `tunehouse.inference.cache`);
  2. one decode step for every active sequence of a base, in one forward pass, whatever adapter
     each one uses;
  3. sample each sequence with its own parameters (`tunehouse.inference.sampling`), hand out the
     new text (`tunehouse.inference.detokenize`), and drop the sequences that finished or whose
     request was cancelled (a closed stream), so their slots free at once.

A new request therefore waits at most one step, never for a running batch to finish. The models
themselves (loading weights and adapters, the forward pass) are the engine's: the scheduler calls
them through `ModelRunner`. Kept apart from the engine so the bookkeeping of requests, sequences
and batches reads on its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from tunehouse.inference.cache import append_rows, fill_left, new_cache, row_kv, select_rows
from tunehouse.inference.constrained import GrammarMatcher
from tunehouse.inference.detokenize import IncrementalDetokenizer
from tunehouse.inference.engine import Delta, Event, SamplingParams, TokenLogprob, Usage
from tunehouse.inference.models import LoadedBase
from tunehouse.inference.sampling import (
    adjust_logits,
    logit_bias_tensors,
    pick_tokens,
    seeded_generator,
    token_logprob,
)

log = logging.getLogger(__name__)


class ModelRunner(Protocol):
    """What the scheduler needs of the engine (called from the scheduler's thread only)."""

    def ensure_model(self, base: LoadedBase) -> None:
        """Load the base's weights (and what is built on them) if they are not loaded."""
        ...

    def ensure_adapter(self, base: LoadedBase, key: str | None, in_use: set[int]) -> int:
        """The slot of adapter `key` (`Request.adapter_key`), loading it if needed without
        evicting the slots in `in_use`; -1 for the base model."""
        ...

    def forward(self, base: LoadedBase, ids, mask, positions, cache, adapters: list[int]) -> torch.Tensor:
        """One forward pass over a batch; the logits of each row's last position, in fp32 on the CPU."""
        ...


class Seq:
    """One generated sequence (one choice of one request) in a running batch."""

    def __init__(self, req: Request, index: int, adapter: int, matcher: GrammarMatcher | None):
        self.req = req
        self.index = index
        self.adapter = adapter  # the adapter's slot in the base's MultiLora, -1 for the base model
        self.matcher = matcher
        self.row = IncrementalDetokenizer(req.base.tokenizer, req.stop, req.base.eos_ids)
        self.generator = seeded_generator(req.params.seed, index)
        self.counts: torch.Tensor | None = None  # generated-token counts, for the penalties
        self.entries: list[tuple[int, TokenLogprob]] = []  # (text offset of the token, its logprob)
        self.handed = 0  # entries handed out
        self.announced = False
        # The position id of `last`; each sampled token advances it, so the first generated token,
        # fed at the first decode step, sits at len(prompt), right after the prompt.
        self.position = len(req.prompt) - 1
        self.last = 0  # the token to feed at the next step

    @property
    def finished(self) -> bool:
        return self.row.finish_reason is not None


class Request:
    """A submitted request: what the scheduler needs to run it, and the handle its caller holds."""

    def __init__(
        self,
        base: LoadedBase,
        adapter_path: Path | None,
        prompt: list[int],
        params: SamplingParams,
        max_new: int,
        grammar: str | None,
        on_event: Callable[[Event], None],
    ):
        self.base = base
        self.adapter_path = adapter_path
        # Names the adapter in the base's loaded adapters and in its prefix cache: one key for both.
        self.adapter_key = None if adapter_path is None else str(Path(adapter_path).resolve())
        self.prompt = prompt
        self.params = params
        self.max_new = max_new
        self.grammar = grammar
        self.on_event = on_event
        self.stop = [s for s in params.stop if s]
        self.bias = logit_bias_tensors(params.logit_bias)
        self.matchers: list[GrammarMatcher | None] = [None] * params.n
        self.seqs: list[Seq] = []
        self.cancelled = threading.Event()
        self.done = False

    # RequestHandle
    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def completion_tokens(self) -> int:
        return sum(s.row.completion_tokens for s in list(self.seqs))

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.on_event(error)


@dataclass
class Batch:
    """The running sequences of one base model and their KV cache, left-padded to one length."""

    seqs: list[Seq] = field(default_factory=list)
    cache: Any = None  # DynamicCache, batch dimension in the order of `seqs`
    mask: torch.Tensor | None = None  # [batch, cache length]: 0 over the left padding


class Scheduler:
    """Runs submitted requests in batches of at most `max_batch_size` sequences, in a thread of its
    own started by the first request; `close` fails what is left and ends it."""

    def __init__(self, runner: ModelRunner, max_batch_size: int):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()  # guards _active, _closed and starting the thread
        self._incoming: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: deque[Request] = deque()  # admitted when the batch has room (scheduler only)
        self._batches: dict[str, Batch] = {}  # base key → running batch (scheduler only)
        self._active = 0  # sequences queued or running
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, req: Request) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self._active += req.params.n
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tunehouse-scheduler", daemon=True)
                self._thread.start()
        self._incoming.put(req)

    def active_sequences(self) -> int:
        return self._active

    def close(self) -> None:
        """Refuse new requests, fail the queued and running ones, and wait for the thread to end."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._incoming.put(None)
        if thread is not None:
            thread.join(timeout=60)

    # ---- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            idle = not self._batches and not self._waiting
            try:
                # Block only when there is nothing to run; otherwise take what arrived and go on.
                item = self._incoming.get(timeout=1.0) if idle else self._incoming.get_nowait()
                while True:
                    if item is None:
                        self._shutdown()
                        return
                    self._waiting.append(item)
                    item = self._incoming.get_nowait()
            except queue.Empty:
                pass
            try:
                with torch.inference_mode():
                    self._admit()
                    for key in list(self._batches):
                        self._step(key)
            except Exception as e:  # a bug or an out-of-memory: fail what is running, keep serving
                log.exception("inference step failed")
                for batch in self._batches.values():
                    for req in {id(s.req): s.req for s in batch.seqs}.values():
                        self._finished_request(req, error=e)
                self._batches.clear()

    def _shutdown(self) -> None:
        error = RuntimeError("the inference engine was closed")
        for req in list(self._waiting) + [s.req for b in self._batches.values() for s in b.seqs]:
            req.fail(error)
        self._waiting.clear()
        self._batches.clear()
        self._active = 0

    def _admit(self) -> None:
        """Prefill the waiting requests that fit, grouped by base, and join them to the batches."""
        room = self.max_batch_size - sum(len(b.seqs) for b in self._batches.values())
        groups: dict[str, list[Request]] = {}
        while self._waiting and (room >= self._waiting[0].params.n or room == self.max_batch_size):
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._finished_request(req)
                continue
            room -= req.params.n
            groups.setdefault(str(req.base.path), []).append(req)
        for key, reqs in groups.items():
            base = reqs[0].base
            batch = self._batches.setdefault(key, Batch())
            seqs: list[Seq] = []
            with torch.inference_mode(False):  # weights loaded here must be ordinary tensors
                try:
                    self.runner.ensure_model(base)
                except Exception as e:
                    for req in reqs:
                        self._finished_request(req, error=e)
                    continue
                in_use = {s.adapter for s in batch.seqs}
                for req in reqs:
                    try:
                        adapter = self.runner.ensure_adapter(base, req.adapter_key, in_use)
                    except Exception as e:
                        self._finished_request(req, error=e)
                        continue
                    in_use.add(adapter)
                    req.seqs = [Seq(req, i, adapter, req.matchers[i]) for i in range(req.params.n)]
                    seqs += req.seqs
            if seqs:
                self._prefill(base, batch, seqs)
            if not batch.seqs:
                del self._batches[key]

    def _prefill(self, base: LoadedBase, batch: Batch, seqs: list[Seq]) -> None:
        """Read the prompts (each after its longest cached beginning, see `PrefixCache`) in one
        forward pass, sample each sequence's first token and join the survivors to the batch.

        Rows are left-padded twice: the cached beginnings end together at column C of the cache,
        the rest of the prompts at its end, so each row is [pad, cached, pad, rest]; the mask
        covers both pads and each row's positions count only its own tokens."""
        owners = [s.req.adapter_key for s in seqs]
        hits = [
            None if base.prefix is None else base.prefix.lookup(owner, s.req.prompt)
            for s, owner in zip(seqs, owners, strict=True)
        ]
        cached = [0 if hit is None else hit.shape[3] for hit in hits]
        start = max(cached)  # C
        length = max(len(s.req.prompt) - c for s, c in zip(seqs, cached, strict=True))
        ids = torch.full((len(seqs), length), base.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), start + length), dtype=torch.long)
        for i, (s, c) in enumerate(zip(seqs, cached, strict=True)):
            rest = s.req.prompt[c:]
            ids[i, length - len(rest) :] = torch.tensor(rest)
            mask[i, start - c : start] = 1
            mask[i, start + length - len(rest) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        cache = new_cache(base.model.config, base.kv_dtype)
        if start:  # the cached beginnings become the cache's first `start` positions
            fill_left(cache, hits, start)
        logits = self.runner.forward(base, ids, mask, positions, cache, [s.adapter for s in seqs])
        if base.prefix is not None:
            for i, (s, owner) in enumerate(zip(seqs, owners, strict=True)):
                if base.prefix.missing(owner, s.req.prompt):
                    base.prefix.insert(owner, s.req.prompt, row_kv(cache, mask, i))
        self._sample(base, seqs, logits)
        keep = [i for i, s in enumerate(seqs) if not s.finished and not s.req.cancelled.is_set()]
        self._publish(seqs)
        for req in {id(s.req): s.req for s in seqs if s.req.cancelled.is_set()}.values():
            self._finished_request(req)  # cancelled while its prompt was being read
        if not keep:
            return
        if len(keep) < len(seqs):
            cache, mask = select_rows(cache, mask, keep)
            seqs = [seqs[i] for i in keep]
        # Join the running batch: pad the shorter of the two caches on the left.
        if batch.cache is None:
            batch.cache, batch.mask = cache, mask
        else:
            batch.mask = append_rows(batch.cache, batch.mask, cache, mask)
        batch.seqs += seqs

    def _step(self, key: str) -> None:
        """One decode step for every running sequence of one base."""
        batch = self._batches[key]
        self._drop(key, batch)
        if not batch.seqs:
            return
        base = batch.seqs[0].req.base
        ids = torch.tensor([[s.last] for s in batch.seqs])
        positions = torch.tensor([[s.position] for s in batch.seqs])
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.seqs), 1))], dim=1)
        logits = self.runner.forward(
            base, ids, batch.mask, positions, batch.cache, [s.adapter for s in batch.seqs]
        )
        self._sample(base, batch.seqs, logits)
        self._publish(batch.seqs)
        self._drop(key, batch)

    def _drop(self, key: str, batch: Batch) -> None:
        """Take finished and cancelled sequences out of the batch, freeing their slots."""
        keep = [i for i, s in enumerate(batch.seqs) if not s.finished and not s.req.cancelled.is_set()]
        if len(keep) == len(batch.seqs):
            return
        gone = {id(s.req): s.req for s in batch.seqs if s.req.cancelled.is_set()}
        for req in gone.values():
            self._finished_request(req)
        if not keep:
            del self._batches[key]
        else:
            batch.cache, batch.mask = select_rows(batch.cache, batch.mask, keep)
            batch.seqs = [batch.seqs[i] for i in keep]

    def _sample(self, base: LoadedBase, seqs: list[Seq], logits: torch.Tensor) -> None:
        """Pick each sequence's next token with its own parameters and feed it to the sequence."""
        width = logits.shape[1]
        for i, s in enumerate(seqs):
            adjust_logits(logits[i], s.req.params, counts=s.counts, bias=s.req.bias, matcher=s.matcher)
        tokens = pick_tokens(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs]
        logp = torch.log_softmax(logits[want], dim=-1) if want else None
        for i, s in enumerate(seqs):
            token = tokens[i]
            if s.req.params.logprobs and token not in base.eos_ids:
                entry = token_logprob(logp[want.index(i)], token, s.req.params.top_logprobs, base.bytes_of)
                s.entries.append((len(s.row.text), entry))
            s.row.push(token)
            if s.matcher is not None:
                s.matcher.consume(token, base.eos_ids)
            if s.req.params.frequency_penalty or s.req.params.presence_penalty:
                if s.counts is None:
                    s.counts = torch.zeros(width)
                s.counts[token] += 1
            s.last = token
            s.position += 1
            if not s.finished and s.row.completion_tokens >= s.req.max_new:
                s.row.end()

    # ---- handing out results ---------------------------------------------------------------------

    def _publish(self, seqs: list[Seq]) -> None:
        """Hand each request the text its sequences produced this step; Usage once all are done."""
        for req in {id(s.req): s.req for s in seqs}.values():
            if req.cancelled.is_set() or req.done:
                continue
            for s in req.seqs:
                text = s.row.take()
                limit = len(s.row.text) if s.finished else s.row.sent
                upto = s.handed
                while upto < len(s.entries) and s.entries[upto][0] < limit:
                    upto += 1
                entries = [e for _, e in s.entries[s.handed : upto]]
                s.handed = upto
                if text or entries:
                    req.on_event(
                        Delta(index=s.index, text=text, finish_reason=None, logprobs=entries or None)
                    )
                if s.finished and not s.announced:
                    s.announced = True
                    req.on_event(Delta(index=s.index, text="", finish_reason=s.row.finish_reason))
            if all(s.announced for s in req.seqs):
                self._finished_request(req, usage=True)

    def _finished_request(
        self, req: Request, *, usage: bool = False, error: BaseException | None = None
    ) -> None:
        if not req.done:
            if error is not None:
                req.fail(error)
            else:
                req.done = True
                if usage:
                    req.on_event(
                        Usage(prompt_tokens=len(req.prompt), completion_tokens=req.completion_tokens)
                    )
            with self._lock:
                self._active -= req.params.n
