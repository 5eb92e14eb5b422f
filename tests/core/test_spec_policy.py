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


def _policy(k: int = 4) -> SpecPolicy:
    return SpecPolicy(SpeculativeConfig("draft", draft_model="layers:1", num_speculative_tokens=k), True)


def test_policy_measures_plain_first_then_probes_one_request() -> None:
    pol = _policy()
    assert pol.choose([Candidate("a", 4)]) == {}  # no plain-decode measurement at batch 1 yet
    pol.observe_step(1, 1, False, 0.010)
    assert pol.choose([Candidate("a", 4)]) == {"a": 2}  # no speculative measurement yet: probe
    pol.observe_step(8, 8, False, 0.020)
    # At batch 8 the first probe is the one request whose draft has least to catch up, with
    # two drafts, not the whole batch.
    pol.draft_valid["c"] = 38
    cands = [Candidate(c, 4, num_tokens=40, room=50) for c in "abcdefgh"]
    assert pol.choose(cands) == {"c": 2}


def _measured(pol: SpecPolicy) -> None:
    """Target: weight-bound up to 16 tokens, then linear; the draft costs 0.05 of a target
    step per forward up to 16 tokens, then linear (a prefill)."""
    for b in (1, 2, 4, 8, 16, 32, 64):
        pol.observe_step(b, b, False, 0.010 * max(1.0, b / 16))
    for n in (2, 5, 10, 20, 40, 80, 160, 320):
        pol.observe_step(1, n, True, 0.010 * max(1.0, n / 16) + 0.0005, 0.0005,
                         [(m, 0.0005 * max(1.0, m / 16)) for m in (n, 1)])
    for m in (64, 512, 2048):
        pol.draft.observe(m, 0.0005 * m / 16, pol.step)
    pol.explore_budget = 0.0  # no re-test probe unless a test earns one


def test_policy_speculates_when_cheap_and_stops_when_costly() -> None:
    pol = _policy()
    _measured(pol)
    for _ in range(10):
        pol.observe_request("good", 4, 4, 4, 100)
        pol.observe_request("bad", 4, 4, 0, 100)
    ks = pol.choose([Candidate("good", 4, 101, 100)])
    assert ks["good"] >= 3
    assert pol.choose([Candidate("bad", 4, 101, 100)]) == {}  # a request whose drafts all fail
    big = [Candidate(f"r{i}", 4, 101, 100) for i in range(64)]
    for c in big:
        pol.observe_request(c.request_id, 4, 4, 2, 100)  # acceptance ~0.5: not worth 2x the step
    assert pol.choose(big) == {}


def test_predicted_cost_charges_the_drafts_catch_up() -> None:
    pol = _policy()
    _measured(pol)
    for _ in range(10):
        pol.observe_request("warm", 4, 4, 4, 100)
    pol.acceptance["cold"] = pol.acceptance["warm"]  # same acceptance, draft cache empty
    warm, cold = Candidate("warm", 4, 101, room=3), Candidate("cold", 4, 2000, room=3)
    rates = [pol._gain_rates("warm")]
    w = pol._option([warm], rates, [pol.catch_up(warm)], [4])
    c = pol._option([cold], rates, [pol.catch_up(cold)], [4])
    assert pol.catch_up(warm) == 1 and pol.catch_up(cold) == 2000
    # A 2000-token draft prefill: ~0.062 s, over the 1-2 steps the request has left.
    assert c.seconds - w.seconds > 0.02
    assert pol.choose([warm])["warm"] >= 3
    assert pol.choose([cold]) == {}  # same acceptance, but its catch-up would not pay back
    # With room to repay the catch-up it speculates; a preempted request catches up again.
    assert pol.choose([Candidate("cold", 4, 2000, room=400)])
    pol.draft_lost("warm")
    assert pol.catch_up(warm) == 101


def test_probe_is_budgeted_and_only_for_the_cheapest_request() -> None:
    pol = _policy(k=2)
    _measured(pol)
    for i in range(32):  # an untrained draft: nothing is ever accepted
        pol.observe_request(f"old{i}", 2, 2, 0, 40)
    cands = [Candidate(f"r{i}", 2, num_tokens=40 + i, room=15) for i in range(32)]
    assert pol.choose(cands) == {}  # not worth it, and no budget to re-test yet
    steps = 0
    while not (ks := pol.choose(cands)):
        pol.observe_step(32, 32, False, 0.020)
        steps += 1
    assert ks == {"r0": 2}  # the request with the shortest catch-up, two drafts
    # The probe's predicted extra cost was earned at 1% of the plain steps since the last.
    extra = pol._option(cands, [pol._gain_rates(c.request_id) for c in cands],
                        [pol.catch_up(c) for c in cands], [2] + [0] * 31, amortize=False).seconds - 0.020
    # ... with its whole catch-up (40 draft tokens), which a probe pays for nothing later.
    assert extra > pol.draft.predict(40) > 0.001
    assert steps * 0.020 * 0.01 >= extra > (steps - 1) * 0.020 * 0.01
    assert pol.explore_budget == 0.0 and pol.choose(cands) == {}


