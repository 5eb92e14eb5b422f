"""LLMEngine: validates and tokenizes requests, steps the scheduler and the executor,
detokenizes, and builds RequestOutputs. Host side; single-threaded.

A prompt with n > 1 completions becomes n scheduler Requests ("<id>#<i>") that share the
prompt's KV blocks through the prefix cache; the engine folds them back into one output.
Prompt logprobs are asked of the first child only (they are the same for every child) and
collected on the group, dropping what a request recomputes after a preemption.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from turbollm.config import EngineConfig
from turbollm.core.plan import StepPlan, StepResult, TokenLogprobs
from turbollm.core.request import Request, RequestStatus
from turbollm.core.scheduler import Scheduler, SchedulerStats
from turbollm.engine.detokenizer import IncrementalDetokenizer
from turbollm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from turbollm.errors import PromptTooLongError
from turbollm.sampling_params import SamplingParams
from turbollm.worker.executor import Executor, PendingStep

_MIX = 0x9E3779B97F4A7C15


@dataclass
class _Child:
    """Engine-side state of one completion (one scheduler Request)."""

    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    num_seen: int = 0
    """Output tokens already passed to the detokenizer."""


@dataclass
class _Group:
    """Engine-side state of one user request and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """One entry per prompt token received so far (the first is None); None if not asked."""
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    final_only: bool = False
    """step() reports the group only once it has finished (offline generation)."""


