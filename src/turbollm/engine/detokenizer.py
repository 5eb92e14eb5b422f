"""Incremental detokenization and stop strings (host side, one per completion).

Decoding only a short window of recent tokens each step keeps the cost per token constant,
and holding back text while the window ends in an incomplete UTF-8 sequence ("\ufffd")
keeps multi-token characters intact; `flush` adds what is still held back when the output
ends, so the final text equals a full decode of the output tokens. A few prompt tokens seed
the window so the first output token decodes with the spacing it has in context.
"""

from __future__ import annotations

from typing import Any

_PROMPT_CONTEXT = 6


class IncrementalDetokenizer:
    """Turns a growing list of output tokens into text; finds stop strings."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        stop: list[str],
        include_stop_str_in_output: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.tokens: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.num_consumed = 0
        """Of the last `update`'s tokens, how many were read (fewer after a stop string)."""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids: list[int], check_stop: bool) -> str | None:
        """Append tokens; return the stop string that matched (text is cut there), else None."""
        self.num_consumed = len(new_token_ids)
        if self.tokenizer is None:
            return None
        for i, tok in enumerate(new_token_ids):
            self.tokens.append(tok)
            new = self._unread_text()
            if new and not new.endswith("\ufffd"):
                before = len(self.text)
                self.text += new
                self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
                if check_stop and self.stop:
                    hit = self._find_stop(before)
                    if hit is not None:
                        self.num_consumed = i + 1
                        return hit
        return None

    def flush(self) -> None:
        """At the end of the output: append text held back for an incomplete UTF-8 sequence
        (as "\ufffd", which a full decode of the tokens gives too)."""
        if self.tokenizer is None or self.read_offset == len(self.tokens):
            return
        self.text += self._unread_text()
        self.prefix_offset = self.read_offset = len(self.tokens)

    def _unread_text(self) -> str:
        """Text the tokens after read_offset add, decoded in the window from prefix_offset."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        return self._decode(self.tokens[self.prefix_offset :])[len(prefix) :]

    def _find_stop(self, new_from: int) -> str | None:
        """Earliest stop string overlapping the text added since `new_from`."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, max(0, new_from - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s
