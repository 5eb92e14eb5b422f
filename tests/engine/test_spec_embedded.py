"""Speculative decoding on the embedded SmolLM2 (real tokenizer): greedy n-gram output equals
plain output, and stop strings cut a multi-token step exactly where plain decoding stops."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from turbollm import LLM, SamplingParams

pytestmark = pytest.mark.slow

TASK = ("Repeat the following text exactly.\n\nTo be, or not to be, that is the question: Whether "
        "'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to take "
        "arms against a sea of troubles.")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Batch-1 decode of a small model: one thread avoids OpenMP handoffs on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_ngram_greedy_and_stop_strings(embedded_gguf: str) -> None:
    opts = {"device": "cpu", "num_blocks": 64}
    plain = LLM(embedded_gguf, **opts)
    spec = LLM(embedded_gguf, speculative_method="ngram", num_speculative_tokens=6,
               speculative_adaptive=False, **opts)
    msgs = [{"role": "user", "content": TASK}]
    sp = SamplingParams(temperature=0.0, max_tokens=40)
    ref = plain.chat(msgs, sp, use_tqdm=False)[0].outputs[0]
    got = spec.chat(msgs, sp, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == ref.token_ids and got.text == ref.text
    stats = spec.engine.stats().spec
    assert stats is not None and stats.num_accepted_tokens > 10  # copying: drafts are accepted
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 4]
    sp_stop = SamplingParams(temperature=0.0, max_tokens=40, stop=[stop], logprobs=0)
    a = plain.chat(msgs, sp_stop, use_tqdm=False)[0].outputs[0]
    b = spec.chat(msgs, sp_stop, use_tqdm=False)[0].outputs[0]
    assert b.finish_reason == "stop" and (b.text, b.token_ids) == (a.text, a.token_ids)
    assert b.logprobs is not None and len(b.logprobs) == len(b.token_ids)
