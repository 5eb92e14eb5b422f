"""Continuous batching: which requests compute how many tokens each step (plain Python, CPU).

There are no prefill and decode phases. Each step gets a token budget; running requests are
served first, in admission order (a decode is one token, a partly computed prompt continues
its chunk), then waiting requests are admitted first come, first served. When KV blocks run
out, the newest running request is preempted by recompute: its blocks are freed and it goes
back to the front of the queue, keeping its output tokens.

Speculative decoding: a running request ready to decode may be planned 1 + K tokens (its
last token and K draft slots the worker's proposer fills; K from the SpecPolicy). `update`
then moves its num_computed_tokens back over the rejected drafts and frees the blocks that
only they needed, so the KV cache holds exactly the accepted tokens.

The scheduler owns every unfinished Request and the KVCacheManager. `schedule()` advances
each scheduled request's `num_computed_tokens` optimistically (as if the step had run), so
the next plan can be made before this step's result arrives; `update()` appends the sampled
tokens and finishes requests.

Overlapped (async) scheduling: with `async_scheduling` the engine plans step N+1 before step
N's tokens reach the host. A request that samples in a planned step holds an output
placeholder until `update()` brings the token; the next plan already schedules the
placeholder's position (the worker feeds it from the device). A request that will reach its
length cap is not scheduled past it; one that stops on EOS or a stop string wastes at most
one computed token, dropped in `update()`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from turbollm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from turbollm.core.block_pool import KVCacheManager
from turbollm.core.plan import CachedRequestData, NewRequestData, StepPlan, StepResult
from turbollm.core.request import Request, RequestStatus
from turbollm.core.spec_policy import Candidate, SpecCounters, SpecPolicy


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for logging and metrics."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    """Total since start."""
    kv_cache_usage: float
    """Fraction of KV blocks held by requests, in [0, 1]."""
    num_free_blocks: int
    prefix_cache_queries: int
    """Total prompt tokens looked up in the prefix cache at admission."""
    prefix_cache_hits: int
    """Of those, tokens whose KV was reused."""
    spec: SpecCounters | None = None
    """Speculative decoding totals (None when it is off)."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else 0.0


