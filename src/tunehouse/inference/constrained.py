"""Structured output by constrained decoding: `response_format` → a grammar → a token mask per step.

`{"type": "json_object"}` constrains the answer to any JSON object; `{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}` to the schema. Grammars are compiled by llguidance
(JSON schema → grammar, and per step the set of tokens that keep the text a prefix of a valid
document), so a completion that ends with "stop" always parses, and with a schema always validates.
End-of-turn tokens are allowed only once the document is complete; a completion cut by `max_tokens`
ends with "length" and may be incomplete, as OpenAI's. Stop strings still apply (they may cut the
document, as they would OpenAI's).

`strict`: with `strict: true` a schema keyword the compiler does not implement is an error (400);
with `strict` false or absent the schema is still enforced (it is what users want), and keywords it
cannot enforce (a `format` it does not know, say) are ignored rather than refused.

Whitespace between JSON tokens is bounded (per gap: nothing, one space or tab, or one newline and at
most `MAX_INDENT` spaces or tabs of indentation), so a model cannot spend its whole budget on
newlines, the known failure of unbounded JSON modes; compact and pretty-printed output both fit.

This module imports neither torch nor transformers at import time (the API layer validates requests
with it).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer

MAX_INDENT = 32
_WHITESPACE = rf"(?:[\x20\x09]?|\x0D?\x0A[\x20\x09]{{0,{MAX_INDENT}}})"
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TYPES = ("text", "json_object", "json_schema")


class InvalidResponseFormat(ValueError):
    """The request's `response_format` is malformed or its schema cannot be compiled (a 400)."""

    param = "response_format"


def validate_response_format(response_format: dict[str, Any] | None) -> str | None:
    """Check the shape of `response_format` and compile its grammar. Returns the llguidance grammar,
    or None for plain text. Raises InvalidResponseFormat."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidResponseFormat("Invalid 'response_format': expected an object.")
    kind = response_format.get("type")
    if kind not in _TYPES:
        raise InvalidResponseFormat(
            f"Invalid value for 'response_format.type': {kind!r}. "
            "Supported values are: 'text', 'json_object', and 'json_schema'."
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return _grammar(json.dumps({"type": "object"}), strict=True)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidResponseFormat(
            "Missing required parameter: 'response_format.json_schema' (an object with 'name' and 'schema')."
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidResponseFormat(
            "Invalid 'response_format.json_schema.name': it must be 1 to 64 characters of a-z, A-Z, "
            "0-9, underscores and dashes."
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidResponseFormat(
            "Invalid 'response_format.json_schema.strict': expected a boolean or null."
        )
    schema = spec.get("schema", {})  # OpenAI's schema is optional; absent, any JSON value
    if not isinstance(schema, dict):
        raise InvalidResponseFormat(
            "Invalid 'response_format.json_schema.schema': expected a JSON Schema object."
        )
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidResponseFormat(f"Invalid 'response_format.json_schema.schema': {e}") from None
    try:
        return _grammar(text, strict=bool(strict))
    except InvalidResponseFormat as e:
        raise InvalidResponseFormat(f"Invalid schema for response_format '{name}': {e}") from None


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str, *, strict: bool) -> str:
    options = {
        "whitespace_pattern": _WHITESPACE,
        "lenient": not strict,
        "json_allow_general_unicode_escapes": True,
    }
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_json, overrides=options)
    except ValueError as e:
        raise InvalidResponseFormat(str(e)) from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidResponseFormat(error)
    return grammar


def build_tokenizer(hf_tokenizer, eos_ids) -> LLTokenizer:
    """The llguidance view of a Hugging Face fast tokenizer (~0.3 s for a 49k vocabulary: cache it)."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(hf_tokenizer, n_vocab=len(hf_tokenizer), eos_token=sorted(eos_ids))


def compile_lark(text: str) -> str:
    """An llguidance Lark grammar (with `%json {schema}` rules), checked. Raises InvalidResponseFormat."""
    try:
        grammar = LLMatcher.grammar_from_lark(text)
    except ValueError as e:
        raise InvalidResponseFormat(str(e)) from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidResponseFormat(error)
    return grammar


def json_options(*, strict: bool) -> dict:
    """The options `_grammar` uses, in the `x-guidance` form a `%json` rule of a Lark grammar takes."""
    return {"whitespace_pattern": _WHITESPACE, "lenient": not strict}


class GrammarMatcher:
    """One generated sequence's grammar state: which tokens may come next, fed each sampled token.

    End-of-turn tokens are allowed only once the document is complete. A token off the grammar (a
    stop string cut the text) or an end-of-turn token ends the matching; the sequence is finished
    by then anyway."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str):
        self.matcher = LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise InvalidResponseFormat(self.matcher.get_error())
        self.vocab = tokenizer.vocab_size
        self.bitmask = np.zeros((self.vocab + 31) // 32, dtype="<u4")
        self.done = False

    def allowed(self, width: int) -> np.ndarray | None:
        """A bool mask over `width` logits; None when the grammar no longer constrains anything."""
        if self.done:
            return None
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        # One bit per token, least significant first within each little-endian 32-bit word.
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").astype(bool)
        mask = np.zeros(width, dtype=bool)
        n = min(width, self.vocab)
        mask[:n] = bits[:n]
        if not mask.any():  # cannot happen for a sound grammar: keep the logits rather than NaNs
            return None
        return mask

    def consume(self, token: int, eos_ids: frozenset[int]) -> None:
        if self.done:
            return
        if token in eos_ids or not self.matcher.consume_token(token):
            self.done = True
