"""The inference engine interface the API calls: what a request asks for, what comes back.

Engines (`hf.HFEngine`, later vLLM) take a prompt (token ids, rendered from chat messages or given
as text) and sampling parameters, and hand back text, token counts and, when asked, log
probabilities; the HTTP layer turns these into `chat.completion` / `text_completion` objects or
SSE chunks. Importing this module must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the client asked for (echoed as the response's `model`)
    base_path: Path  # Hugging Face folder of the base model
    adapter_path: Path | None = None  # PEFT adapter folder for ft: models and checkpoints


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: until EOS or the end of the context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)  # up to 4 strings, excluded from the output
    seed: int | None = None  # same seed + same request => same answer
    # OpenAI's penalties: logit[t] -= count(t) * frequency_penalty + (count(t) > 0) * presence_penalty,
    # counting the tokens this choice generated so far.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    logprobs: bool = False  # report each generated token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives at each position
    # OpenAI's response_format: None or {"type": "text"} for free text; {"type": "json_object"} or
    # {"type": "json_schema", "json_schema": {...}} is enforced by constrained decoding
    # (`tunehouse.inference.constrained`).
    response_format: dict | None = None
    # An llguidance grammar the output must follow (tool calls); takes precedence over response_format.
    grammar: str | None = None


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob:
    """One generated token, as OpenAI's `choice.logprobs.content[i]`."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None  # when SamplingParams.logprobs


@dataclass
class ChatResult:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int  # summed over choices; end-of-turn tokens are not counted


@dataclass
class Delta:
    """A streamed piece of one choice. The last piece of each choice has `finish_reason` set (and
    usually empty text). `logprobs` holds the entries of the tokens whose text is in this piece."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class PartialChoice:
    """One choice gathered from its streamed pieces, for callers that answer with whole choices."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # None until its last piece: then a cut-off counts as "length"

    def add(self, item: Delta) -> None:
        self.text += item.text
        self.logprobs += item.logprobs or []
        if item.finish_reason:
            self.finish_reason = item.finish_reason


Event = Delta | Usage | BaseException
"""What a running request hands its listener: deltas, then exactly one Usage; or one exception."""


class ContextLengthExceeded(ValueError):
    """The prompt (plus the requested completion) does not fit in the model's context."""

    def __init__(self, *, max_context: int, prompt_tokens: int, max_tokens: int | None = None):
        self.max_context = max_context
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        if max_tokens is None:
            over = prompt_tokens - max_context + 1  # at least one token must be left to generate
            msg = (
                f"This model's maximum context length is {max_context} tokens. However, your messages "
                f"resulted in {prompt_tokens} tokens, {over} too many to leave room for a completion. "
                "Please reduce the length of the messages."
            )
        else:
            total = prompt_tokens + max_tokens
            over = total - max_context
            msg = (
                f"This model's maximum context length is {max_context} tokens. However, you requested "
                f"{total} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion), "
                f"{over} too many. Please reduce the length of the messages or completion."
            )
        self.excess = over
        super().__init__(msg)


class InvalidLogitBias(ValueError):
    """A `logit_bias` key is not a token id of this model (a 400 on `logit_bias`)."""

    param = "logit_bias"


class RequestHandle(Protocol):
    def cancel(self) -> None:
        """Stop generating for this request (the client went away); its slots are freed at once."""
        ...

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, over all choices."""
        ...


@runtime_checkable
class InferenceEngine(Protocol):
    def encode_chat(self, model: ModelRef, messages: list[dict], *, tools: list | None = None) -> list[int]:
        """The prompt tokens of a chat, rendered with the model's chat template."""
        ...

    def encode_text(self, model: ModelRef, text: str) -> list[int]: ...

    def decode(self, model: ModelRef, ids: list[int]) -> str: ...

    def submit(
        self, model: ModelRef, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> RequestHandle:
        """Queue a request: `on_event` is called (from the engine's thread) with its deltas, then
        one Usage, or one exception. Validation (unknown model, context length, grammar, logit_bias)
        raises here, before anything is queued."""
        ...

    def generate(self, model: ModelRef, prompt: list[int], params: SamplingParams) -> ChatResult: ...

    def stream(self, model: ModelRef, prompt: list[int], params: SamplingParams) -> Iterator[Delta | Usage]:
        """Delta pieces (the last per choice carries finish_reason), then exactly one Usage.
        Validation happens when this is called; closing the iterator early cancels the request."""
        ...

    def chat(
        self, model: ModelRef, messages: list[dict], params: SamplingParams, *, tools: list | None = None
    ) -> ChatResult: ...

    def chat_stream(
        self, model: ModelRef, messages: list[dict], params: SamplingParams, *, tools: list | None = None
    ) -> Iterator[Delta | Usage]: ...

    def count_prompt_tokens(
        self, model: ModelRef, messages: list[dict], *, tools: list | None = None
    ) -> int: ...

    def active_sequences(self) -> int:
        """Sequences being generated right now (for tests and metrics)."""
        ...

    def close(self) -> None: ...
