"""Incremental detokenizing with stop strings: one generated sequence's tokens become text as they
arrive.

Decoding token by token splits multi-byte characters and merges pieces differently than decoding
the whole; vLLM's prefix/read-offset scheme avoids both, so streamed pieces never split a character
and their concatenation is exactly the non-streamed text. Stop strings are found as text arrives,
and text that could still become the start of one is held back until it cannot. Kept apart from
the scheduler because it is plain text bookkeeping: no torch, testable with a tokenizer alone.
"""

from __future__ import annotations


class IncrementalDetokenizer:
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
