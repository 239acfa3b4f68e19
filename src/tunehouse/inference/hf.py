"""The embedded transformers engine: CPU or one GPU, step-level (continuous) batching, LoRA adapters.

One scheduler thread per engine owns the models. Requests are queued by `submit` (which validates
them first, in the caller's thread) and the thread loops:

  1. admit waiting requests: load their base model and adapter if needed, prefill their prompts
     together (left-padded; each from the end of its longest beginning in the prefix cache,
     `tunehouse.inference.prefix`), sample each sequence's first token, and join them to the
     running batch of that base (its KV cache padded on the left to a common length);
  2. one decode step for every active sequence of a base, in one forward pass, whatever adapter
     each one uses (`tunehouse.inference.lora`: every loaded adapter sits in a slot of each
     LoRA-targeted layer and a per-row mask picks it; the base model is slot -1), through
     `tunehouse.inference.decode` where the architecture allows (Llama), else transformers' forward;
  3. sample each sequence with its own parameters (penalties, logit_bias, grammar mask,
     temperature, top_p, its own seeded generator), hand out the new text, and drop the sequences
     that finished or whose request was cancelled (a closed stream), so their slots free at once.

A new request therefore waits at most one step, never for a running batch to finish.

Each base model is loaded once; fine-tuned (LoRA) adapters are read from the folders PEFT saved on
first use into a slot of their base and kept in an LRU of at most `max_adapters` per base (an adapter
that running sequences use is never evicted). A fully fine-tuned checkpoint (a whole model folder) is
served as a base model of its own.

Prompts are rendered exactly as training renders them (`tunehouse.data.chat`): the base model's own
chat template, text content, `developer` as `system`; tools through the template when it handles
them, else as a system preamble (`tunehouse.data.chat.with_preamble`, as in training).

Text is decoded incrementally (the prefix/read-offset scheme vLLM uses), so streamed pieces never
split a multi-byte character and their concatenation is exactly the non-streamed text. Stop
strings are checked as text arrives. `response_format` and forced tool calls are enforced by a
per-sequence grammar matcher that masks every token the grammar does not allow next
(`tunehouse.inference.constrained`, llguidance).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer

from tunehouse.data.chat import normalize_messages, render, template_supports_tools, with_preamble
from tunehouse.hardware import cpu_has_fast_bf16
from tunehouse.inference.constrained import GrammarMatcher, build_tokenizer, validate_response_format
from tunehouse.inference.decode import LlamaDecoder, fast_decoder
from tunehouse.inference.engine import (
    ChatResult,
    Choice,
    ContextLengthExceeded,
    Delta,
    Event,
    InferenceEngine,
    InvalidLogitBias,
    ModelRef,
    PartialChoice,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tunehouse.inference.lora import MultiLora
from tunehouse.inference.prefix import PrefixCache
from tunehouse.inference.quantize import CALIBRATION_CHAT, int8_supported, quantize_int8

log = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


# --------------------------------------------------------------------------------------------------
# Incremental detokenization with stop strings


class _Row:
    """One generated sequence: its tokens, its text so far, and how much of it was handed out."""

    def __init__(self, tokenizer, stop: list[str], eos_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        self.announced = False  # the finishing Delta was handed out

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> None:
        if self.finish_reason is not None:
            return  # padding after the end
        if token_id in self.eos_ids:
            self._finish("stop")
            return
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new = self._decode(self.ids[self.prefix_offset :])
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the tokens that complete it.
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self._append(new[len(prefix) :])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"

    def _finish(self, reason: str) -> None:
        """Flush tokens still held back (an incomplete character at the very end) and finish."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            new = self._decode(self.ids[self.prefix_offset :])
            self.read_offset = len(self.ids)
            if len(new) > len(prefix):
                self._append(new[len(prefix) :])
        if self.finish_reason is None:
            self.finish_reason = reason

    def end(self) -> None:
        """Generation is over: a row that did not stop on its own ran out of tokens."""
        if self.finish_reason is None:
            self._finish("length")

    def take(self) -> str:
        """Text that can be handed out now: everything once finished, else all but a tail that
        could still become a stop string."""
        upto = len(self.text)
        if self.finish_reason is None and self.max_stop > 1:
            tail = self.text[-(self.max_stop - 1) :]
            for k in range(len(tail), 0, -1):
                if any(s.startswith(tail[-k:]) for s in self.stop):
                    upto -= k
                    break
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out


