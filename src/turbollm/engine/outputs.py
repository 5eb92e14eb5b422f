"""What the engine returns to callers (host objects, created by the engine each step).

A RequestOutput is cumulative: its completions hold all text and tokens so far. Streaming
callers diff successive outputs of the same request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turbollm.core.plan import TokenLogprobs


@dataclass
class CompletionOutput:
    """One of the n completions of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """'stop' (EOS, stop token or stop string), 'length', 'abort', or None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended it, if any."""
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) for latency accounting."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request after a step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With params.prompt_logprobs: one entry per prompt token, the first None (nothing
    precedes it); complete from the first output that has a token."""