def test_ngram_empty_proposals_cost_nothing() -> None:
    pol = SpecPolicy(SpeculativeConfig("ngram", num_speculative_tokens=8), False)
    for n in (1, 2, 4, 8, 16):  # every extra token costs 25% of a step
        pol.observe_step(1, n, n > 1, 0.010 * (0.75 + 0.25 * n))
    for _ in range(20):  # a match every other step, and then 5 of 8 accepted
        pol.observe_request("a", 8, 8, 5)
        pol.observe_request("a", 8, 0, 0)
    a1, _, fill = pol._gain_rates("a")
    assert 0.4 < fill < 0.6 and a1 == fill * pol.rates("a")[0]
    # Eight planned slots cost what the ~4 the proposer is expected to fill cost.
    option = pol._option([Candidate("a", 8, 100, 100)], [pol._gain_rates("a")], [0], [8])
    assert abs(option.seconds - 0.010 * (0.75 + 0.25 * (1 + 8 * fill))) < 1e-9
    assert pol.choose([Candidate("a", 8, 100, 100)])


def test_speculation_widens_by_doubling_over_cold_drafts() -> None:
    pol = _policy()
    for n in (1, 8, 32, 64, 128, 256):  # weight-bound: every size costs the same
        pol.observe_step(n, n, False, 0.010)
        pol.observe_step(n, 2 * n, True, 0.010, 0.0, [(n, 0.0005 * max(1.0, n / 16))])
    pol.explore_budget = 0.0
    for _ in range(10):  # every request would accept everything
        pol.observe_request("w", 4, 4, 4, 100)
    pol.draft_valid["w"] = 100
    cold = [Candidate(f"c{i}", 4, 150 + i, room=400) for i in range(30)]
    for c in cold:
        pol.acceptance[c.request_id] = pol.acceptance["w"]
    ks = pol.choose([Candidate("w", 4, 101, room=400), *cold])
    # The current one, and as many requests needing a catch-up as speculate already (one),
    # least catch-up first: not the whole batch at once.
    assert set(ks) == {"w", "c0"}
    for i in range(1, 4):
        pol.draft_valid[f"c{i}"] = 150 + i
    ks = pol.choose([Candidate("w", 4, 101, room=400), *cold])
    # Four current ones (w, c1-c3) admit four more: c0 and c4-c6.
    assert set(ks) == {"w", "c1", "c2", "c3"} | {"c0", "c4", "c5", "c6"}


def test_free_probes_only_until_drafts_are_measured() -> None:
    pol = SpecPolicy(SpeculativeConfig("ngram", num_speculative_tokens=8), False)
    pol.observe_step(1, 1, False, 0.010)
    for _ in range(3):  # n-gram probes that found no match cost nothing: probe again
        assert pol.choose([Candidate("a", 8, 100, 100)]) == {"a": 2}
        pol.observe_step(1, 1, True, 0.010)
        pol.observe_request("a", 2, 0, 0)
    pol.observe_step(1, 3, True, 0.013)  # a probe that drafted: measured, no longer free
    for _ in range(10):
        pol.observe_request("a", 2, 2, 0)
    assert pol.choose([Candidate("a", 8, 100, 100)]) == {}


def test_noise_cannot_make_speculation_free() -> None:
    pol = _policy()
    pol.observe_step(1, 1, False, 0.010)
    pol.observe_step(1, 3, True, 0.012, 0.002, [(40, 0.0015), (1, 0.0005)])
    pol.observe_step(8, 8, False, 0.020)
    cands = [Candidate(f"r{i}", 4, 41, room=50) for i in range(8)]
    # A noisy speculative measurement below the plain step: a speculative step still costs
    # at least a plain one, so useless drafts stay useless.
    pol.observe_step(8, 10, True, 0.016, 0.002, [(41, 0.0015), (1, 0.0005)])
    for _ in range(5):
        pol.observe_request("r0", 2, 2, 0, 42)
    pol.explore_budget = 0.0
    assert pol.choose([Candidate("r0", 2, 43, room=50)] + cands[1:]) == {}


def test_cost_table_never_predicts_a_size_dearer_than_a_larger_measured_one() -> None:
    from turbollm.core.spec_policy import CostTable

    t = CostTable()
    t.observe(1, 0.010, 0)
    t.observe(2, 0.030, 0)  # an outlier (a first, cold step)
    t.observe(8, 0.012, 0)
    assert t.predict(2) == 0.012 and t.predict(1) == 0.010
    assert t.lower_bound(100) == 0.012 and t.predict(16) >= 0.012
    one = CostTable()
    one.observe(10, 0.010, 0)
    assert one.predict(20) == 0.020  # one point, no slope known: proportional, never flat
    assert one.predict(20, slope=0.0001) == 0.010 + 0.001


def test_scheduler_mirrors_what_the_draft_cache_holds() -> None:
    spec = SpeculativeConfig("draft", draft_model="layers:1", num_speculative_tokens=3,
                             speculative_adaptive=False)
    s = Scheduler(SchedulerConfig(64, 8), CacheConfig(block_size=4), 32, 1024, spec)
    req = _prefill(s, "a")  # 7 tokens known, the draft has seen none
    pol = s.spec_policy
    assert pol is not None
    cand = Candidate("a", 3, req.num_tokens)
    assert pol.catch_up(cand) == 7
    plan = s.schedule()
    # One draft accepted: the draft cached positions 6..8 (last token, drafts 1-2), of
    # which 0..7 stay valid; 9 tokens known, so one to catch up next time.
    s.update(plan, StepResult(sampled_token_ids={"a": [101, 102]}, num_draft_tokens={"a": 3}))
    assert pol.catch_up(Candidate("a", 3, req.num_tokens)) == 1
    plan = s.schedule()
    s.update(plan, StepResult(sampled_token_ids={"a": [1, 2, 3, 4]}, num_draft_tokens={"a": 3}))
    assert pol.catch_up(Candidate("a", 3, req.num_tokens)) == 2  # all accepted + the bonus
    s._preempt(s.running.pop())
    assert pol.catch_up(Candidate("a", 3, req.num_tokens)) == req.num_tokens
