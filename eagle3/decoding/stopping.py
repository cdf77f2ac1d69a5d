"""When generation ends: EOS tokens, stop strings and the token budget, checked token by token so that a
decoder that accepts several tokens at once (speculation) stops at exactly the same token as plain decoding.

Text is decoded incrementally (each new token with the few before it as context, never the whole text
again), for stop strings and streaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class Stopper:
    tokenizer: object
    eos_token_ids: frozenset[int]
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "stop" or "length" once finished
    track_text: bool = False
    _text: str = ""  # decoded text of token_ids[:_read] (kept only when stop strings or streaming need it)
    _prefix: int = 0  # incremental decoding: tokens before _prefix are settled text ...
    _read: int = 0  # ... and tokens [_prefix, _read) are decoded again as context for what follows
    _stop_at: int | None = None  # character index where a stop string begins
    _searched: int = 0  # characters of _text already searched for stop strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        self.track_text = self.track_text or bool(self.stop_strings)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def extend(self, new_tokens: Sequence[int]) -> int:
        """Appends tokens one at a time until a stop rule fires; returns how many were taken."""
        taken = 0
        for token in new_tokens:
            if self.done:
                break
            self.token_ids.append(int(token))
            taken += 1
            if self.track_text:
                self._decode_new()
            if int(token) in self.eos_token_ids:
                self.finish_reason = "eos"
            elif self.stop_strings and self._find_stop():
                self.finish_reason = "stop"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        return taken

    def _decode_new(self, final: bool = False) -> None:
        """Decodes the tokens not yet in the text, with the last settled ones before them as context (a token's
        text can depend on its left neighbour, e.g. a leading space). Text that ends in an incomplete UTF-8
        sequence waits for the next token, unless final."""
        before = self.tokenizer.decode(self.token_ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.token_ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.token_ids)

    def _find_stop(self) -> bool:
        """Looks for a stop string where the new text could complete one (never the whole text again)."""
        start = max(0, self._searched - max(len(s) for s in self.stop_strings) + 1)
        self._searched = len(self._text)
        hits = [i for i in (self._text.find(s, start) for s in self.stop_strings) if i >= 0]
        if hits:
            self._stop_at = min(hits)
        return bool(hits)

    def text(self) -> str:
        """The generated text, without special tokens and cut before a stop string."""
        if not self.track_text:
            return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.done:
            self._decode_new(final=True)  # (an incomplete UTF-8 tail shows as U+FFFD, as a full decode does)
        return self._text if self._stop_at is None else self._text[: self._stop_at]


class TextStreamer:
    """Turns a growing text into printable deltas, holding back an incomplete UTF-8 sequence and any tail
    that may still grow into a stop string (which must never reach the terminal)."""

    def __init__(self, write: Callable[[str], object], stop_strings: Sequence[str] = ()) -> None:
        self.write, self.stop_strings, self.printed = write, tuple(stop_strings), 0

    def update(self, text: str, final: bool = False) -> None:
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                return
            end -= max((_overlap(text, s) for s in self.stop_strings), default=0)
        if end > self.printed:
            self.write(text[self.printed : end])
            self.printed = end


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
