"""Scheduler: token budget, chunked prefill, prefix hits, preemption, aborts, stop conditions.

Most tests drive schedule -> FakeWorker.execute -> update loops (see conftest.py); the fake
worker checks every plan against its own state and a fake KV cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from turbollm.core.plan import StepPlan
from turbollm.core.request import Request, RequestStatus
from turbollm.core.scheduler import Scheduler

MakeRequest = Callable[..., Request]
MakeScheduler = Callable[..., Scheduler]
MakeWorker = Callable[..., Any]  # -> conftest.FakeWorker
RunUntilDone = Callable[..., list[StepPlan]]


def expected_outputs(req: Request) -> list[int]:
    """What the default fake sampler yields: 10_000 + the position the token lands at."""
    return [10_000 + req.num_prompt_tokens + k for k in range(req.max_tokens or 0)]


def cycle_sampler(tokens: list[int]) -> Callable[[str, int], int]:
    """Samples tokens[0], tokens[1], ... in turn (per call), cycling."""
    it: Iterator[int] = iter(tokens * 100)
    return lambda _rid, _pos: next(it)


def step(sched: Scheduler, worker: Any) -> StepPlan:
    plan = sched.schedule()
    sched.update(plan, worker.execute(plan))
    return plan


# --------------------------------------------------------------------- budget and chunks


def test_budget_and_max_num_seqs_respected(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=64, max_num_batched_tokens=16, max_num_seqs=4)
    reqs = [
        make_request(f"r{i}", rng.randint(1, 40), max_tokens=rng.randint(1, 9)) for i in range(12)
    ]
    for r in reqs:
        sched.add_request(r)
    plans = run_until_done(sched, make_worker(block_size=4))
    assert max(p.total_num_scheduled_tokens for p in plans) == 16  # the budget was used
    assert max(len(p.num_scheduled_tokens) for p in plans) == 4
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_outputs(r)
    assert sched.kv.num_free_blocks == 64 and sched.stats().kv_cache_usage == 0.0
    assert not sched.has_unfinished_requests() and sched.get_num_unfinished_requests() == 0


def test_chunked_prefill_runs_alongside_decodes(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    worker = make_worker(block_size=4)
    a, b = make_request("a", 3, max_tokens=10), make_request("b", 3, max_tokens=10)
    long = make_request("L", 30)
    for r in (a, b, long):
        sched.add_request(r)
    plan = step(sched, worker)
    assert plan.num_scheduled_tokens == {"a": 3, "b": 3, "L": 2}
    assert [n.num_computed_tokens for n in plan.new_requests] == [0, 0, 0]
    chunks = [2]
    while long.num_output_tokens == 0:
        plan = step(sched, worker)
        assert plan.num_scheduled_tokens["a"] == plan.num_scheduled_tokens["b"] == 1
        cached = {c.request_id: c for c in plan.cached_requests}
        assert cached["L"].num_computed_tokens == sum(chunks)  # the value before the step
        chunks.append(plan.num_scheduled_tokens["L"])
    assert chunks == [2, 6, 6, 6, 6, 4] and sum(chunks) == 30
    assert long.num_computed_tokens == 30 and a.num_output_tokens == 6


def test_long_prefill_threshold_caps_each_chunk(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=5)
    worker = make_worker(block_size=4)
    sched.add_request(make_request("L", 12))
    assert [step(sched, worker).num_scheduled_tokens["L"] for _ in range(4)] == [5, 5, 2, 1]


def test_max_num_seqs_limits_admission_and_queue_is_fcfs(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(max_num_seqs=2)
    worker = make_worker(block_size=4)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 4, max_tokens=2))
    assert set(step(sched, worker).num_scheduled_tokens) == {"r0", "r1"}
    assert [r.request_id for r in sched.waiting] == ["r2"]
    step(sched, worker)  # r0 and r1 finish
    assert set(step(sched, worker).num_scheduled_tokens) == {"r2"}


def test_waiting_queue_does_not_skip_ahead(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    worker = make_worker(block_size=4)
    sched.add_request(make_request("r0", 8, max_tokens=8))  # 2 blocks
    step(sched, worker)
    sched.add_request(make_request("big", 12, max_tokens=4))  # needs 3 blocks, 2 free
    sched.add_request(make_request("small", 4, max_tokens=4))  # would fit, must wait its turn
    plan = step(sched, worker)
    assert plan.num_scheduled_tokens == {"r0": 1}
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


# --------------------------------------------------------------------------- prefix cache


def test_prefix_hit_computes_only_new_tokens(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    sched = make_scheduler()
    worker = make_worker(block_size=4)
    shared = list(range(500, 508))  # two full blocks
    a = make_request("a", shared + [1, 2, 3])
    sched.add_request(a)
    step(sched, worker)
    hashed = [b.block_id for b in sched.kv.pool.blocks if b.block_hash is not None]
    assert hashed == sched.kv.block_ids("a")[:2], "the partial third block must not be cached"
    b = make_request("b", shared + [7, 8, 9, 10, 11])
    sched.add_request(b)
    plan = sched.schedule()
    new = {n.request_id: n for n in plan.new_requests}["b"]
    assert new.num_computed_tokens == 8 and plan.num_scheduled_tokens["b"] == 5
    assert new.block_ids[:2] == sched.kv.block_ids("a")[:2]
    sched.update(plan, worker.execute(plan))
    run_until_done(sched, worker)
    assert b.output_token_ids == expected_outputs(b)
    stats = sched.stats()
    assert stats.prefix_cache_hits == 8 and stats.prefix_cache_queries == 11 + 13
    assert stats.prefix_cache_hit_rate == 8 / 24
    assert sched.kv.num_free_blocks == 64


def test_full_prompt_hit_still_computes_a_token(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    sched = make_scheduler()
    worker = make_worker(block_size=4)
    prompt = list(range(300, 308))
    sched.add_request(make_request("a", prompt))
    run_until_done(sched, worker)
    sched.add_request(make_request("b", prompt))  # fully cached: recompute the last block
    sched.add_request(make_request("c", prompt + [1]))
    plan = sched.schedule()
    assert [n.num_computed_tokens for n in plan.new_requests] == [4, 8]
    assert plan.num_scheduled_tokens == {"b": 4, "c": 1}
    sched.update(plan, worker.execute(plan))
    run_until_done(sched, worker)
    assert sched.kv.num_free_blocks == 64


def test_prefix_caching_disabled_never_hits(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    worker = make_worker(block_size=4)
    sched.add_request(make_request("a", list(range(9))))
    run_until_done(sched, worker)
    sched.add_request(make_request("b", list(range(9))))
    plan = sched.schedule()
    assert plan.new_requests[0].num_computed_tokens == 0 and plan.num_scheduled_tokens == {"b": 9}


# ----------------------------------------------------------------------------- preemption


def test_newest_running_request_is_preempted(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    sched = make_scheduler(num_blocks=3)
    worker = make_worker(block_size=4)
    a, b = make_request("a", 4, max_tokens=5), make_request("b", 8, max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, worker)  # a: 1 block, b: 2 blocks, none free
    c = make_request("c", 4, max_tokens=2)
    sched.add_request(c)  # waits: no block free
    plan = step(sched, worker)  # a needs a second block: b (newest) goes
    assert plan.num_scheduled_tokens == {"a": 1}
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [10_008] and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c] and sched.stats().num_preemptions == 1
    assert "b" in plan.finished_request_ids
    plans = run_until_done(sched, worker)
    resumed = [n for p in plans for n in p.new_requests if n.request_id == "b"]
    assert len(resumed) == 1 and resumed[0].token_ids == b.prompt_token_ids + [10_008]
    assert a.output_token_ids == expected_outputs(a) and b.output_token_ids == expected_outputs(b)
    assert c.output_token_ids == expected_outputs(c)
    assert sched.kv.num_free_blocks == 3


def test_request_needing_blocks_preempts_itself_when_newest(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    sched = make_scheduler(num_blocks=3)
    worker = make_worker(block_size=4)
    a, b = make_request("a", 4, max_tokens=3), make_request("b", 4, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, worker)  # one block each, one free
    plan = step(sched, worker)  # a takes the last block; b has none and is the newest
    assert plan.num_scheduled_tokens == {"a": 1} and plan.new_requests == []
    assert b.status is RequestStatus.PREEMPTED and list(sched.waiting) == [b]
    plans = run_until_done(sched, worker)
    resumed = [n for p in plans for n in p.new_requests if n.request_id == "b"]
    # Its full prompt block was cached when computed and survived: only 1 token to recompute.
    assert resumed[0].num_computed_tokens == 4 and len(resumed[0].token_ids) == 5
    assert b.output_token_ids == expected_outputs(b)
    assert sched.kv.num_free_blocks == 3


def test_no_admission_in_a_step_that_preempted(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    sched = make_scheduler(
        num_blocks=4, long_prefill_token_threshold=4, enable_prefix_caching=False
    )
    worker = make_worker(block_size=4)
    a, c = make_request("a", 4, max_tokens=4), make_request("c", 12, max_tokens=4)
    sched.add_request(a)
    sched.add_request(c)
    step(sched, worker)  # a: 1 block, c: first chunk in 1 block
    step(sched, worker)  # a: 2nd block, c: 2nd chunk and block; pool full
    plan = step(sched, worker)  # c needs a block, is the newest: preempts itself
    # Two blocks are free now and c's next chunk needs one, but it waits for the next step.
    assert plan.num_scheduled_tokens == {"a": 1} and plan.new_requests == []
    assert c.status is RequestStatus.PREEMPTED and sched.kv.num_free_blocks == 2
    plan = sched.schedule()
    assert [n.request_id for n in plan.new_requests] == ["c"]
    sched.update(plan, worker.execute(plan))
    run_until_done(sched, worker)
    assert c.output_token_ids == expected_outputs(c)


def test_tiny_pool_preempts_and_everything_finishes(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=32)
    worker = make_worker(block_size=4)
    reqs = [make_request(f"r{i}", 6, max_tokens=10) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    seen_outputs: dict[str, int] = {}
    while sched.has_unfinished_requests():
        before = [r.request_id for r in sched.running]
        plan = sched.schedule()
        gone = [rid for rid in before if sched.requests[rid].status is RequestStatus.PREEMPTED]
        assert gone == before[len(before) - len(gone) :], "only the newest are preempted"
        assert set(gone) <= plan.finished_request_ids
        for new in plan.new_requests:  # resumed requests carry their outputs
            req = sched.requests[new.request_id]
            assert new.token_ids == req.all_token_ids
            assert len(new.token_ids) == 6 + seen_outputs.get(new.request_id, 0)
        sched.update(plan, worker.execute(plan))
        worker.check_kv()
        seen_outputs = {r.request_id: r.num_output_tokens for r in reqs}
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == expected_outputs(r)
    assert sched.kv.num_free_blocks == 6


def test_random_workload_with_aborts_frees_every_block(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker,
    run_until_done: RunUntilDone,
) -> None:
    for seed in range(4):
        rng = random.Random(seed)
        sched = make_scheduler(num_blocks=10, max_num_batched_tokens=12, max_num_seqs=5)
        worker = make_worker(block_size=4)
        prefixes = [[rng.randint(1, 50) for _ in range(8)] for _ in range(3)]
        reqs = []
        for i in range(20):
            prompt = rng.choice(prefixes)[: rng.randint(1, 8)]
            prompt += [rng.randint(1, 50) for _ in range(rng.randint(0, 9))]
            # prompt <= 17 tokens, so prompt + max_tokens fits the 40 slots (the engine's check)
            reqs.append(make_request(f"r{i}", prompt, max_tokens=rng.randint(1, 40 - 17)))
            sched.add_request(reqs[-1])
        aborted: set[str] = set()

        def maybe_abort(plan: StepPlan) -> None:
            if rng.random() < 0.1 and sched.requests:
                victim = rng.choice(sorted(sched.requests))
                sched.abort_requests([victim])
                aborted.add(victim)

        run_until_done(sched, worker, on_step=maybe_abort)
        for r in reqs:
            if r.request_id in aborted:
                assert r.status is RequestStatus.FINISHED_ABORTED
            else:
                assert r.output_token_ids == expected_outputs(r)
        assert sched.kv.num_free_blocks == 10 and sched.stats().num_running == 0


# ---------------------------------------------------------------------------------- aborts


def test_abort_waiting_and_running_frees_blocks(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(num_blocks=8, max_num_seqs=1)
    worker = make_worker(block_size=4)
    run, wait = make_request("run", 9, max_tokens=10), make_request("wait", 4)
    sched.add_request(run)
    sched.add_request(wait)
    step(sched, worker)
    assert sched.kv.num_free_blocks == 5 and sched.stats().num_waiting == 1
    sched.abort_requests(["run", "wait", "unknown"])
    sched.abort_requests("run")  # already finished: ignored
    assert sched.kv.num_free_blocks == 8 and not sched.has_unfinished_requests()
    assert run.status is wait.status is RequestStatus.FINISHED_ABORTED
    assert run.status.finish_reason == "abort"
    assert sched.schedule().finished_request_ids == {"run", "wait"}
    assert sched.schedule().finished_request_ids == set()


def test_abort_between_schedule_and_update_is_skipped(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler()
    worker = make_worker(block_size=4)
    a, b = make_request("a", 5), make_request("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    plan = sched.schedule()
    result = worker.execute(plan)
    sched.abort_requests(["a"], status=RequestStatus.FINISHED_STOPPED)  # e.g. a stop string
    assert sched.update(plan, result) == [b]
    assert a.output_token_ids == [] and a.status is RequestStatus.FINISHED_STOPPED
    assert b.output_token_ids == [10_005]
    plan = sched.schedule()
    assert "a" in plan.finished_request_ids and plan.num_scheduled_tokens == {"b": 1}
    # A new request reusing an aborted id is not fed the old plan's tokens.
    result = worker.execute(plan)
    assert result.sampled_token_ids == {"b": [10_006]}
    sched.abort_requests(["b"])
    b2 = make_request("b", 5)
    sched.add_request(b2)
    assert sched.update(plan, result) == [] and b2.output_token_ids == []


def test_partial_prefill_samples_nothing(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    worker = make_worker(block_size=4)
    r = make_request("r", 6)
    sched.add_request(r)
    plan = sched.schedule()
    assert sched.update(plan, worker.execute(plan)) == []
    assert r.num_output_tokens == 0 and r.num_computed_tokens == 4
    plan = sched.schedule()
    assert plan.cached_requests[0].num_computed_tokens == 4
    assert sched.update(plan, worker.execute(plan)) == [r] and r.num_output_tokens == 1


# ------------------------------------------------------------------------ stop conditions


def finish_one(
    sched: Scheduler, make_worker: MakeWorker, req: Request, sampled: list[int]
) -> list[int]:
    worker = make_worker(block_size=4, next_token=cycle_sampler(sampled))
    sched.add_request(req)
    for _ in range(100):
        if not sched.has_unfinished_requests():
            break
        step(sched, worker)
    assert req.is_finished and sched.kv.num_free_blocks == sched.kv.pool.num_blocks
    return req.output_token_ids


def test_stop_on_eos(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    r = make_request("r", 3, max_tokens=10, eos_token_ids=frozenset({7}))
    assert finish_one(make_scheduler(), make_worker, r, [5, 6, 7, 8]) == [5, 6, 7]
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason is None


def test_ignore_eos_runs_to_max_tokens(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    r = make_request("r", 3, max_tokens=6, eos_token_ids=frozenset({7}), ignore_eos=True)
    assert finish_one(make_scheduler(), make_worker, r, [5, 6, 7, 8]) == [5, 6, 7, 8, 5, 6]
    assert r.status is RequestStatus.FINISHED_LENGTH


def test_stop_token_ids_set_stop_reason(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    r = make_request("r", 3, max_tokens=10, stop_token_ids=[6])
    assert finish_one(make_scheduler(), make_worker, r, [5, 6, 7]) == [5, 6]
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 6


def test_min_tokens_delays_eos_and_stop_tokens(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    r = make_request("r", 3, max_tokens=10, eos_token_ids=frozenset({6}), min_tokens=3)
    assert finish_one(make_scheduler(), make_worker, r, [5, 6]) == [5, 6, 5, 6]
    assert r.status is RequestStatus.FINISHED_STOPPED
    r = make_request("s", 3, max_tokens=10, stop_token_ids=[6], min_tokens=2)
    assert finish_one(make_scheduler(), make_worker, r, [5, 6]) == [5, 6]  # 2 >= min_tokens
    assert r.stop_reason == 6


def test_max_tokens_and_max_model_len(
    make_request: MakeRequest, make_scheduler: MakeScheduler, make_worker: MakeWorker
) -> None:
    r = make_request("r", 3, max_tokens=3)
    assert finish_one(make_scheduler(), make_worker, r, [5]) == [5, 5, 5]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.status.finish_reason == "length"
    r = make_request("m", 5, max_tokens=None)
    assert finish_one(make_scheduler(max_model_len=8), make_worker, r, [5]) == [5, 5, 5]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 8
