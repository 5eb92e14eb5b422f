"""Shared helpers for core/ tests: request and scheduler factories, and a fake worker.

The fake worker keeps its own per-request state from the plans alone (as the real one does)
and a fake KV cache holding the token id written in each slot, so a wrong prefix hit, a
block reused while still owned, or a plan that disagrees with earlier plans fails loudly.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from turbollm.config import CacheConfig, SchedulerConfig
from turbollm.core.plan import StepPlan, StepResult
from turbollm.core.request import Request
from turbollm.core.scheduler import Scheduler
from turbollm.sampling_params import SamplingParams


def make_request(
    request_id: str,
    prompt: list[int] | int,
    max_tokens: int | None = 4,
    eos_token_ids: frozenset[int] = frozenset(),
    **params: object,
) -> Request:
    """A request whose prompt is `prompt` or, for an int, that many distinct-ish tokens."""
    if isinstance(prompt, int):
        prompt = [1000 + zlib.crc32(f"{request_id}:{i}".encode()) % 50_000 for i in range(prompt)]
    sp = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Request(request_id, prompt, sp, eos_token_ids=eos_token_ids)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    long_prefill_token_threshold: int = 0,
    enable_prefix_caching: bool = True,
    max_model_len: int = 1024,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens, max_num_seqs, long_prefill_token_threshold),
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        num_blocks=num_blocks,
        max_model_len=max_model_len,
    )


def default_next_token(request_id: str, position: int) -> int:
    """Deterministic fake sampling; never collides with the small ids tests use for stops."""
    return 10_000 + position


@dataclass
class _WorkerRequest:
    token_ids: list[int]
    block_ids: list[int]
    num_computed: int


@dataclass
class FakeWorker:
    """Executes plans against a fake KV cache and samples `next_token(request_id, position)`."""

    block_size: int
    next_token: Callable[[str, int], int] = default_next_token
    requests: dict[str, _WorkerRequest] = field(default_factory=dict)
    kv: dict[tuple[int, int], int] = field(default_factory=dict)
    """(block_id, slot) -> token id whose KV was written there."""

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_request_ids:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            assert new.request_id not in self.requests, "new request the worker already holds"
            state = _WorkerRequest(list(new.token_ids), list(new.block_ids), 0)
            for pos in range(new.num_computed_tokens):  # prefix hits must hold these tokens
                assert self.kv.get(self._slot(state, pos)) == state.token_ids[pos], (
                    f"{new.request_id}: bad prefix hit at position {pos}"
                )
            state.num_computed = new.num_computed_tokens
            self.requests[new.request_id] = state
        for cached in plan.cached_requests:
            state = self.requests[cached.request_id]
            assert state.num_computed == cached.num_computed_tokens
            state.block_ids += cached.new_block_ids
        scheduled = {n.request_id for n in plan.new_requests}
        scheduled |= {c.request_id for c in plan.cached_requests}
        assert scheduled == set(plan.num_scheduled_tokens)
        return self._run(plan)

    def _run(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        for rid, n in plan.num_scheduled_tokens.items():
            state = self.requests[rid]
            assert n >= 1
            end = state.num_computed + n
            assert end <= len(state.token_ids), f"{rid}: computes tokens it does not have"
            assert len(state.block_ids) * self.block_size >= end, f"{rid}: too few blocks"
            for pos in range(state.num_computed, end):
                self.kv[self._slot(state, pos)] = state.token_ids[pos]
            state.num_computed = end
            if end == len(state.token_ids):
                token = self.next_token(rid, end)
                state.token_ids.append(token)
                result.sampled_token_ids[rid] = [token]
        return result

    def check_kv(self) -> None:
        """Every computed token of every request is still in its slot (no block reused)."""
        for rid, state in self.requests.items():
            for pos in range(state.num_computed):
                assert self.kv[self._slot(state, pos)] == state.token_ids[pos], (
                    f"{rid}: KV at position {pos} was overwritten"
                )

    def _slot(self, state: _WorkerRequest, pos: int) -> tuple[int, int]:
        return state.block_ids[pos // self.block_size], pos % self.block_size


def run_until_done(
    scheduler: Scheduler,
    worker: FakeWorker,
    max_steps: int = 2000,
    on_step: Callable[[StepPlan], None] | None = None,
) -> list[StepPlan]:
    """Drive schedule/execute/update until nothing is unfinished; check limits every step."""
    plans = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return plans
        plan = scheduler.schedule()
        assert plan.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        assert len(scheduler.running) <= scheduler.config.max_num_seqs
        assert len(plan.num_scheduled_tokens) <= scheduler.config.max_num_seqs
        if on_step is not None:
            on_step(plan)
        scheduler.update(plan, worker.execute(plan))
        worker.check_kv()
        for rid, req in scheduler.requests.items():  # both sides agree on every token
            if rid in worker.requests and req.num_computed_tokens > 0:
                assert worker.requests[rid].token_ids == req.all_token_ids
        plans.append(plan)
    raise AssertionError(f"not done after {max_steps} steps")


# Test modules are not a package here, so the helpers reach them as fixtures.


@pytest.fixture(name="make_request")
def _make_request() -> Callable[..., Request]:
    return make_request


@pytest.fixture(name="make_scheduler")
def _make_scheduler() -> Callable[..., Scheduler]:
    return make_scheduler


@pytest.fixture(name="make_worker")
def _make_worker() -> Callable[..., FakeWorker]:
    return FakeWorker


@pytest.fixture(name="run_until_done")
def _run_until_done() -> Callable[..., list[StepPlan]]:
    return run_until_done
