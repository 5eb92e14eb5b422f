"""Speculative decoding end to end on tiny random checkpoints (CPU, fast).

Greedy speculative output must be token-identical to plain decoding for both proposers,
across batch sizes, with chunked prefill and forced preemption; KV blocks must all come back
after aborts and preemptions mid-speculation; bad options must fail with clear errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.engine.outputs import RequestOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
PROMPTS = [
    [1, 5, 9, 13, 5, 9, 13, 7] * 3,
    [1, 20, 30, 40],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 4,
    [1, 77, 78, 79, 80, 77, 78],
    [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116],
]
SPEC = {
    "ngram": {"speculative_method": "ngram", "num_speculative_tokens": 4},
    "draft": {"speculative_method": "draft", "draft_model": "layers:1", "num_speculative_tokens": 3},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny matmuls: with two threads each op pays a thread handoff (tens of ms on a busy
    machine); one thread keeps these tests fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Callable[[str], tuple[str, torch.nn.Module]]) -> Callable[..., LLM]:
    path = tiny_checkpoint("tiny-llama")[0]

    def make(**opts: Any) -> LLM:
        base = {"device": "cpu", "num_blocks": 64, "max_num_batched_tokens": 64}
        return LLM(path, **{**base, **opts})

    return make


def _tokens(outs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _all_free(llm: LLM) -> bool:
    eng = llm.engine
    return eng.scheduler.kv.num_free_blocks == eng.num_blocks


@pytest.fixture(scope="module")
def reference(tiny: Callable[..., LLM]) -> list[list[int]]:
    return _tokens(tiny().generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("setting", [
    {"batch": 1}, {"batch": 5}, {"batch": 5, "max_num_batched_tokens": 8},
    {"batch": 5, "num_blocks": 9}, {"batch": 5, "speculative_adaptive": True},
], ids=["batch1", "batch5", "chunked", "preempt", "adaptive"])
def test_greedy_identical(tiny: Callable[..., LLM], reference: list[list[int]], method: str,
                          setting: dict[str, Any]) -> None:
    opts = {**SPEC[method], "speculative_adaptive": False, **setting}
    batch = opts.pop("batch")
    llm = tiny(**opts)
    got: list[list[int]] = []
    for i in range(0, len(PROMPTS), batch):
        got += _tokens(llm.generate(PROMPTS[i : i + batch], GREEDY, use_tqdm=False))
    assert got == reference
    stats = llm.engine.stats()
    assert stats.spec is not None
    if not opts["speculative_adaptive"]:  # speculation really ran, with hits and misses
        assert 0 < stats.spec.num_accepted_tokens < stats.spec.num_draft_tokens
    if "num_blocks" in setting:
        assert stats.num_preemptions > 0
    assert _all_free(llm)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_no_block_leaks_after_abort_mid_speculation(tiny: Callable[..., LLM], method: str) -> None:
    llm = tiny(**SPEC[method], speculative_adaptive=False, num_blocks=12)
    eng = llm.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=60, ignore_eos=True))
    spec_steps = 0
    for step in range(200):
        plan_spec = bool(eng.scheduler.running)
        eng.step()
        spec_steps += plan_spec and eng.stats().spec.num_verified > 0  # type: ignore[union-attr]
        if step == 6:
            eng.abort_request(["r0", "r3"])
        if not eng.has_unfinished_requests():
            break
    assert spec_steps > 0 and eng.stats().num_preemptions > 0
    eng.step()  # lets the worker drop the aborted requests' state
    assert _all_free(llm)
    runner = eng.executor.runner
    assert not runner.states
    assert runner.spec is not None
    runner.spec._forget_dropped()
    assert not getattr(runner.spec.proposer, "_valid", {})


def test_seeded_sampling_reproducible_and_batch_independent(tiny: Callable[..., LLM]) -> None:
    llm = tiny(**SPEC["draft"], speculative_adaptive=False)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=30, ignore_eos=True)
    a = _tokens(llm.generate([PROMPTS[0]], sp, use_tqdm=False))[0]
    b = _tokens(llm.generate([PROMPTS[0]], sp, use_tqdm=False))[0]
    other = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = _tokens(llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, sp, other], use_tqdm=False))
    assert a == b == batch[1]


def test_logprobs_and_stop_tokens(tiny: Callable[..., LLM], reference: list[list[int]]) -> None:
    llm = tiny(**SPEC["ngram"], speculative_adaptive=False)
    ref = reference[2]
    stop = ref[25]
    sp = SamplingParams(temperature=0.0, max_tokens=40, logprobs=2, stop_token_ids=[stop])
    out = llm.generate([PROMPTS[2]], sp, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: ref.index(stop) + 1] and out.finish_reason == "stop"
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    assert all(lp.token_id == t and lp.rank == 1 for lp, t in zip(out.logprobs, out.token_ids))
    assert _all_free(llm)


@pytest.mark.parametrize("opts, match", [
    ({"speculative_method": "medusa"}, "speculative_method must be one of"),
    ({"speculative_method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"speculative_method": "draft"}, "needs draft_model"),
    ({"speculative_method": "ngram", "draft_model": "layers:1"}, "needs speculative_method 'draft'"),
    ({"speculative_method": "ngram", "ngram_min": 3, "ngram_max": 2}, "ngram_min <= ngram_max"),
    ({"speculative_method": "draft", "draft_model": "layers:9"}, "N must be in"),
    ({"speculative_method": "draft", "draft_model": "layers:x"}, "integer N"),
    ({"speculative_method": "draft", "draft_model": "smollm2-135m"}, "vocabulary of 49152"),
])
def test_bad_options(tiny: Callable[..., LLM], opts: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**opts)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_prefix_cache_hits_keep_outputs(tiny: Callable[..., LLM], reference: list[list[int]], method: str) -> None:
    llm = tiny(**SPEC[method], speculative_adaptive=False)
    first = _tokens(llm.generate([PROMPTS[2]], GREEDY, use_tqdm=False))[0]
    again = _tokens(llm.generate([PROMPTS[2], PROMPTS[0]], GREEDY, use_tqdm=False))
    assert llm.engine.stats().prefix_cache_hits >= 32  # the draft recomputes what the target reuses
    assert first == again[0] == reference[2] and again[1] == reference[0]
    assert _all_free(llm)
