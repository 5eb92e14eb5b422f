"""Sampling with a draft model keeps the target's distribution, end to end (CPU, tiny vocab).

A 2-layer model with a 12-token vocabulary (spiky random weights) is the target; its first
layer with the same norm and LM head (`layers:1`) is a draft whose distributions differ a
lot. Many seeded requests generate 4 tokens each; tokens 2 and 3 come from verification
(K = 2). Their empirical distribution must match the target's exact marginals, computed by
enumerating the prefixes with logprobs; the same test fails with a wrong acceptance rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

import turbollm.spec.verification as verification
from turbollm import LLM, SamplingParams
from turbollm.models.arch import PRESETS

VOCAB, N = 12, 800
PROMPT = [1, 4, 7]


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    exp = probs * n
    stat = ((counts - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((VOCAB - 1) / 2, dtype=torch.float64), stat / 2))


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    from transformers import AutoConfig, AutoModelForCausalLM

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = replace(PRESETS["tiny-llama"], vocab_size=VOCAB, eos_token_ids=()).to_hf_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             dtype=torch.float32)
    with torch.no_grad():  # spiky weights: far-from-uniform, and far-apart, distributions
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    path = str(tmp_path_factory.mktemp("tiny-vocab"))
    model.save_pretrained(path)
    try:
        yield LLM(path, device="cpu", num_blocks=1024, max_num_seqs=256, max_num_batched_tokens=1024,
                  speculative_method="draft", draft_model="layers:1", num_speculative_tokens=2,
                  speculative_adaptive=False)
    finally:
        torch.set_num_threads(old)


def _next_probs(llm: LLM, prefixes: list[list[int]]) -> torch.Tensor:
    """Target p(next | prefix) for each prefix [P, V], from the raw logprobs of one step."""
    sp = SamplingParams(temperature=1.0, max_tokens=1, logprobs=VOCAB, seed=0)
    outs = llm.generate(prefixes, sp, use_tqdm=False)
    probs = torch.zeros(len(prefixes), VOCAB, dtype=torch.float64)
    for i, o in enumerate(outs):
        for tok, lp in o.outputs[0].logprobs[0].top:  # type: ignore[index]
            probs[i, tok] = float(torch.tensor(lp).exp())
    return probs


def _marginals(llm: LLM) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact target marginals of output tokens 2 and 3 [V] each."""
    p1 = _next_probs(llm, [PROMPT])[0]  # [V]
    p2 = _next_probs(llm, [PROMPT + [a] for a in range(VOCAB)])  # [V, V]
    p3 = _next_probs(llm, [PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
    joint12 = p1[:, None] * p2  # [V, V]
    return joint12.sum(0), (joint12.reshape(-1, 1) * p3).sum(0)


def _samples(llm: LLM) -> tuple[torch.Tensor, torch.Tensor, Any]:
    params = [SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=s) for s in range(N)]
    before = llm.engine.stats().spec
    outs = llm.generate([PROMPT] * N, params, use_tqdm=False)
    toks = torch.tensor([o.outputs[0].token_ids for o in outs])  # [N, 4]
    after = llm.engine.stats().spec
    assert before is not None and after is not None
    rate = (after.num_accepted_tokens - before.num_accepted_tokens) / (
        after.num_draft_tokens - before.num_draft_tokens)
    return (torch.bincount(toks[:, 1], minlength=VOCAB).double(),
            torch.bincount(toks[:, 2], minlength=VOCAB).double(), rate)


def test_sampled_tokens_follow_target(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    m2, m3 = _marginals(llm)
    c2, c3, rate = _samples(llm)
    assert 0.2 < rate < 0.9  # the draft really differs from the target, yet is often accepted
    assert _chi2_pvalue(c2, m2) > 1e-3 and _chi2_pvalue(c3, m3) > 1e-3
    # The same test fails for a wrong rule (accept every draft): it can tell.
    monkeypatch.setattr(verification, "acceptance_probs", lambda pd, qd: torch.ones_like(pd))
    w2, w3, _ = _samples(llm)
    assert min(_chi2_pvalue(w2, m2), _chi2_pvalue(w3, m3)) < 1e-6
