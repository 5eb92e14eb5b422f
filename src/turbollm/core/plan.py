"""What the scheduler hands the worker each step, and what comes back (plain Python, CPU).

Owned by the scheduler (StepPlan) and the worker (StepResult); both live on the host and are
dropped after the step. The worker keeps per-request state between steps, so a plan carries
a request's full data only when the worker has not seen it (new, or resumed after
preemption) and otherwise only what changed (new KV blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turbollm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has no state for: first scheduled, or resumed after preemption."""

    request_id: str
    token_ids: list[int]
    """Prompt followed by every output token so far (non-empty after preemption)."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    """KV blocks holding token i at block_ids[i // block_size], slot i % block_size."""
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (prefix-cache hits)."""


@dataclass
class CachedRequestData:
    """A request the worker already holds; only its newly allocated blocks travel."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    """Tokens with KV in the cache before this step (lets the worker check it agrees)."""


@dataclass
class StepPlan:
    """One step: which requests compute how many new tokens."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    """request_id -> tokens to compute this step: a prompt chunk, 1 for decode, 0 never."""
    finished_request_ids: set[str] = field(default_factory=set)
    """Requests freed since the last plan (finished, aborted, preempted): drop their state."""
    num_spec_tokens: dict[str, int] = field(default_factory=dict)
    """request_id -> K, for requests that speculate this step: their num_scheduled_tokens is
    1 + K (the last known token, then up to K draft tokens the worker's proposer fills in; it
    may propose fewer and compute fewer). Absent: no speculation."""

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class TokenLogprobs:
    """Log-probabilities of one token, sampled or from the prompt (model's raw distribution)."""

    token_id: int
    logprob: float
    rank: int
    """1-based rank of the token in the distribution (1 + the number of likelier tokens)."""
    top: list[tuple[int, float]]
    """The most likely (token_id, logprob) pairs, best first; as many as asked for."""


@dataclass
class StepResult:
    """What one step produced. Requests mid-prompt (a partial chunk) sample nothing."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """request_id -> tokens sampled this step (one, or none for a partial prefill)."""
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """request_id -> logprobs for each sampled token, for requests that asked."""
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    """request_id -> logprobs of the prompt tokens this step's chunk predicts, for requests
    with prompt_logprobs. A chunk computing positions [s, e) covers prompt tokens
    [s + 1, min(e, num_prompt_tokens - 1) + 1), preceded by None for token 0 when s == 0, so
    a prompt's chunks concatenate to one entry per prompt token. A request resumed after
    preemption recomputes its prompt and reports it again; the engine drops the repeats."""
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    """request_id -> draft tokens actually proposed and verified (<= its planned K), for
    speculating requests. Of them, len(sampled_token_ids[id]) - 1 were accepted: the scheduler
    rolls num_computed_tokens back over the rest."""
    step_seconds: float = 0.0
    """Wall time of the whole step in the worker (ends with its host sync)."""
    draft_seconds: float = 0.0
    """Of step_seconds, the time spent proposing (the draft model's forwards)."""
    draft_forwards: list[tuple[int, float]] = field(default_factory=list)
    """(tokens, seconds) of each draft-model forward of the step, in order; the first runs
    every speculating request's catch-up (the tokens its draft cache had not seen)."""