class Scheduler:
    """Plans steps over the KV blocks of one engine; see the module docstring."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        speculative: SpeculativeConfig | None = None,
        async_scheduling: bool = False,
    ) -> None:
        self.config = scheduler_config
        self.async_scheduling = async_scheduling
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        """Every unfinished request (waiting, preempted or running) by id."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """In admission order: the last one is the first to be preempted."""
        self.num_preemptions = 0
        self._freed_ids: set[str] = set()
        """Requests freed since the last plan; the worker must drop their state."""
        self.spec_config = speculative if speculative is not None and speculative.enabled else None
        self.spec_policy = (
            SpecPolicy(self.spec_config, self.spec_config.speculative_method == "draft")
            if self.spec_config is not None else None
        )

    # ----------------------------------------------------------------- requests in and out

    def add_request(self, request: Request) -> None:
        """Queue a new request. The engine has checked it fits max_model_len and the cache."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(
        self,
        request_ids: str | Iterable[str],
        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
    ) -> None:
        """Finish requests now with `status` (the engine uses FINISHED_STOPPED for stop
        strings) and free their blocks. Unknown or already finished ids are ignored."""
        if not status.finished:
            raise ValueError(f"abort status must be a finished status, got {status}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            spec=self.spec_policy.counters.copy() if self.spec_policy is not None else None,
        )

    # ----------------------------------------------------------------------- scheduling

    def schedule(self) -> StepPlan:
        """Plan one step within the token budget and max_num_seqs; never fails for blocks.

        Every scheduled request's num_computed_tokens is advanced by its scheduled tokens
        before returning (the plan carries the values from before the step).
        """
        plan = StepPlan()
        budget, preempted = self._schedule_running(plan, self.config.max_num_batched_tokens)
        # After a preemption blocks are scarce, and a request resumed in the same plan as
        # its preemption would confuse the worker: admit nobody this step.
        if not preempted:
            self._schedule_waiting(plan, budget)
        plan.finished_request_ids, self._freed_ids = self._freed_ids, set()
        for rid, num_tokens in plan.num_scheduled_tokens.items():
            request = self.requests[rid]
            request.num_computed_tokens += num_tokens
            # These tokens' KV exists once this step runs; later steps (executed after this
            # one) may reuse the full blocks among them whose tokens are known.
            self.kv.cache_full_blocks(request, request.num_computed_tokens)
            if self.async_scheduling and (
                request.num_computed_tokens == request.num_tokens + request.num_output_placeholders
            ):
                request.num_output_placeholders += 1  # it samples in this step
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> tuple[int, bool]:
        """Schedule running requests in order; returns (budget left, whether any was preempted)."""
        preempted = False
        spec_ks = self._choose_spec()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new == 0:  # nothing to compute until the previous step's token arrives
                i += 1
                continue
            k = min(spec_ks.get(request.request_id, 0), budget - num_new)
            new_block_ids = self.kv.allocate_slots(request, num_new + k) if k > 0 else None
            if new_block_ids is not None:  # speculation never preempts: it is dropped instead
                plan.num_spec_tokens[request.request_id] = k
                num_new += k
            else:
                new_block_ids = self.kv.allocate_slots(request, num_new)
            while new_block_ids is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_block_ids = self.kv.allocate_slots(request, num_new)
            if new_block_ids is None:  # the request preempted itself; it was the last one
                break
            plan.cached_requests.append(
                CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens)
            )
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
            i += 1
        return budget, preempted

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        """Admit waiting requests FCFS; stop at the first that does not fit."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_hit_tokens, budget)
            if self.kv.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            self.running.append(request)
            plan.new_requests.append(
                NewRequestData(
                    request_id=request.request_id,
                    token_ids=list(request.all_token_ids),
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling_params=request.sampling_params,
                    block_ids=self.kv.block_ids(request.request_id),
                    num_computed_tokens=num_hit_tokens,
                )
            )
            plan.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new

    def _choose_spec(self) -> dict[str, int]:
        """K per running request that is ready to decode (see SpecPolicy), capped so the
        drafts fit max_tokens and the context."""
        if self.spec_policy is None or self.spec_config is None:
            return {}
        k_max = self.spec_config.num_speculative_tokens
        cands = []
        for r in self.running:
            if r.num_tokens - r.num_computed_tokens != 1:
                continue
            room = self.max_model_len - r.num_tokens - 1
            if r.max_tokens is not None:
                room = min(room, r.max_tokens - r.num_output_tokens - 1)
            cands.append(Candidate(r.request_id, max(0, min(k_max, room)), r.num_tokens, room))
        return self.spec_policy.choose(cands)

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        pending = request.num_output_placeholders
        if pending and self._reaches_length_cap(request, request.num_output_tokens + pending):
            return 0  # its last token is already being sampled
        num_new = max(0, min(request.num_tokens + pending - num_computed, budget))
        if self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _reaches_length_cap(self, request: Request, num_outputs: int) -> bool:
        if request.max_tokens is not None and num_outputs >= request.max_tokens:
            return True
        return request.num_prompt_tokens + num_outputs >= self.max_model_len

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, requeue at the front.

        A token still in flight for it is appended by `update()` all the same."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        if self.spec_policy is not None:
            self.spec_policy.draft_lost(request.request_id)
        self.waiting.appendleft(request)
        self._freed_ids.add(request.request_id)

    # --------------------------------------------------------------------------- results

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Append sampled tokens, apply stop conditions, free finished requests.

        Returns the requests that got tokens (finished ones included, with their status set).
        Requests aborted or preempted since `plan` was made are skipped.
        """
        touched: list[Request] = []
        any_finished = False
        if self.spec_policy is not None:
            if plan.num_spec_tokens:
                self._rollback(plan, result)
            self._observe_step_cost(plan, result)
        for rid, token_ids in result.sampled_token_ids.items():
            request = self.requests.get(rid)
            if not token_ids or rid not in plan.num_scheduled_tokens or request is None:
                continue
            running = request.status is RequestStatus.RUNNING
            if not running and not self.async_scheduling:
                continue  # preempted since the plan: it recomputes this position
            # Overlapped scheduling: a request preempted after this step was planned still
            # gets its token (the step ran before its blocks were reused).
            request.num_output_placeholders = max(0, request.num_output_placeholders - len(token_ids))
            for token_id in token_ids:
                request.append_output_token(token_id)
                status = self._check_stop(request, token_id)
                if status is not None:
                    if not running:
                        self.waiting.remove(request)
                    self._finish(request, status)
                    any_finished = running or any_finished
                    break
            touched.append(request)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return touched

    def _rollback(self, plan: StepPlan, result: StepResult) -> None:
        """Speculating requests keep the KV of their last token and accepted drafts only:
        num_computed_tokens moves back over the rest, and blocks past the known tokens are
        freed. Feeds the SpecPolicy each request's acceptance."""
        assert self.spec_policy is not None
        starts = {c.request_id: c.num_computed_tokens for c in plan.cached_requests}
        for rid in plan.num_spec_tokens:
            request = self.requests.get(rid)
            sampled = result.sampled_token_ids.get(rid, [])
            if request is None or request.status is not RequestStatus.RUNNING or not sampled:
                continue  # aborted or preempted since the plan: its blocks are already free
            request.num_computed_tokens = starts[rid] + len(sampled)
            self.kv.trim(request, request.num_tokens + len(sampled))
            drafted = result.num_draft_tokens.get(rid, 0)
            # A draft model has cached the last token and every draft but the last, of which
            # the accepted ones stay valid.
            draft_valid = min(starts[rid] + drafted, request.num_computed_tokens)
            self.spec_policy.observe_request(rid, plan.num_spec_tokens[rid], drafted,
                                             len(sampled) - 1, draft_valid)

    def _observe_step_cost(self, plan: StepPlan, result: StepResult) -> None:
        """Decode-only steps teach the SpecPolicy what steps cost (prompt chunks would skew it)."""
        if self.spec_policy is None or plan.new_requests:
            return
        spec = plan.num_spec_tokens
        if any(n != 1 + spec.get(r, 0) for r, n in plan.num_scheduled_tokens.items()):
            return
        num_tokens = len(plan.num_scheduled_tokens) + sum(result.num_draft_tokens.values())
        self.spec_policy.observe_step(len(plan.num_scheduled_tokens), num_tokens, bool(spec),
                                      result.step_seconds, result.draft_seconds,
                                      result.draft_forwards)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        """The finished status the just-appended token implies, or None; sets stop_reason."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_set:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Set the final status and free everything; the caller removes it from its queue."""
        request.status = status
        self.kv.free(request)
        if self.spec_policy is not None:
            self.spec_policy.forget(request.request_id)
        del self.requests[request.request_id]
        self._freed_ids.add(request.request_id)
