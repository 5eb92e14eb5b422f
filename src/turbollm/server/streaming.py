"""Server-sent events and the pieces that make streaming correct.

- `sse` frames one JSON payload; `DONE` ends every stream, after an error frame too.
- `TextHoldback` never emits text that could still be cut by a stop string: while a
  completion runs, the last (longest stop - 1) characters are held back, because the engine
  cuts its text where a stop string begins once the whole string has appeared.
- `until_disconnected` runs a coroutine and cancels it when the client goes away, so a
  non-streaming request from a vanished client is aborted (streaming responses are cancelled
  by Starlette itself when a send fails or the client disconnects).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class TextHoldback:
    """Per-completion streaming cursor over the engine's cumulative text."""

    def __init__(self, stop: list[str]) -> None:
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def delta(self, text: str, finished: bool) -> str:
        """The text that is safe to send now and was not sent before."""
        end = len(text) if finished else max(self.sent, len(text) - self._hold)
        piece = text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise CancelledError."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise asyncio.CancelledError("client disconnected")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
