"""The embedded transformers engine: CPU or one GPU, step-level (continuous) batching, LoRA adapters.

`HFEngine` is what the API calls (`tunehouse.inference.engine.InferenceEngine`): it renders and
validates requests in the caller's thread and queues them for its scheduler
(`tunehouse.inference.scheduler`), whose thread batches every running sequence of a base into one
forward pass per step, so a new request waits at most one step, never for a running batch to finish.
The engine owns the models the scheduler runs:

* each base model is loaded once (`tunehouse.inference.models.LoadedBase`); the decode step goes
  through `tunehouse.inference.decode` where the architecture allows (Llama), else transformers'
  forward, on a KV cache that grows in place (`tunehouse.inference.cache`);
* fine-tuned (LoRA) adapters are read from the folders PEFT saved on first use into a slot of their
  base (`tunehouse.inference.lora`: every loaded adapter sits in a slot of each LoRA-targeted layer
  and a per-row mask picks it; the base model is slot -1) and kept in an LRU of at most
  `max_adapters` per base (an adapter that running sequences use is never evicted). A fully
  fine-tuned checkpoint (a whole model folder) is served as a base model of its own.

Prompts are rendered exactly as training renders them (`tunehouse.data.chat`): the base model's own
chat template, text content, `developer` as `system`; tools through the template when it handles
them, else as a system preamble (`tunehouse.data.chat.with_preamble`, as in training).

Text is decoded incrementally (`tunehouse.inference.detokenize`), so streamed pieces never split a
multi-byte character and their concatenation is exactly the non-streamed text; stop strings are
checked as text arrives. `response_format` and forced tool calls are enforced by a per-sequence
grammar matcher that masks every token the grammar does not allow next
(`tunehouse.inference.constrained`, llguidance; applied in `tunehouse.inference.sampling`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tunehouse.config import Settings
from tunehouse.data.chat import normalize_messages, render, template_supports_tools, with_preamble
from tunehouse.hardware import resolve_device, resolve_dtype
from tunehouse.inference.cache import GrowingLayer, new_cache
from tunehouse.inference.constrained import GrammarMatcher, build_tokenizer, validate_response_format
from tunehouse.inference.decode import fast_decoder
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
    Usage,
)
from tunehouse.inference.lora import MultiLora
from tunehouse.inference.models import LoadedBase, max_context, stop_token_ids
from tunehouse.inference.prefix import PrefixCache
from tunehouse.inference.quantize import CALIBRATION_CHAT, int8_supported, quantize_int8
from tunehouse.inference.scheduler import Request, Scheduler

log = logging.getLogger(__name__)


def _full_weights_as_base(model: ModelRef) -> ModelRef:
    """A fully fine-tuned model's checkpoint is a whole model folder (config.json, safetensors,
    tokenizer; no adapter_config.json): it is served as a base model of its own."""
    folder = model.adapter_path
    if folder is None or (Path(folder) / "adapter_config.json").is_file():
        return model
    if not (Path(folder) / "config.json").is_file():
        return model  # neither: submit reports the missing adapter
    return ModelRef(name=model.name, base_path=Path(folder))


class HFEngine(InferenceEngine):
    """The transformers engine: validates and renders requests, owns the models, and runs its
    `Scheduler` as that scheduler's `ModelRunner` (`ensure_model`, `ensure_adapter`, `forward`)."""

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
        self._bases: dict[str, LoadedBase] = {}
        self._lock = threading.Lock()  # guards _bases
        self.scheduler = Scheduler(self, max_batch_size)
        log.info(
            "transformers engine on %s in %s%s",
            self.device,
            str(self.dtype).removeprefix("torch."),
            ", int8 matmuls" if quantization == "int8" else "",
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> HFEngine:
        """The engine as a server or a job's process configures it (dtype, adapters, cache)."""
        return cls(
            dtype=settings.dtype,
            max_adapters=settings.inference_max_adapters,
            prefix_cache_mb=settings.inference_prefix_cache_mb,
            quantization=settings.inference_quantization,
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
    ) -> Request:
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
        req = Request(base, model.adapter_path, list(prompt), params, max_new, grammar, on_event)
        if grammar is not None or params.logprobs:
            self._grammar_tokenizer(base)  # ~0.3 s once per base: here rather than in the scheduler
        if grammar is not None:
            req.matchers = [GrammarMatcher(base.grammar_tokenizer, grammar) for _ in range(params.n)]
        self.scheduler.submit(req)
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
    def _drain(events: queue.SimpleQueue, handle: Request) -> Iterator[Delta | Usage]:
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
        return self.scheduler.active_sequences()

    def close(self) -> None:
        self.scheduler.close()
        with self._lock:
            bases, self._bases = list(self._bases.values()), {}
        for base in bases:
            base.model = base.prefix = None
            base.adapters.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- prompt ----------------------------------------------------------------------------------

    def _base(self, path: Path) -> LoadedBase:
        key = str(Path(path).resolve())
        with self._lock:
            base = self._bases.get(key)
            if base is None:
                if not Path(key).is_dir():
                    raise FileNotFoundError(f"base model folder not found: {path}")
                tokenizer = AutoTokenizer.from_pretrained(key)
                config = AutoConfig.from_pretrained(key)
                generation = None
                with contextlib.suppress(OSError):
                    generation = GenerationConfig.from_pretrained(key)
                eos = stop_token_ids(config, generation, tokenizer)
                if not eos:
                    raise ValueError(f"{path}: the model defines no end-of-sequence token")
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
                base = LoadedBase(
                    path=Path(key),
                    tokenizer=tokenizer,
                    has_tools=template_supports_tools(tokenizer),
                    max_context=max_context(config, tokenizer),
                    eos_ids=frozenset(eos),
                    pad_id=pad,
                )
                self._bases[key] = base
            return base

    def _prompt_ids(self, base: LoadedBase, messages: list[dict], tools: list | None) -> list[int]:
        msgs = normalize_messages(messages, template_has_tools=base.has_tools)
        if tools and not base.has_tools:
            msgs, tools = with_preamble(msgs, tools), None
        with base.tokenizer_lock:  # encoding may reconfigure the Rust tokenizer ("Already borrowed")
            text = render(base.tokenizer, msgs, add_generation_prompt=True, tools=tools)
            return base.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _grammar_tokenizer(self, base: LoadedBase):
        with base.tokenizer_lock:
            if base.grammar_tokenizer is None:
                base.grammar_tokenizer = build_tokenizer(base.tokenizer, base.eos_ids)
            return base.grammar_tokenizer

    def _max_new_tokens(self, base: LoadedBase, n_prompt: int, params: SamplingParams) -> int:
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

    # ---- models and adapters: the scheduler's ModelRunner (scheduler thread only) ------------------

    def ensure_model(self, base: LoadedBase) -> None:
        """Load the base's weights (quantized, wrapped for adapters, with its fast decoder and prefix
        cache where they apply) if they are not loaded."""
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
            base.kv_dtype = torch.float32  # see `GrowingLayer`
        # Cached beginnings go into a prompt's cache as its first positions: only where every layer
        # keeps all positions (no sliding windows).
        if self.prefix_cache_bytes and all(
            type(layer) is GrowingLayer for layer in new_cache(model.config).layers
        ):
            base.prefix = PrefixCache(self.prefix_cache_bytes)
        log.info("loaded base model %s in %.1f s", base.path, time.perf_counter() - t0)

    def ensure_adapter(self, base: LoadedBase, key: str | None, in_use: set[int]) -> int:
        """The slot of a request's adapter (`Request.adapter_key`), loading it (and evicting the
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

    def forward(self, base: LoadedBase, ids, mask, positions, cache, adapters: list[int]) -> torch.Tensor:
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
