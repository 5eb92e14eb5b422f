"""User-facing sampling options and their validation (stdlib only).

A SamplingParams is created by the user (or the server), validated once here, and then read
by the scheduler (stop conditions), the worker's sampler (logit processing) and the
detokenizer (stop strings). It is never mutated after construction except by `clone`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

_MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Defaults follow vLLM / OpenAI."""

    n: int = 1
    """Number of completions to return for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 disables it."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (divides positive logits)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted once per previous occurrence of a token in the output (OpenAI semantics)."""
    seed: int | None = None
    """Per-request random seed; the same seed gives the same sampled tokens."""
    stop: list[str] | str | None = None
    """Strings that end the completion; they are left out of the text unless asked for."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the completion (kept in token_ids, like EOS)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    max_tokens: int | None = 16
    """Most new tokens to generate; None means up to the context length."""
    min_tokens: int = 0
    """Fewest new tokens before EOS / stop tokens / stop strings may end the completion."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0: sampled only)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (the first: None) and this many top alternatives."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    stop_token_set: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    """Derived: stop_token_ids as a set, for O(1) checks per token."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.top_k = 0 if self.top_k == -1 else self.top_k
        self._validate()
        self.stop_token_set = frozenset(self.stop_token_ids)

    def _validate(self) -> None:
        _check_int("n", self.n, lo=1)
        _check_num("temperature", self.temperature, lo=0.0)
        _check_num("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=0, note=" (or -1 to disable)")
        _check_num("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_num("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_num("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-_MAX_SEED, hi=_MAX_SEED)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=20)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=20)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids[]", t, lo=0)

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    def clone(self, **changes: object) -> SamplingParams:
        """A validated copy with some fields changed (used to fan out n > 1)."""
        new = copy.copy(self)
        for k, v in changes.items():
            setattr(new, k, v)
        new.__post_init__()
        return new


def _check_int(name: str, value: object, lo: int, hi: int | None = None, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}{note}, got {value}")


def _check_num(
    name: str, value: object, lo: float, hi: float | None = None, lo_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        rng = f"{left}{lo}, {hi}]" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