# --------------------------------------------------------------------------------------------------
# Loaded models


@dataclass
class _Base:
    path: Path
    tokenizer: Any
    has_tools: bool
    max_context: int
    eos_ids: frozenset[int]
    pad_id: int
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    model: Any = None  # the transformers model (its LoRA-targeted layers wrapped once adapters load)
    lora: MultiLora | None = None  # the loaded adapters, created with the model
    decoder: LlamaDecoder | None = None  # the fast decode step, where the architecture has one
    kv_dtype: torch.dtype | None = None  # the KV cache's, where it differs from the model's
    prefix: PrefixCache | None = None  # KV of prompt beginnings read before, where enabled and possible
    adapters: OrderedDict[str, int] = field(default_factory=OrderedDict)  # adapter folder → slot, LRU order
    grammar_tokenizer: Any = None  # llguidance's view of the tokenizer, built on first structured request
    token_bytes: dict[int, bytes] = field(default_factory=dict)  # for logprobs


def _max_context(config, tokenizer) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return 2048


def _full_weights_as_base(model: ModelRef) -> ModelRef:
    """A fully fine-tuned model's checkpoint is a whole model folder (config.json, safetensors,
    tokenizer; no adapter_config.json): it is served as a base model of its own."""
    folder = model.adapter_path
    if folder is None or (Path(folder) / "adapter_config.json").is_file():
        return model
    if not (Path(folder) / "config.json").is_file():
        return model  # neither: submit reports the missing adapter
    return ModelRef(name=model.name, base_path=Path(folder))


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


# --------------------------------------------------------------------------------------------------
# Requests and sequences


class _Seq:
    """One generated sequence (one choice of one request) in a running batch."""

    def __init__(self, req: _Request, index: int, adapter: int, matcher: GrammarMatcher | None):
        self.req = req
        self.index = index
        self.adapter = adapter  # the adapter's slot in the base's MultiLora, -1 for the base model
        self.matcher = matcher
        self.row = _Row(req.base.tokenizer, req.stop, req.base.eos_ids)
        seed = req.params.seed
        # Each choice draws from its own generator: same seed, same answers, whatever else is in
        # the batch; different choices of one request differ.
        self.generator = torch.Generator().manual_seed(
            (seed * 1_000_003 + index) % 2**63 if seed is not None else random.getrandbits(63)
        )
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


