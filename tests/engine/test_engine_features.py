"""Engine behaviour on the embedded model: prefix cache, aborts, sampling, stops, errors."""

from __future__ import annotations

import pytest

from turbollm import LLM, SamplingParams
from turbollm.core.plan import StepPlan
from turbollm.errors import PromptTooLongError

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(embedded_gguf: str) -> LLM:
    return LLM(embedded_gguf, device="cpu", num_blocks=256, max_num_batched_tokens=256)


def _all_free(llm: LLM) -> bool:
    return llm.engine.scheduler.kv.num_free_blocks == llm.engine.num_blocks


def test_prefix_cache_reuses_two_blocks(llm: LLM) -> None:
    eng = llm.engine
    bs = eng.config.cache.block_size
    tok = llm.get_tokenizer()
    base = tok("Once upon a time in a land far, far away, there lived a wise old king who had "
               "three daughters and a great many cats, and every one of them was a different colour").input_ids
    assert len(base) >= 2 * bs + 3
    prefix = base[: 2 * bs]
    first = prefix + base[2 * bs : 2 * bs + 3]
    second = prefix + tok(" Then the dragon woke up").input_ids
    llm.generate([first], GREEDY, use_tqdm=False)

    plans: list[StepPlan] = []
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]  # type: ignore[method-assign]
    try:
        cached = llm.generate([second], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        del eng.scheduler.schedule
    new = plans[0].new_requests[0]
    assert new.num_computed_tokens == 2 * bs
    assert plans[0].num_scheduled_tokens[new.request_id] == len(second) - 2 * bs
    # Same tokens as a run that computes everything (the prefix cache is only a shortcut).
    eng.scheduler.kv = type(eng.scheduler.kv)(eng.num_blocks, bs, enable_prefix_caching=False)
    try:
        fresh = llm.generate([second], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        eng.scheduler.kv = type(eng.scheduler.kv)(eng.num_blocks, bs, enable_prefix_caching=True)
    assert cached == fresh
    assert _all_free(llm)


def test_abort_frees_blocks_and_spares_others(llm: LLM) -> None:
    eng = llm.engine
    ref = llm.generate(["The sun is"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("victim", "Tell me a long story about dragons.", SamplingParams(max_tokens=200))
    eng.add_request("other", "The sun is", GREEDY)
    done = {}
    for step in range(40):
        if step == 3:
            eng.abort_request("victim")
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        if not eng.has_unfinished_requests():
            break
    assert "victim" not in done and done["other"].outputs[0].token_ids == ref
    eng.step()  # lets the worker drop the aborted request's state
    assert _all_free(llm)
    assert not eng.executor.runner.states


def test_final_only_requests_report_once_finished(llm: LLM) -> None:
    """final_only (LLM.generate's mode) reports a request only when it has finished, with the
    same completion as a request reported every step; the other request is unaffected."""
    eng = llm.engine
    eng.add_request("every", "The sun is", GREEDY)
    eng.add_request("final", "The sun is", GREEDY, final_only=True)
    seen: dict[str, list[bool]] = {"every": [], "final": []}
    last = {}
    for _ in range(40):
        for o in eng.step():
            seen[o.request_id].append(o.finished)
            last[o.request_id] = o
        if not eng.has_unfinished_requests():
            break
    assert seen["final"] == [True]
    assert len(seen["every"]) > 1 and seen["every"][-1]
    assert last["final"].outputs[0].token_ids == last["every"].outputs[0].token_ids
    assert last["final"].outputs[0].text == last["every"].outputs[0].text


def test_generate_pauses_full_gc_collections_and_restores_them(llm: LLM) -> None:
    """LLM.generate keeps the cyclic GC to its young generations while it steps (a full
    collection stalled offline runs), and the thresholds come back afterwards, also when a
    step raises."""
    import gc

    before = gc.get_threshold()
    eng = llm.engine
    step = eng.step
    during: list[tuple[int, int, int]] = []

    def spy():  # type: ignore[no-untyped-def]
        during.append(gc.get_threshold())
        return step()

    eng.step = spy  # type: ignore[method-assign]
    try:
        llm.generate(["The sun is"], GREEDY, use_tqdm=False)
        assert during and all(t[:2] == before[:2] and t[2] >= 1 << 30 for t in during)
        assert gc.get_threshold() == before

        def boom():  # type: ignore[no-untyped-def]
            raise RuntimeError("step failed")

        eng.step = boom  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="step failed"):
            llm.generate(["The sun is"], GREEDY, use_tqdm=False)
        assert gc.get_threshold() == before
    finally:
        del eng.step
    assert _all_free(llm)


def test_seeded_sampling_reproducible(llm: LLM) -> None:
    p = "Write a sentence about the ocean."
    def run(seed: int | None) -> list[int]:
        sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=seed)
        return llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    # A seeded request does not depend on what else is in the batch.
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1)
    batch = llm.generate([p, "Hello", p], [sp, SamplingParams(max_tokens=16), sp], use_tqdm=False)
    assert batch[0].outputs[0].token_ids == a == batch[2].outputs[0].token_ids


def test_n_completions_and_logprobs(llm: LLM) -> None:
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, logprobs=2)
    (out,) = llm.generate(["My favourite colour is"], sp, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        for lp, t in zip(c.logprobs, c.token_ids):
            assert lp.token_id == t and lp.logprob <= 0 and len(lp.top) == 2
            assert lp.top[0][1] >= lp.top[1][1] >= lp.logprob or lp.rank <= 2
    assert _all_free(llm)


def test_stop_strings(llm: LLM) -> None:
    base = llm.generate(["Count: one, two, three,"], SamplingParams(temperature=0.0, max_tokens=24),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = llm.generate(["Count: one, two, three,"], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    kept = llm.generate(["Count: one, two, three,"], SamplingParams(
        temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_incremental_text_equals_full_decode(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    outs = llm.generate(["Ecris une phrase en français avec des accents: é à ç ü", "日本語で挨拶"],
                        SamplingParams(temperature=0.8, seed=3, max_tokens=30), use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_bad_input_raises_and_spares_inflight(llm: LLM) -> None:
    eng = llm.engine
    ref = llm.generate(["The sun is"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("ok", "The sun is", GREEDY)
    eng.step()
    too_long = [1] * (eng.max_model_len + 5)
    with pytest.raises(PromptTooLongError, match=f"prompt has {len(too_long)} tokens"):
        eng.add_request("long", too_long, GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        eng.add_request("bad", "hi", SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("badtok", [10**9], GREEDY)
    with pytest.raises(PromptTooLongError):
        llm.generate(["fine", too_long], GREEDY, use_tqdm=False)
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
    assert out is not None and out.request_id == "ok" and out.outputs[0].token_ids == ref
    assert _all_free(llm)


def test_chat_uses_template(llm: LLM) -> None:
    (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}], GREEDY, use_tqdm=False)
    assert "Paris" in out.outputs[0].text