class LLMEngine:
    """The request path: add_request -> step() ... -> RequestOutputs (see DESIGN.md)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = Executor(config)
        self.model_info = self.executor.info
        self.max_model_len = self.model_info.max_model_len
        self.tokenizer = self.executor.load_tokenizer()
        self.eos_token_ids = self._eos_ids()
        self.num_blocks = self.executor.initialize_cache()
        self.kv_capacity_tokens = self.num_blocks * config.cache.block_size
        if self.num_blocks < 1:
            raise ValueError("the KV-cache budget holds no block; raise the memory budget")
        self.overlap = self.executor.overlap_steps
        self.scheduler = Scheduler(config.scheduler, config.cache, self.num_blocks, self.max_model_len,
                                   config.speculative, async_scheduling=self.overlap)
        self._inflight: tuple[StepPlan, PendingStep] | None = None
        """Overlapped scheduling: the step launched last, whose result is not processed yet."""
        self._groups: dict[str, _Group] = {}
        self._child_to_group: dict[str, str] = {}
        self._counter = 0

    def _eos_ids(self) -> frozenset[int]:
        # The loader already merged generation_config.json's eos ids into the arch.
        ids = set(self.model_info.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or already as ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            ids = list(self.tokenizer(prompt).input_ids)
            if not ids:
                raise ValueError("the prompt is empty")
            return ids
        if not prompt or not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError("a prompt must be a string or a non-empty list of token ids")
        vocab = self.model_info.arch.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return list(prompt)

    def next_request_id(self) -> str:
        self._counter += 1
        return str(self._counter)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        final_only: bool = False,
    ) -> None:
        """Validate, tokenize (unless prompt_token_ids is given) and queue a request.

        final_only: step() returns this request's output only when it has finished, not
        after every step (LLM.generate: saves copying every unfinished output each step).
        Raises (ValueError, PromptTooLongError) before anything is queued.
        """
        params = params or SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt) if prompt_token_ids is None else prompt_token_ids
        max_tokens = self.resolve_max_tokens(len(ids), params)
        group = _Group(request_id, prompt if isinstance(prompt, str) else None, ids,
                       prompt_logprobs=[] if params.prompt_logprobs is not None else None, final_only=final_only)
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = params.clone(seed=(params.seed * _MIX + i) % (2**63))
            if i > 0 and params.prompt_logprobs is not None:
                # Once per prompt: the other children may then share child 0's prefix blocks.
                child_params = child_params.clone(prompt_logprobs=None)
            req = Request(f"{request_id}#{i}" if params.n > 1 else request_id, ids, child_params,
                          self.eos_token_ids, max_tokens, group.metrics.arrival_time)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                           list(params.stop or []), params.include_stop_str_in_output)
            group.children.append(_Child(i, req, detok, [] if params.logprobs is not None else None))
        self._groups[request_id] = group
        for child in group.children:
            self._child_to_group[child.request.request_id] = request_id
            self.scheduler.add_request(child.request)

    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """New-token cap: what the user asked, trimmed to the context; the prompt must leave room."""
        limit = min(self.max_model_len, self.kv_capacity_tokens)
        if prompt_len >= limit:
            what = "context length" if limit == self.max_model_len else "KV-cache capacity"
            raise PromptTooLongError(
                f"the prompt has {prompt_len} tokens, but the {what} is {limit} tokens "
                f"(a prompt must leave room for at least one new token)"
            )
        room = limit - prompt_len
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests now and free their KV blocks; unknown ids are ignored."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self._groups.pop(rid, None)
            if group is None:
                continue
            self.scheduler.abort_requests([c.request.request_id for c in group.children])
            for c in group.children:
                self._child_to_group.pop(c.request.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update; return outputs of requests that changed.

        Overlapped (async_scheduling): launch step N+1, then wait for step N's tokens and
        process them (update, detokenize) while the device runs N+1; the outputs returned
        are step N's. The first call returns no outputs.
        """
        plan = self.scheduler.schedule()
        if not self.overlap:
            return self._process(plan, self.executor.execute(plan))
        launched = (plan, self.executor.execute_async(plan))
        previous, self._inflight = self._inflight, launched
        if previous is None:
            return []
        return self._process(previous[0], previous[1].result())

    def _process(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Apply a step's result: scheduler update, prompt logprobs, detokenize, outputs."""
        updated = self.scheduler.update(plan, result)
        if result.prompt_logprobs:
            self._collect_prompt_logprobs(plan, result)
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        for req in updated:
            gid = self._child_to_group.get(req.request_id)
            if gid is None:
                continue
            group = self._groups[gid]
            child = next(c for c in group.children if c.request is req)
            self._process_child(child, result.logprobs.get(req.request_id, []))
            if group.metrics.first_token_time is None and req.num_output_tokens:
                group.metrics.first_token_time = now
            touched[gid] = group
        return [self._make_output(g, now) for g in touched.values()
                if not g.final_only or all(c.request.is_finished for c in g.children)]

    def _collect_prompt_logprobs(self, plan: StepPlan, result: StepResult) -> None:
        """Append each chunk's prompt logprobs to its group, skipping entries already held.

        A chunk starting at position s reports prompt tokens from index s + 1 (from 0 when
        s == 0, see StepResult); after a preemption the prompt is recomputed from 0.
        """
        starts = {r.request_id: r.num_computed_tokens for r in plan.new_requests}
        starts.update((r.request_id, r.num_computed_tokens) for r in plan.cached_requests)
        for rid, entries in result.prompt_logprobs.items():
            gid = self._child_to_group.get(rid)
            group = self._groups.get(gid) if gid is not None else None
            if group is None or group.prompt_logprobs is None:
                continue  # aborted since the plan was made
            start = starts[rid]
            first = 0 if start == 0 else start + 1
            have = group.prompt_logprobs
            assert first <= len(have), f"{rid}: prompt logprobs arrived out of order"
            have.extend(entries[len(have) - first :])

    def _process_child(self, child: _Child, logprobs: list[TokenLogprobs]) -> None:
        req = child.request
        # A speculative step samples several tokens; the scheduler may have kept fewer (a stop
        # token or the length cap came first), and a stop string may end the text earlier.
        new_tokens = req.output_token_ids[child.num_seen :]
        check = req.num_output_tokens >= req.sampling_params.min_tokens
        hit = child.detok.update(new_tokens, check_stop=check)
        kept = child.detok.num_consumed
        if child.logprobs is not None:
            child.logprobs.extend(logprobs[:kept])
        if hit is not None and not req.is_finished:
            self.scheduler.abort_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            req.stop_reason = hit
            if kept < len(new_tokens):
                req.truncate_output(req.num_output_tokens - (len(new_tokens) - kept))
        elif hit is None and req.is_finished:
            child.detok.flush()  # its last tokens may end inside a character
        child.num_seen = req.num_output_tokens

    def _make_output(self, group: _Group, now: float) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=c.index,
                text=c.detok.text,
                token_ids=list(c.request.output_token_ids),
                finish_reason=c.request.status.finish_reason,
                stop_reason=c.request.stop_reason,
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
            )
            for c in group.children
        ]
        finished = all(o.finished for o in outs)
        if finished:
            group.metrics.finished_time = now
            self._groups.pop(group.request_id, None)
            for c in group.children:
                self._child_to_group.pop(c.request.request_id, None)
        prompt_lps = list(group.prompt_logprobs) if group.prompt_logprobs is not None else None
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                             group.metrics, prompt_lps)

    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from the model's generation_config.json (as SamplingParams fields)."""
        g = self.model_info.generation_defaults
        keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "repetition_penalty": "repetition_penalty", "min_p": "min_p"}
        out = {ours: g[theirs] for theirs, ours in keys.items() if g.get(theirs) is not None}
        if g.get("do_sample") is False:
            out["temperature"] = 0.0
        return out