class _Request:
    """A submitted request: what the scheduler needs to run it, and the handle its caller holds."""

    def __init__(
        self,
        base: _Base,
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
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = sorted(params.logit_bias)
            self.bias = (torch.tensor(ids), torch.tensor([float(params.logit_bias[i]) for i in ids]))
        self.matchers: list[GrammarMatcher | None] = [None] * params.n
        self.seqs: list[_Seq] = []
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
class _Batch:
    """The running sequences of one base model and their KV cache, left-padded to one length."""

    seqs: list[_Seq] = field(default_factory=list)
    cache: Any = None  # DynamicCache, batch dimension in the order of `seqs`
    mask: torch.Tensor | None = None  # [batch, cache length]: 0 over the left padding


class _GrowingLayer(DynamicLayer):
    """A KV cache layer that appends in place into spare capacity, doubling it when full.

    transformers' `DynamicLayer` concatenates its whole cache with each new token, so a decode step
    copies every layer's cache: at a batch of 16 that copying cost more than the model's matmuls.
    Here `keys`/`values` are views of the first positions of larger buffers; assigning them (joining
    and dropping rows) replaces the buffers.

    The buffers are position-major, [capacity, batch, KV heads, head dim], and `keys`/`values` are
    permuted views of them in transformers' layout [batch, KV heads, length, head dim]. Batch-major
    buffers would leave the capacity's spare positions between each row's used ones, and PyTorch's
    CPU `bmm` reads such gapped batches far more slowly than the decode step's attention reads
    position-major ones (16 rows, 85 of 128 positions, 30 layers out of cache: 209 against 167 µs
    a layer for both matmuls, best of 30); each step's new position is also one contiguous write.

    `store_dtype` keeps the cache in another dtype than the model's: fp32 for bf16 models on a CPU,
    whose decode step (`tunehouse.inference.decode`) attends in fp32 because PyTorch's bf16 CPU
    kernels are slow there (see `LlamaDecoder._attend`). It costs twice the cache memory."""

    def __init__(self, store_dtype: torch.dtype | None = None, **kwargs):
        self._k: torch.Tensor | None = None  # [capacity, batch, KV heads, head dim]
        self._v: torch.Tensor | None = None
        self._k_len = self._v_len = 0  # separate: the scheduler assigns keys, then values
        self.store_dtype = store_dtype
        super().__init__(**kwargs)

    @staticmethod
    def _view(buffer: torch.Tensor | None, length: int) -> torch.Tensor | None:
        return None if buffer is None else buffer[:length].permute(1, 2, 0, 3)

    @staticmethod
    def _buffer(value: torch.Tensor) -> torch.Tensor:
        return value.permute(2, 0, 1, 3).contiguous()  # no copy when `value` is such a view already

    @property
    def keys(self):  # type: ignore[override]
        return self._view(self._k, self._k_len)

    @keys.setter
    def keys(self, value):
        self._k, self._k_len = (None, 0) if value is None else (self._buffer(value), value.shape[-2])

    @property
    def values(self):  # type: ignore[override]
        return self._view(self._v, self._v_len)

    @values.setter
    def values(self, value):
        self._v, self._v_len = (None, 0) if value is None else (self._buffer(value), value.shape[-2])

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = self.store_dtype or key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=self.dtype)
        self.values = value_states.new_empty(
            (*value_states.shape[:2], 0, value_states.shape[-1]), dtype=self.dtype
        )
        self.is_initialized = True

    @staticmethod
    def _append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> torch.Tensor:
        end = length + new.shape[-2]
        if end > buffer.shape[0]:
            grown = buffer.new_empty((max(2 * buffer.shape[0], end, 64), *buffer.shape[1:]))
            grown[:length] = buffer[:length]
            buffer = grown
        buffer[length:end] = new.permute(2, 0, 1, 3)
        return buffer

    def append(self, key_states, value_states) -> tuple[torch.Tensor, torch.Tensor]:
        """Add positions; the whole cache, in its own dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k = self._append(self._k, self._k_len, key_states)
        self._v = self._append(self._v, self._v_len, value_states)
        self._k_len += key_states.shape[-2]
        self._v_len += value_states.shape[-2]
        return self.keys, self.values

    def update(self, key_states, value_states, *args, **kwargs):
        """transformers' call: the whole cache in the model's dtype."""
        fresh = self.get_seq_length() == 0
        keys, values = self.append(key_states, value_states)
        if keys.dtype == key_states.dtype:
            return keys, values
        if fresh:  # a prompt into an empty cache (the engine's prefill): it is the whole cache
            return key_states, value_states
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def get_seq_length(self) -> int:
        return self._k_len if self.is_initialized else 0


def _new_cache(config, store_dtype: torch.dtype | None = None) -> DynamicCache:
    cache = DynamicCache(config=config)
    # Plain full-attention layers grow in place; others (sliding windows) keep transformers' own.
    cache.layers = [
        _GrowingLayer(store_dtype) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def argmax_rows(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of a [rows, vocabulary] tensor, same answer (the first of equal
    maxima; NaN counts as the largest), several times faster on a CPU: PyTorch's argmax kernel is
    not vectorised (16 rows of 49,152: 350 µs, against 24 µs for `amax`), so the maximum of each
    block of columns is found with `amax`, then the argmax runs inside the one block per row that
    holds the row's maximum. When the width is not a multiple of `block`, the columns past the last
    whole block are searched as the `block` columns that end the row: the columns that window shares
    with the block before it all hold less than the maximum it was picked for."""
    rows, width = logits.shape
    n = width // block
    if n < 2:
        return logits.argmax(dim=-1)
    peaks = logits[:, : n * block].reshape(rows, n, block).amax(dim=-1)  # a view when rows are contiguous
    if n * block < width:
        peaks = torch.cat([peaks, logits[:, n * block :].amax(dim=-1, keepdim=True)], dim=1)
    start = (peaks.argmax(dim=-1) * block).clamp_(max=width - block)
    window = logits.gather(1, start[:, None] + torch.arange(block, device=logits.device))
    return start + window.argmax(dim=-1)


