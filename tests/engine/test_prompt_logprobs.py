"""Prompt logprobs on a tiny random model against transformers' log_softmax (float32, CPU).

Covers one prefill, chunked prefill (a small token budget), recompute after preemption (a
small KV budget: no duplicates, full length), n > 1, and a request without prompt logprobs
in the same batch (unaffected, and its rows never reach the LM head).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.core.plan import StepPlan, StepResult, TokenLogprobs

TOL = 1e-4  # logits match transformers to ~1e-6 on tiny configs (test_llama_vs_hf.py)
K = 3


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def _reference(hf: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [len, vocab]


def _check(got: list[TokenLogprobs | None] | None, ref: torch.Tensor, prompt: list[int], k: int) -> None:
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    for i, lp in enumerate(got[1:], start=1):
        assert lp is not None and lp.token_id == prompt[i]
        row = ref[i - 1]  # position i - 1 predicts token i
        want = row[prompt[i]].item()
        assert abs(lp.logprob - want) <= TOL, f"token {i}: {lp.logprob} vs {want}"
        assert lp.rank == 1 + int((row > row[prompt[i]]).sum())
        top_lp, top_ids = row.topk(k)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        err = max((abs(a - b) for (_, a), b in zip(lp.top, top_lp.tolist(), strict=True)), default=0.0)
        assert err <= TOL


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> tuple[str, torch.nn.Module]:  # type: ignore[no-untyped-def]
    return tiny_checkpoint("tiny-llama")


def _llm(path: str, **options: object) -> LLM:
    opts = {"device": "cpu", "dtype": "float32", "block_size": 4, "num_blocks": 128, **options}
    return LLM(path, **opts)


def _spy(llm: LLM) -> list[tuple[StepPlan, StepResult]]:
    """Record every (plan, result) the executor sees."""
    seen: list[tuple[StepPlan, StepResult]] = []
    execute = llm.engine.executor.execute

    def spy(plan: StepPlan) -> StepResult:
        result = execute(plan)
        seen.append((plan, result))
        return result

    llm.engine.executor.execute = spy  # type: ignore[method-assign]
    return seen


def test_params_validate_prompt_logprobs() -> None:
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [512, 7], ids=["one-prefill", "chunked"])
def test_prompt_logprobs_match_transformers(tiny, budget: int) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny
    llm = _llm(path, max_num_batched_tokens=budget)
    seen = _spy(llm)
    prompt = _prompt(37, seed=1)
    sp = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=K)
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    _check(out.prompt_logprobs, _reference(hf, prompt), prompt, K)
    assert out.outputs[0].logprobs is None  # prompt logprobs do not turn on sampled logprobs
    chunks = [r.prompt_logprobs for _, r in seen if r.prompt_logprobs]
    assert len(chunks) == (1 if budget == 512 else -(-37 // budget))


def test_single_token_prompt_and_zero_alternatives(tiny) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny
    llm = _llm(path)
    (one, two) = llm.generate([[5], [5, 9]], SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)
    assert one.prompt_logprobs == [None]
    _check(two.prompt_logprobs, _reference(hf, [5, 9]), [5, 9], 0)


def test_other_requests_unaffected_and_skip_the_lm_head(tiny) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny
    llm = _llm(path)
    asks, plain = _prompt(30, seed=2), _prompt(25, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    alone = llm.generate([plain], greedy, use_tqdm=False)[0]
    runner = llm.engine.executor.runner
    rows: list[int] = []
    compute_logits = runner.model.compute_logits

    def count(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.shape[0])
        return compute_logits(hidden)

    runner.model.compute_logits = count  # type: ignore[method-assign]
    try:
        a, b = llm.generate([asks, plain], [greedy.clone(prompt_logprobs=K), greedy], use_tqdm=False)
    finally:
        del runner.model.compute_logits
    _check(a.prompt_logprobs, _reference(hf, asks), asks, K)
    assert b.prompt_logprobs is None
    assert b.outputs[0].token_ids == alone.outputs[0].token_ids
    for x, y in zip(b.outputs[0].logprobs or [], alone.outputs[0].logprobs or [], strict=True):
        assert abs(x.logprob - y.logprob) <= 1e-5 and x.token_id == y.token_id
    # Prompt rows: 29 positions of the asking request; then 2 sampling rows per step for 8 steps.
    assert sum(rows) == 29 + 2 * 8


def test_preemption_recomputes_without_duplicates(tiny) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny
    # 4 requests of 26 + 12 tokens (10 blocks each) over 24 blocks, in chunks of at most 6:
    # the newest running request is preempted, some mid-prompt, and recomputed.
    llm = _llm(path, num_blocks=24, max_num_batched_tokens=16, long_prefill_token_threshold=6)
    seen = _spy(llm)
    prompts = [_prompt(26, seed=10 + i) for i in range(4)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=K)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0
    reported: dict[str, int] = {}
    for _, r in seen:
        for rid, entries in r.prompt_logprobs.items():
            reported[rid] = reported.get(rid, 0) + len(entries)
    assert any(n > 26 for n in reported.values()), "no prompt was reported twice: weak test"
    for prompt, out in zip(prompts, outs, strict=True):
        _check(out.prompt_logprobs, _reference(hf, prompt), prompt, K)
        assert len(out.outputs[0].token_ids) == 12


def test_n_completions_share_one_prompt_list(tiny) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny
    llm = _llm(path)
    seen = _spy(llm)
    prompt = _prompt(20, seed=4)
    sp = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, prompt_logprobs=1)
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    _check(out.prompt_logprobs, _reference(hf, prompt), prompt, 1)
    assert len(out.outputs) == 3
    assert {rid for _, r in seen for rid in r.prompt_logprobs} == {f"{out.request_id}#0"}


def test_prefix_cache_is_skipped_for_prompt_logprobs(tiny) -> None:  # type: ignore[no-untyped-def]
    path, hf = tiny
    llm = _llm(path)
    seen = _spy(llm)
    prompt = _prompt(33, seed=5)
    llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # fills the cache
    seen.clear()
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=2), use_tqdm=False)
    assert seen[0][0].new_requests[0].num_computed_tokens == 0
    _check(out.prompt_logprobs, _reference(hf, prompt), prompt, 2)
