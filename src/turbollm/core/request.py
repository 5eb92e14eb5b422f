"""Request state as the scheduler sees it (plain Python, CPU).

Owned by the scheduler from `add_request` until it finishes; the engine reads it to build
outputs. Tokens are appended by `Scheduler.update`; nothing else mutates a Request, except
the engine cutting a finished request's output after a stop string (`truncate_output`).
"""

from __future__ import annotations

import enum
import time

from turbollm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: 'stop', 'length', 'abort', or None while running."""
        return self.value if self.finished else None


class Request:
    """One sequence being generated (a prompt with n > 1 becomes n Requests)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        max_tokens: int | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt has no tokens")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        """Effective cap on new tokens (the engine resolves None to what the context allows)."""
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0
        """Tokens this request samples in steps planned but not yet reported (overlapped
        scheduling: the next step computes on them before the host knows their values)."""
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that ended the request, if any."""
        self.num_preemptions = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep only the first `num_output_tokens` outputs (the engine, after a stop string
        that ended inside a multi-token speculative step; the request is finished)."""
        assert self.is_finished, "only a finished request's output may be cut"
        drop = self.num_output_tokens - num_output_tokens
        if drop > 0:
            del self.output_token_ids[num_output_tokens:]
            del self.all_token_ids[len(self.all_token_ids) - drop :]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"{self.status.name})"
        )
