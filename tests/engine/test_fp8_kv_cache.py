"""FP8 (e4m3) KV cache: same engine, a quarter of the fp32 bytes per token, close logprobs."""

from __future__ import annotations

import random

import pytest

from turbollm import LLM, SamplingParams


def test_fp8_cache_capacity_and_logprobs() -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(40)] for _ in range(3)]
    sp = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0, ignore_eos=True)
    budget = 1 << 20
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM("tiny-llama", load_format="dummy", device="cpu", kv_cache_dtype=kv,
                  cpu_kv_cache_bytes=budget)
        runs[kv] = (llm.engine.kv_capacity_tokens, llm.generate(prompts, sp, use_tqdm=False))
    cap_auto, outs_auto = runs["auto"]
    cap_fp8, outs_fp8 = runs["fp8"]
    assert cap_fp8 == 4 * cap_auto  # fp32 on CPU -> 1 byte per value
    for a, b in zip(outs_auto, outs_fp8, strict=True):
        la = [e.logprob for e in a.prompt_logprobs[1:]]
        lb = [e.logprob for e in b.prompt_logprobs[1:]]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 0.05
        assert la != lb  # the cache really is FP8


def test_bad_kv_cache_dtype() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM("tiny-llama", load_format="dummy", device="cpu", kv_cache_dtype="int4")
