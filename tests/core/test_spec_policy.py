"""Scheduler side of speculative decoding: planning 1 + K, rollback, block trimming, and the
adaptive-K policy's choices from measured costs (plain Python, milliseconds)."""

from __future__ import annotations

from turbollm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from turbollm.core.plan import StepResult
from turbollm.core.request import Request
from turbollm.core.scheduler import Scheduler
from turbollm.core.spec_policy import Candidate, SpecPolicy
from turbollm.sampling_params import SamplingParams


def _scheduler(num_blocks: int = 32, adaptive: bool = False, k: int = 3) -> Scheduler:
    spec = SpeculativeConfig("ngram", num_speculative_tokens=k, speculative_adaptive=adaptive)
    return Scheduler(SchedulerConfig(64, 8), CacheConfig(block_size=4), num_blocks, 1024, spec)


def _prefill(s: Scheduler, rid: str, prompt_len: int = 6, max_tokens: int = 20) -> Request:
    req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))
    s.add_request(req)
    plan = s.schedule()
    s.update(plan, StepResult(sampled_token_ids={rid: [100]}))
    return req


def test_plan_rollback_and_trim() -> None:
    s = _scheduler()
    req = _prefill(s, "a")  # 7 tokens known, 6 computed, 2 blocks of 4
    plan = s.schedule()
    assert plan.num_scheduled_tokens["a"] == 4 and plan.num_spec_tokens == {"a": 3}
    assert len(s.kv.block_ids("a")) == 3  # slots for positions 6..9
    # One draft accepted + one new token: 9 tokens known, 8 computed.
    s.update(plan, StepResult(sampled_token_ids={"a": [101, 102]}, num_draft_tokens={"a": 3}))
    assert req.num_computed_tokens == 8 and req.num_tokens == 9
    assert len(s.kv.block_ids("a")) == 3
    plan = s.schedule()  # positions 8..11 -> blocks for 12 tokens
    assert plan.num_scheduled_tokens["a"] == 4 and len(s.kv.block_ids("a")) == 3
    # Everything rejected: 10 tokens known, 9 computed; no block past them is kept.
    s.update(plan, StepResult(sampled_token_ids={"a": [103]}, num_draft_tokens={"a": 3}))
    assert req.num_computed_tokens == 9 and len(s.kv.block_ids("a")) == 3
    stats = s.stats().spec
    assert stats is not None and stats.num_draft_tokens == 6 and stats.num_accepted_tokens == 1
    assert stats.mean_accepted_length == 1.5 and stats.acceptance_by_position == [0.5, 0.0, 0.0]
    s.abort_requests("a")
    assert s.kv.num_free_blocks == 32


def test_trim_frees_blocks_of_rejected_drafts() -> None:
    s = _scheduler(k=8)
    req = _prefill(s, "a", prompt_len=3)  # 4 known, 3 computed
    plan = s.schedule()  # positions 3..11: 3 blocks
    assert plan.num_spec_tokens == {"a": 8} and len(s.kv.block_ids("a")) == 3
    s.update(plan, StepResult(sampled_token_ids={"a": [7]}, num_draft_tokens={"a": 8}))
    assert req.num_tokens == 5 and len(s.kv.block_ids("a")) == 2
    assert s.kv.num_free_blocks == 30


def test_k_capped_by_max_tokens_and_dropped_rather_than_preempting() -> None:
    s = _scheduler(k=8)
    _prefill(s, "a", max_tokens=3)  # 1 output; 2 more allowed -> at most 1 draft
    assert s.schedule().num_spec_tokens == {"a": 1}
    tight = _scheduler(num_blocks=2, k=3)
    _prefill(tight, "b", prompt_len=7)  # 8 known: both blocks full after this step
    plan = tight.schedule()
    assert plan.num_spec_tokens == {} and plan.num_scheduled_tokens == {"b": 1}
    assert tight.num_preemptions == 0


def _policy() -> SpecPolicy:
    return SpecPolicy(SpeculativeConfig("draft", draft_model="layers:1", num_speculative_tokens=4), True)


def test_policy_measures_plain_first_then_explores() -> None:
    pol = _policy()
    assert pol.choose([Candidate("a", 4)]) == {}  # no plain-decode measurement at batch 1 yet
    pol.observe_step(1, 1, False, 0, 0.010, 0.0)
    assert pol.choose([Candidate("a", 4)])  # no speculative measurement yet: try one


def test_policy_speculates_when_cheap_and_stops_when_costly() -> None:
    pol = _policy()
    for b in (1, 2, 4, 8, 16, 32, 64):  # weight-bound up to 16 tokens, then linear
        pol.observe_step(b, b, False, 0, 0.010 * max(1.0, b / 16), 0.0)
    for n in (2, 5, 10, 20, 40, 80, 160, 320):
        pol.observe_step(1, n, True, 1, 0.010 * max(1.0, n / 16) + 0.0005, 0.0005)
    for _ in range(10):
        pol.observe_request("good", 4, 4)
        pol.observe_request("bad", 4, 0)
    ks = pol.choose([Candidate("good", 4)])
    assert ks["good"] >= 3
    assert pol.choose([Candidate("bad", 4)]) == {}  # a request whose drafts all fail
    big = [Candidate(f"r{i}", 4) for i in range(64)]
    for c in big:
        pol.observe_request(c.request_id, 4, 2)  # acceptance ~0.5: not worth 2x the step
    assert pol.choose(big) == {}
    for _ in range(pol.refresh_steps):  # plain steps only, for a while: speculation is re-tested
        pol.observe_step(64, 64, False, 0, 0.04, 0.0)
    assert pol.choose(big)


def test_policy_fixed_k_when_not_adaptive() -> None:
    pol = SpecPolicy(SpeculativeConfig("ngram", num_speculative_tokens=5, speculative_adaptive=False), False)
    assert pol.choose([Candidate("a", 5), Candidate("b", 2), Candidate("c", 0)]) == {"a": 5, "b": 2}
