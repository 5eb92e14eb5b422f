"""End to end on the embedded SmolLM2: continuous batching gives transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.config import EngineConfig
from turbollm.core.plan import StepPlan
from turbollm.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a GPU is in one sentence.",
    "Give me three tips for learning Python, please, with an example of each one.",
    "Why is the sky blue?",
    "Name three planets.",
    "Summarize Romeo and Juliet in two sentences, for a reader who has never heard of it.",
    "What is 2 + 2?",
    "How do vaccines work?",
]
MAX_NEW = 20


@pytest.fixture(scope="module")
def prompts(smollm_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    tok = smollm_tokenizer
    out = []
    for i, q in enumerate(QUESTIONS):
        # Vary lengths a lot: some without the (long) default system prompt.
        msgs = [{"role": "user", "content": q}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False).input_ids)
    return out


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm, prompts) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """transformers' greedy generate, each prompt alone."""
    outs = []
    for p in prompts:
        with torch.inference_mode():
            g = hf_smollm.generate(torch.tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                                   top_p=None, top_k=None, temperature=None)
        outs.append(g[0, len(p):].tolist())
    return outs


def _trim_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _config(path: str, **kw: object) -> EngineConfig:
    return EngineConfig.from_flat(model=path, device="cpu", **kw)


def _record_plans(eng: LLMEngine) -> list[StepPlan]:
    """Keep every plan the engine's scheduler makes."""
    plans: list[StepPlan] = []
    schedule = eng.scheduler.schedule

    def recording() -> StepPlan:
        plans.append(schedule())
        return plans[-1]

    eng.scheduler.schedule = recording  # type: ignore[method-assign]
    return plans


def test_continuous_batching_matches_transformers(prompts, hf_greedy, embedded_gguf) -> None:  # type: ignore[no-untyped-def]
    budget = 24
    assert max(len(p) for p in prompts) > budget, "the token budget must force chunked prefill"
    # 14 blocks of 16 tokens cannot hold 9 requests of 20-60 tokens at once: forces preemption.
    eng = LLMEngine(_config(embedded_gguf, num_blocks=14, max_num_batched_tokens=budget))
    plans = _record_plans(eng)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    outs: dict[str, list[int]] = {}
    for i in range(5):  # five arrive together, the rest one per step while those run
        eng.add_request(str(i), prompts[i], params)
    step = 0
    while eng.has_unfinished_requests() or 5 + step < len(prompts):
        if 5 + step < len(prompts):
            eng.add_request(str(5 + step), prompts[5 + step], params)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        step += 1
    assert all(p.total_num_scheduled_tokens <= budget for p in plans)
    chunked = [p for p in plans if any(1 < n < len(prompts[int(r)]) for r, n in p.num_scheduled_tokens.items())]
    assert chunked, "some prompt should have been split over steps"
    mixed = [p for p in plans if 1 in p.num_scheduled_tokens.values() and max(p.num_scheduled_tokens.values()) > 1]
    assert mixed, "some step should mix decodes with a prompt chunk"
    assert eng.stats().num_preemptions > 0, "the KV budget should have forced a preemption"
    assert eng.scheduler.kv.num_free_blocks == eng.num_blocks
    for i, ref in enumerate(hf_greedy):
        assert _trim_eos(outs[str(i)], eng.eos_token_ids) == _trim_eos(ref, eng.eos_token_ids), f"prompt {i}"
