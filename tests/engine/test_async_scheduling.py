"""Overlapped (async) scheduling gives exactly the tokens of the plain step loop.

The engine plans and launches step N+1 before step N's tokens reach the host; the worker
feeds the not-yet-known tokens from the device. On CPU the overlap buys nothing, but the
bookkeeping (placeholders, length caps, stops, preemption, penalties that force a wait) is
the same, so these tests check it here against async_scheduling="off".
"""

from __future__ import annotations

import random

import pytest

from turbollm import LLM, SamplingParams

PRESET = "tiny-llama"


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _run(mode: str, prompts, params, **kw) -> tuple[list, LLM]:
    llm = LLM(PRESET, load_format="dummy", device="cpu", async_scheduling=mode, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, llm


def _tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def _all_free(llm: LLM) -> bool:
    return llm.engine.scheduler.kv.num_free_blocks == llm.engine.num_blocks


@pytest.mark.parametrize("kw", [
    {},
    {"max_num_batched_tokens": 24},  # chunked prefill
    {"num_blocks": 20, "block_size": 4, "max_num_batched_tokens": 64},  # preemption by recompute
], ids=["plain", "chunked", "preempt"])
def test_same_tokens_as_plain_loop(kw: dict) -> None:
    prompts = _prompts(10)
    params = [
        SamplingParams(temperature=0.0, max_tokens=5 + i % 7, ignore_eos=True) if i % 3 == 0 else
        SamplingParams(temperature=0.9, top_k=20, seed=100 + i, max_tokens=9, ignore_eos=True,
                       min_tokens=2) if i % 3 == 1 else
        SamplingParams(temperature=0.0, max_tokens=11, stop_token_ids=[7, 11, 19, 23], logprobs=2)
        for i in range(len(prompts))
    ]
    sync, _ = _run("off", prompts, params, **kw)
    over, llm = _run("on", prompts, params, **kw)
    assert llm.engine.overlap and not _run("off", prompts[:1], params[:1])[1].engine.overlap
    assert _tokens(over) == _tokens(sync)
    for a, b in zip(over, sync, strict=True):
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            if cb.logprobs is not None:
                assert [lp.token_id for lp in ca.logprobs] == [lp.token_id for lp in cb.logprobs]
    assert _all_free(llm)
    if "num_blocks" in kw:
        assert llm.engine.scheduler.num_preemptions > 0


def test_penalties_force_a_wait_and_still_match() -> None:
    """A request with penalties reads its output ids: its steps wait for the previous one."""
    prompts = _prompts(4, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                             repetition_penalty=1.3 if i % 2 else 1.0, presence_penalty=0.5 * (i % 2))
              for i in range(4)]
    sync, _ = _run("off", prompts, params)
    over, llm = _run("on", prompts, params)
    assert _tokens(over) == _tokens(sync)
    assert _all_free(llm)


def test_prompt_logprobs_and_n() -> None:
    prompts = _prompts(3, seed=2)
    params = SamplingParams(temperature=0.7, seed=5, n=3, max_tokens=6, prompt_logprobs=1,
                            ignore_eos=True)
    sync, _ = _run("off", prompts, params, max_num_batched_tokens=16)
    over, llm = _run("on", prompts, params, max_num_batched_tokens=16)
    assert _tokens(over) == _tokens(sync)
    for a, b in zip(over, sync, strict=True):
        assert [e and e.token_id for e in a.prompt_logprobs] == [e and e.token_id for e in b.prompt_logprobs]
    assert _all_free(llm)


def test_abort_mid_flight_frees_blocks() -> None:
    llm = LLM(PRESET, load_format="dummy", device="cpu", async_scheduling="on")
    eng = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i, p in enumerate(_prompts(4, seed=3)):
        eng.add_request(str(i), p, sp)
    for _ in range(4):
        eng.step()
    eng.abort_request(["0", "2"])
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["1", "3"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert _all_free(llm)


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(PRESET, load_format="dummy", device="cpu", async_scheduling="sometimes")
