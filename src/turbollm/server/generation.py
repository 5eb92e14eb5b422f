"""One HTTP request's engine work: submit its engine requests, feed the metrics, and hand the
endpoint either per-choice deltas (streaming) or the final outputs.

Choice numbering follows OpenAI: prompt p's completion i is choice p * n + i. Lives on the
event loop for one HTTP exchange.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from turbollm.core.plan import TokenLogprobs
from turbollm.engine.async_engine import EngineDeadError, EngineRequest, OutputStream, QueueFullError
from turbollm.engine.outputs import RequestOutput
from turbollm.server.errors import APIError, from_value_error
from turbollm.server.metrics import RequestTracker
from turbollm.server.protocol import Usage
from turbollm.server.serving import Serving
from turbollm.server.streaming import TextHoldback


@dataclass
class Delta:
    """What one choice produced since its last delta (text already stop-safe)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    first: bool
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """On a choice's first delta, when prompt logprobs were asked for (complete by then: the
    first delta carries the first token, sampled after the whole prompt)."""


@dataclass
class _ChoiceCursor:
    holdback: TextHoldback
    tokens_sent: int = 0
    started: bool = False
    done: bool = False


class Generation:
    """Use as `async with Generation(...) as gen:` then `gen.deltas()` or `gen.final()`."""

    def __init__(self, serving: Serving, requests: list[EngineRequest]) -> None:
        self.serving = serving
        self.requests = requests
        self.arrival = time.monotonic()
        self._order = {r.request_id: p for p, r in enumerate(requests)}
        self._stream: OutputStream | None = None
        self._trackers: dict[str, RequestTracker] = {
            r.request_id: serving.metrics.tracker(self.arrival) for r in requests}
        self._last: dict[str, RequestOutput] = {}

    async def __aenter__(self) -> Generation:
        stream = self.serving.engine.generate(self.requests)
        try:
            await stream.__aenter__()
        except QueueFullError as e:
            raise APIError(503, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineDeadError:
            raise APIError(503, "the engine is not running", code="engine_unavailable") from None
        except ValueError as e:  # includes PromptTooLongError
            raise from_value_error(e, {"prompt", "max_tokens"}) from None
        self._stream = stream
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Abort whatever is unfinished (idempotent; safe from any exit path)."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        assert self._stream is not None, "enter the Generation first"
        stream = self._stream
        async for out in stream:
            self._trackers[out.request_id].on_output(out, stream.first_step_start.get(out.request_id))
            self._last[out.request_id] = out
            yield out

    async def final(self) -> list[RequestOutput]:
        """Wait for every request; their last outputs in submission order."""
        async for _ in self._outputs():
            pass
        return [self._last[r.request_id] for r in self.requests]

    async def deltas(self) -> AsyncIterator[Delta]:
        """Stop-safe increments of every choice, as the engine produces them."""
        cursors: dict[tuple[str, int], _ChoiceCursor] = {}
        async for out in self._outputs():
            p = self._order[out.request_id]
            params = self.requests[p].params
            for c in out.outputs:
                cur = cursors.setdefault((out.request_id, c.index),
                                         _ChoiceCursor(TextHoldback(list(params.stop or []))))
                if cur.done:
                    continue
                text = cur.holdback.delta(c.text, c.finished)
                new_ids = c.token_ids[cur.tokens_sent:]
                lps = c.logprobs[cur.tokens_sent:] if c.logprobs is not None else None
                cur.tokens_sent = len(c.token_ids)
                if not (text or new_ids or c.finished):
                    continue
                yield Delta(p * params.n + c.index, text, new_ids, lps, c.finish_reason, not cur.started,
                            out.prompt_logprobs if not cur.started else None)
                cur.started = True
                cur.done = c.finished

    def usage(self, count_completion: bool = True) -> Usage:
        """Token counts so far: each prompt once, every choice's tokens (unless the endpoint
        drops them: echo with max_tokens=0)."""
        prompt = sum(len(r.prompt_token_ids) for r in self.requests)
        completion = sum(len(c.token_ids) for o in self._last.values() for c in o.outputs
                         if count_completion)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
