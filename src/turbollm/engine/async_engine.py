"""AsyncEngine: an asyncio front-end over the synchronous LLMEngine.

Threading contract. The LLMEngine (and its tokenizer) is touched by exactly one thread, the
engine thread owned by this class. The event loop never calls into the engine: it queues
commands (add, abort, or any function of the engine via `call`) under a lock, and the engine
thread runs them between steps. While requests are unfinished the thread steps the engine;
otherwise it sleeps on a condition variable. Each step's outputs go back to the loop with one
`call_soon_threadsafe`, which routes them to per-stream asyncio queues. So the loop is never
blocked by a step, and the engine never sees two threads.

Host side only; nothing here touches tensors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from turbollm.core.scheduler import SchedulerStats
from turbollm.engine.llm_engine import LLMEngine
from turbollm.engine.outputs import RequestOutput
from turbollm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a step raised, or the engine was shut down)."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the configured cap; the caller should retry later."""


@dataclass(frozen=True)
class EngineRequest:
    """One prompt to generate for; token ids are resolved before submission."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


@dataclass(frozen=True)
class StepTiming:
    """Per-request timing facts observed by the engine thread (time.monotonic seconds)."""

    request_id: str
    first_step_start: float
    """Start of the step that produced the request's first output: its queue time ends here
    (for a prompt prefilled in several chunks, at the last chunk)."""


@dataclass
class _Stream:
    """Loop-side state of one `generate` call: its queue and its unfinished request ids."""

    queue: asyncio.Queue[RequestOutput | BaseException]
    pending: set[str]
    first_step: dict[str, float] = field(default_factory=dict)


class AsyncEngine:
    """Owns the engine thread; `generate` streams RequestOutputs to asyncio callers."""

    def __init__(self, engine: LLMEngine, max_queue: int | None = None) -> None:
        """max_queue: most waiting requests (n > 1 counts n); past it, QueueFullError."""
        self.engine = engine
        self.max_queue = max_queue
        self._cv = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._dead: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, _Stream] = {}  # request_id -> stream; loop thread only
        self._live: set[str] = set()  # engine thread only: unfinished request ids
        self._seen: set[str] = set()  # engine thread only: requests with a first output
        self._ids = itertools.count()
        self.stats: SchedulerStats = engine.stats()
        """Latest snapshot, replaced (never mutated) by the engine thread after each round."""

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; must be called from inside the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="turbollm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything, stop the thread and wait for it (at most `timeout` seconds)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_open_streams(self) -> int:
        """Requests whose caller is still waiting on them (loop thread)."""
        return len(self._streams)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # ---- commands from the loop -----------------------------------------------------------
    def _submit(self, fn: Callable[[], None]) -> None:
        with self._cv:
            if self._dead is not None or self._stopping:
                raise EngineDeadError("the engine is not running")
            self._commands.append(fn)
            self._cv.notify()

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; return or raise its result."""
        assert self._loop is not None, "start() first"
        fut: asyncio.Future[T] = self._loop.create_future()
        loop = self._loop

        def run() -> None:
            try:
                res = fn(self.engine)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, res)

        self._submit(run)
        return await fut

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests (non-blocking; unknown or finished ids are ignored)."""
        ids = list(request_ids)
        if ids and self._dead is None and not self._stopping:
            self._submit(lambda: self._abort_now(ids))

    def fail_all(self, err: BaseException) -> None:
        """Abort every request and end every open stream with `err` (loop thread)."""
        self.abort(sorted(self._streams))
        self._fail_all(err)

    def generate(self, requests: Sequence[EngineRequest]) -> OutputStream:
        """An async context manager: entering adds all requests atomically (or raises
        ValueError / PromptTooLongError / QueueFullError with nothing queued); iterating
        yields RequestOutputs of any of them until all finish; leaving aborts the rest."""
        return OutputStream(self, list(requests))

    # ---- engine-thread side ---------------------------------------------------------------
    def _add_all(self, engine: LLMEngine, requests: list[EngineRequest]) -> None:
        if self.max_queue is not None:
            waiting = engine.stats().num_waiting
            asked = sum(r.params.n for r in requests)
            if waiting + asked > self.max_queue:
                raise QueueFullError(f"{waiting} requests are waiting (the cap is {self.max_queue})")
        for r in requests:  # validate every one before queuing any
            engine.resolve_max_tokens(len(r.prompt_token_ids), r.params)
        added: list[str] = []
        try:
            for r in requests:
                engine.add_request(r.request_id, r.prompt or r.prompt_token_ids, r.params,
                                   prompt_token_ids=r.prompt_token_ids)
                added.append(r.request_id)
                self._live.add(r.request_id)
        except BaseException:
            self._abort_now(added)
            raise

    def _abort_now(self, ids: list[str]) -> None:
        self.engine.abort_request(ids)
        self._live.difference_update(ids)
        self._seen.difference_update(ids)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                for cmd in commands:
                    cmd()
                if stopping:
                    self._abort_now(sorted(self._live))
                    return
                if self.engine.has_unfinished_requests():
                    t0 = time.monotonic()
                    outputs = self.engine.step()
                    self._deliver(outputs, t0)
                self.stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - a step failed: fail every stream, stop
            logger.exception("engine step failed; the engine is stopping")
            self._dead = e
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError("the engine failed"))

    def _deliver(self, outputs: list[RequestOutput], step_start: float) -> None:
        if not outputs or self._loop is None:
            return
        timing = []
        for o in outputs:
            if o.request_id not in self._seen:
                self._seen.add(o.request_id)
                timing.append(StepTiming(o.request_id, step_start))
            if o.finished:
                self._seen.discard(o.request_id)
                self._live.discard(o.request_id)
        self._loop.call_soon_threadsafe(self._route, outputs, timing)

    # ---- loop-thread side -----------------------------------------------------------------
    def _route(self, outputs: list[RequestOutput], timing: list[StepTiming]) -> None:
        for t in timing:
            stream = self._streams.get(t.request_id)
            if stream is not None:
                stream.first_step[t.request_id] = t.first_step_start
        for o in outputs:
            stream = self._streams.get(o.request_id)
            if stream is not None:
                stream.queue.put_nowait(o)

    def _fail_all(self, err: BaseException) -> None:
        for stream in {id(s): s for s in self._streams.values()}.values():
            stream.queue.put_nowait(err)


class OutputStream:
    """See AsyncEngine.generate. Loop thread only."""

    def __init__(self, owner: AsyncEngine, requests: list[EngineRequest]) -> None:
        self._owner = owner
        self._requests = requests
        self._stream = _Stream(asyncio.Queue(), {r.request_id for r in requests})

    @property
    def first_step_start(self) -> dict[str, float]:
        """request_id -> start of the step that gave its first output (for queue time)."""
        return self._stream.first_step

    async def __aenter__(self) -> OutputStream:
        owner = self._owner
        if owner._dead is not None:  # noqa: SLF001
            raise EngineDeadError("the engine is not running")
        for r in self._requests:  # register first: the first output may come right away
            owner._streams[r.request_id] = self._stream  # noqa: SLF001
        try:
            await owner.call(lambda eng: owner._add_all(eng, self._requests))  # noqa: SLF001
        except BaseException:
            self._stream.pending.clear()
            self._unregister()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Abort the unfinished requests and stop routing outputs here (idempotent)."""
        if self._stream.pending:
            pending, self._stream.pending = sorted(self._stream.pending), set()
            try:
                self._owner.abort(pending)
            except EngineDeadError:
                pass
        self._unregister()

    def _unregister(self) -> None:
        for r in self._requests:
            self._owner._streams.pop(r.request_id, None)  # noqa: SLF001

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        stream = self._stream
        while stream.pending:
            item = await stream.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                stream.pending.discard(item.request_id)
            yield item


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