def _clamp(x: float) -> float:
    return -9999.0 if x == float("-inf") else x  # what OpenAI reports for impossible tokens


# --------------------------------------------------------------------------------------------------
# The engine


class HFEngine(InferenceEngine):
    def __init__(
        self,
        *,
        dtype: str = "auto",
        max_adapters: int = 8,
        device: str = "auto",
        max_batch_size: int = 64,
        quantization: str = "none",
        prefix_cache_mb: int = 256,
    ):
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        if prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb must be 0 (off) or more")
        self.device = resolve_device(device)
        if quantization not in ("none", "int8"):
            raise ValueError(f"unknown quantization {quantization!r}; use none or int8")
        if quantization == "int8":
            # int8 matmuls with fp32 around them (see quantize.py), whatever the CPU's bf16 support.
            if not int8_supported(self.device):
                raise ValueError(f"int8 quantization needs an x86 CPU with fbgemm (here: {self.device.type})")
            if dtype != "auto" and resolve_dtype(dtype, self.device) != torch.float32:
                raise ValueError(f"int8 quantization computes in float32; dtype {dtype} cannot go with it")
            dtype = "float32"
        self.dtype = resolve_dtype(dtype, self.device)
        self.quantization = quantization
        self.max_adapters = max_adapters
        self.max_batch_size = max_batch_size
        self.prefix_cache_bytes = prefix_cache_mb * 2**20
        self._bases: dict[str, _Base] = {}
        self._lock = threading.Lock()  # guards _bases and starting the scheduler
        self._incoming: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: deque[_Request] = deque()  # admitted when the batch has room (scheduler only)
        self._batches: dict[str, _Batch] = {}  # base key → running batch (scheduler only)
        self._active = 0  # sequences queued or running
        self._thread: threading.Thread | None = None
        self._closed = False
        log.info(
            "transformers engine on %s in %s%s",
            self.device,
            str(self.dtype).removeprefix("torch."),
            ", int8 matmuls" if quantization == "int8" else "",
        )

    # ---- public API: prompts ---------------------------------------------------------------------

    def encode_chat(self, model: ModelRef, messages: list[dict], *, tools: list | None = None) -> list[int]:
        model = _full_weights_as_base(model)
        return self._prompt_ids(self._base(model.base_path), messages, tools)

    def count_prompt_tokens(self, model: ModelRef, messages: list[dict], *, tools: list | None = None) -> int:
        return len(self.encode_chat(model, messages, tools=tools))

    def encode_text(self, model: ModelRef, text: str) -> list[int]:
        base = self._base(_full_weights_as_base(model).base_path)
        with base.tokenizer_lock:
            return base.tokenizer(text)["input_ids"]

    def decode(self, model: ModelRef, ids: list[int]) -> str:
        base = self._base(_full_weights_as_base(model).base_path)
        with base.tokenizer_lock:
            return base.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def vocab_size(self, model: ModelRef) -> int:
        return len(self._base(_full_weights_as_base(model).base_path).tokenizer)

    # ---- public API: generation ------------------------------------------------------------------

    def submit(
        self, model: ModelRef, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> _Request:
        model = _full_weights_as_base(model)
        base = self._base(model.base_path)
        max_new = self._max_new_tokens(base, len(prompt), params)
        if not prompt:
            raise ValueError("The prompt is empty.")
        grammar = params.grammar or validate_response_format(params.response_format)
        vocab = len(base.tokenizer)
        for token in params.logit_bias:
            if not 0 <= token < vocab:
                raise InvalidLogitBias(f"Invalid 'logit_bias': {token} is not a token id of this model.")
        if (
            model.adapter_path is not None
            and not (Path(model.adapter_path) / "adapter_config.json").is_file()
        ):
            raise FileNotFoundError(
                f"adapter folder not found or has no adapter_config.json: {model.adapter_path}"
            )
        req = _Request(base, model.adapter_path, list(prompt), params, max_new, grammar, on_event)
        if grammar is not None or params.logprobs:
            self._grammar_tokenizer(base)  # ~0.3 s once per base: here rather than in the scheduler
        if grammar is not None:
            req.matchers = [GrammarMatcher(base.grammar_tokenizer, grammar) for _ in range(params.n)]
        with self._lock:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self._active += params.n
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tunehouse-scheduler", daemon=True)
                self._thread.start()
        self._incoming.put(req)
        return req

    def generate(self, model: ModelRef, prompt: list[int], params: SamplingParams) -> ChatResult:
        parts = [PartialChoice(i) for i in range(params.n)]
        usage = None
        for item in self.stream(model, prompt, params):
            if isinstance(item, Usage):
                usage = item
            else:
                parts[item.index].add(item)
        choices = [
            Choice(
                index=p.index,
                text=p.text,
                finish_reason=p.finish_reason or "length",
                logprobs=p.logprobs if params.logprobs else None,
            )
            for p in parts
        ]
        return ChatResult(
            choices=choices, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens
        )

    def stream(self, model: ModelRef, prompt: list[int], params: SamplingParams) -> Iterator[Delta | Usage]:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self.submit(model, prompt, params, events.put)  # validates now, before any iteration
        return self._drain(events, handle)

    @staticmethod
    def _drain(events: queue.SimpleQueue, handle: _Request) -> Iterator[Delta | Usage]:
        try:
            while True:
                item = events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Usage):
                    return
        finally:
            handle.cancel()  # a no-op once finished; frees the slots of an abandoned stream

    def chat(
        self, model: ModelRef, messages: list[dict], params: SamplingParams, *, tools: list | None = None
    ) -> ChatResult:
        return self.generate(model, self.encode_chat(model, messages, tools=tools), params)

    def chat_stream(
        self, model: ModelRef, messages: list[dict], params: SamplingParams, *, tools: list | None = None
    ) -> Iterator[Delta | Usage]:
        return self.stream(model, self.encode_chat(model, messages, tools=tools), params)

    def active_sequences(self) -> int:
        return self._active

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._incoming.put(None)
        if thread is not None:
            thread.join(timeout=60)
        with self._lock:
            bases, self._bases = list(self._bases.values()), {}
        for base in bases:
            base.model = base.prefix = None
            base.adapters.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- prompt ----------------------------------------------------------------------------------

    def _base(self, path: Path) -> _Base:
        key = str(Path(path).resolve())
        with self._lock:
            base = self._bases.get(key)
            if base is None:
                if not Path(key).is_dir():
                    raise FileNotFoundError(f"base model folder not found: {path}")
                tokenizer = AutoTokenizer.from_pretrained(key)
                config = AutoConfig.from_pretrained(key)
                eos = _as_ids(getattr(config, "eos_token_id", None))
                with contextlib.suppress(OSError):
                    eos += _as_ids(GenerationConfig.from_pretrained(key).eos_token_id)
                eos += _as_ids(tokenizer.eos_token_id)
                if not eos:
                    raise ValueError(f"{path}: the model defines no end-of-sequence token")
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
                base = _Base(
                    path=Path(key),
                    tokenizer=tokenizer,
                    has_tools=template_supports_tools(tokenizer),
                    max_context=_max_context(config, tokenizer),
                    eos_ids=frozenset(eos),
                    pad_id=pad,
                )
                self._bases[key] = base
            return base

    def _prompt_ids(self, base: _Base, messages: list[dict], tools: list | None) -> list[int]:
        msgs = normalize_messages(messages, template_has_tools=base.has_tools)
        if tools and not base.has_tools:
            msgs, tools = with_preamble(msgs, tools), None
        with base.tokenizer_lock:  # encoding may reconfigure the Rust tokenizer ("Already borrowed")
            text = render(base.tokenizer, msgs, add_generation_prompt=True, tools=tools)
            return base.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _grammar_tokenizer(self, base: _Base):
        with base.tokenizer_lock:
            if base.grammar_tokenizer is None:
                base.grammar_tokenizer = build_tokenizer(base.tokenizer, base.eos_ids)
            return base.grammar_tokenizer

    def _max_new_tokens(self, base: _Base, n_prompt: int, params: SamplingParams) -> int:
        if params.n < 1:
            raise ValueError("n must be at least 1")
        if params.max_tokens is not None and params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if params.max_tokens is None:
            if n_prompt >= base.max_context:
                raise ContextLengthExceeded(max_context=base.max_context, prompt_tokens=n_prompt)
            return base.max_context - n_prompt
        if n_prompt + params.max_tokens > base.max_context:
            raise ContextLengthExceeded(
                max_context=base.max_context, prompt_tokens=n_prompt, max_tokens=params.max_tokens
            )
        return params.max_tokens

    # ---- models and adapters (scheduler thread only) ---------------------------------------------

    def _ensure_model(self, base: _Base) -> None:
        if base.model is not None:
            return
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=self.dtype)
        model.to(self.device).eval().requires_grad_(False)
        if self.quantization == "int8":
            quantize_int8(model, self._prompt_ids(base, CALIBRATION_CHAT, None))
        head = model.get_output_embeddings()
        if head is not None:
            # The head sees the last position of each row, a strided slice; as such matmul can take a
            # batched path that copies the whole (vocabulary-sized) weight once per row: seconds for
            # a batch of prompts. Contiguous, it is one plain matmul.
            head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        base.model = model
        base.lora = MultiLora(model, self.max_adapters)
        base.decoder = fast_decoder(model)
        if base.decoder is not None and self.device.type == "cpu" and self.dtype != torch.float32:
            base.kv_dtype = torch.float32  # see `_GrowingLayer`
        # Cached beginnings go into a prompt's cache as its first positions: only where every layer
        # keeps all positions (no sliding windows).
        if self.prefix_cache_bytes and all(
            type(layer) is _GrowingLayer for layer in _new_cache(model.config).layers
        ):
            base.prefix = PrefixCache(self.prefix_cache_bytes)
        log.info("loaded base model %s in %.1f s", base.path, time.perf_counter() - t0)

    def _ensure_adapter(self, base: _Base, key: str | None, in_use: set[int]) -> int:
        """The slot of a request's adapter (`_Request.adapter_key`), loading it (and evicting the
        least recently used adapter no running sequence needs) if it is not loaded; -1 for the base
        model."""
        if key is None:
            return -1
        slot = base.adapters.get(key)
        if slot is not None:
            base.adapters.move_to_end(key)
            return slot
        if not (Path(key) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter folder not found or has no adapter_config.json: {key}")
        t0 = time.perf_counter()
        # Evict first, so the new adapter can take a freed slot rather than a new one.
        for old_key, old_slot in list(base.adapters.items()):
            if len(base.adapters) < self.max_adapters:
                break
            if old_slot in in_use:
                continue  # running sequences need it: evicted once they finish
            del base.adapters[old_key]
            base.lora.unload(old_slot)
            if base.prefix is not None:
                base.prefix.drop(old_key)
            log.info("evicted adapter %s (slot %d)", old_key, old_slot)
        slot = base.lora.load(Path(key))
        base.adapters[key] = slot
        log.info("loaded adapter %s into slot %d in %.2f s", key, slot, time.perf_counter() - t0)
        return slot

    def _forward(self, base: _Base, ids, mask, positions, cache, adapters: list[int]) -> torch.Tensor:
        """One forward pass over a batch; the logits of each row's last position, in fp32."""
        base.lora.set_rows(adapters)
        if ids.shape[1] == 1 and base.decoder is not None:  # a decode step
            logits = base.decoder.step(
                ids.to(self.device), positions.to(self.device), mask.to(self.device), cache
            )
            return logits.float().cpu()
        out = base.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float().cpu()

    # ---- the scheduler ---------------------------------------------------------------------------

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
        groups: dict[str, list[_Request]] = {}
        while self._waiting and (room >= self._waiting[0].params.n or room == self.max_batch_size):
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._finished_request(req)
                continue
            room -= req.params.n
            groups.setdefault(str(req.base.path), []).append(req)
        for key, reqs in groups.items():
            base = reqs[0].base
            batch = self._batches.setdefault(key, _Batch())
            seqs: list[_Seq] = []
            with torch.inference_mode(False):  # weights loaded here must be ordinary tensors
                try:
                    self._ensure_model(base)
                except Exception as e:
                    for req in reqs:
                        self._finished_request(req, error=e)
                    continue
                in_use = {s.adapter for s in batch.seqs}
                for req in reqs:
                    try:
                        adapter = self._ensure_adapter(base, req.adapter_key, in_use)
                    except Exception as e:
                        self._finished_request(req, error=e)
                        continue
                    in_use.add(adapter)
                    req.seqs = [_Seq(req, i, adapter, req.matchers[i]) for i in range(req.params.n)]
                    seqs += req.seqs
            if seqs:
                self._prefill(base, batch, seqs)
            if not batch.seqs:
                del self._batches[key]

    def _prefill(self, base: _Base, batch: _Batch, seqs: list[_Seq]) -> None:
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
        cache = _new_cache(base.model.config, base.kv_dtype)
        if start:  # the cached beginnings become the cache's first `start` positions
            longest = hits[cached.index(start)]
            layers, _, heads, _, dim = longest.shape
            kv = longest.new_zeros((layers, 2, len(seqs), heads, start, dim))
            for i, hit in enumerate(hits):
                if hit is not None:
                    kv[:, :, i, :, start - cached[i] :] = hit
            for layer, (keys, values) in zip(cache.layers, kv, strict=True):
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        logits = self._forward(base, ids, mask, positions, cache, [s.adapter for s in seqs])
        if base.prefix is not None:
            for i, (s, owner) in enumerate(zip(seqs, owners, strict=True)):
                if base.prefix.missing(owner, s.req.prompt):
                    base.prefix.insert(owner, s.req.prompt, self._prompt_kv(cache, mask, i))
        self._sample(base, seqs, logits)
        keep = [i for i, s in enumerate(seqs) if not s.finished and not s.req.cancelled.is_set()]
        self._publish(seqs)
        for req in {id(s.req): s.req for s in seqs if s.req.cancelled.is_set()}.values():
            self._finished_request(req)  # cancelled while its prompt was being read
        if not keep:
            return
        if len(keep) < len(seqs):
            cache, mask = self._select(cache, mask, keep)
            seqs = [seqs[i] for i in keep]
        # Join the running batch: pad the shorter of the two caches on the left.
        if batch.cache is None:
            batch.cache, batch.mask = cache, mask
        else:
            total = max(batch.mask.shape[1], mask.shape[1])
            for old, new in zip(batch.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, total, 2), _left_pad(new.keys, total, 2)])
                old.values = torch.cat([_left_pad(old.values, total, 2), _left_pad(new.values, total, 2)])
            batch.mask = torch.cat([_left_pad(batch.mask, total, 1), _left_pad(mask, total, 1)])
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
        logits = self._forward(base, ids, batch.mask, positions, batch.cache, [s.adapter for s in batch.seqs])
        self._sample(base, batch.seqs, logits)
        self._publish(batch.seqs)
        self._drop(key, batch)

    def _drop(self, key: str, batch: _Batch) -> None:
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
            batch.cache, batch.mask = self._select(batch.cache, batch.mask, keep)
            batch.seqs = [batch.seqs[i] for i in keep]

    @staticmethod
    def _prompt_kv(cache, mask: torch.Tensor, row: int) -> torch.Tensor:
        """Row `row`'s keys and values after its prefill, padding left out: [layers, 2, kv heads,
        prompt length, head dim]."""
        index = mask[row].nonzero().squeeze(1).to(cache.layers[0].keys.device)
        return torch.stack(
            [
                torch.stack(
                    [layer.keys[row].index_select(1, index), layer.values[row].index_select(1, index)]
                )
                for layer in cache.layers
            ]
        )

    @staticmethod
    def _select(cache, mask: torch.Tensor, keep: list[int]):
        index = torch.tensor(keep, device=mask.device)
        mask = mask.index_select(0, index)
        # Columns that are padding in every remaining row are dropped from the left.
        start = int(mask.any(0).long().argmax())
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, start:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, start:]
        return cache, mask[:, start:]

    # ---- sampling --------------------------------------------------------------------------------

    def _sample(self, base: _Base, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each sequence's next token with its own parameters and feed it to the sequence."""
        width = logits.shape[1]
        for i, s in enumerate(seqs):
            p = s.req.params
            if s.counts is not None and (p.frequency_penalty or p.presence_penalty):
                logits[i] -= s.counts * p.frequency_penalty + (s.counts > 0).float() * p.presence_penalty
            if s.req.bias is not None:
                ids, values = s.req.bias
                logits[i, ids] += values
            if s.matcher is not None:
                allowed = s.matcher.allowed(width)
                if allowed is not None:
                    logits[i].masked_fill_(~torch.from_numpy(allowed), float("-inf"))
        tokens = argmax_rows(logits).tolist()  # greedy rows keep this
        sampled = [i for i, s in enumerate(seqs) if s.req.params.temperature > 0]
        if sampled:
            temps = torch.tensor([seqs[i].req.params.temperature for i in sampled]).unsqueeze(1)
            probs = torch.softmax(logits[sampled] / temps, dim=-1)
            for row, i in zip(probs, sampled, strict=True):
                top_p = seqs[i].req.params.top_p
                if top_p < 1.0:
                    sorted_p, order = row.sort(descending=True)
                    # Keep the smallest set of most likely tokens whose mass reaches top_p.
                    sorted_p[(sorted_p.cumsum(0) - sorted_p) >= top_p] = 0.0
                    pick = order[torch.multinomial(sorted_p, 1, generator=seqs[i].generator)]
                else:
                    pick = torch.multinomial(row, 1, generator=seqs[i].generator)
                tokens[i] = int(pick)
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs]
        logp = torch.log_softmax(logits[want], dim=-1) if want else None
        for i, s in enumerate(seqs):
            token = tokens[i]
            if s.req.params.logprobs and token not in base.eos_ids:
                s.entries.append((len(s.row.text), self._logprob(base, logp[want.index(i)], token, s)))
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

    def _logprob(self, base: _Base, logp: torch.Tensor, token: int, s: _Seq) -> TokenLogprob:
        k = s.req.params.top_logprobs
        top = []
        if k:
            values, ids = logp.topk(k)
            top = [self._top(base, int(t), float(v)) for v, t in zip(values, ids, strict=True)]
        entry = self._top(base, token, float(logp[token]))
        return TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=top)

    @staticmethod
    def _top(base: _Base, token: int, logprob: float) -> TopLogprob:
        raw = base.token_bytes.get(token)
        if raw is None:
            raw = base.token_bytes[token] = base.grammar_tokenizer.decode_bytes([token])
        return TopLogprob(
            token=raw.decode("utf-8", errors="replace"), logprob=_clamp(logprob), bytes=list(raw)
        )

    # ---- handing out results ---------------------------------------------------------------------

    def _publish(self, seqs: list[_Seq]) -> None:
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
        self, req: _Request, *, usage: bool = False, error: BaseException | None = None
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
