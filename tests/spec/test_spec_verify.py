"""Rejection sampling on synthetic distributions: emitted tokens follow the target exactly.

Each position j has fixed target logits (independent of the tokens before it) and a draft
distribution q_j far from the target, so the tokens emitted at position j, among requests
whose earlier drafts were all accepted, must follow the processed target p_j. A chi-square
test at a fixed seed checks that, and the same test must fail for wrong rules (so it can).
"""

from __future__ import annotations

import pytest
import torch

import turbollm.spec.verification as verify_mod
from turbollm.sample.sampler import Sampler, SamplingState, sampling_probs
from turbollm.sampling_params import SamplingParams
from turbollm.spec.verification import VerifyRequest, verify

VOCAB, K, N = 6, 3, 3000


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value (cells with expected count 0 must be empty)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with target probability 0 was emitted"
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def _run(params: SamplingParams, seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """N requests with K drafts each; returns the emitted tokens and p per position [K+1, V]."""
    gen = torch.Generator().manual_seed(1)
    target_logits = torch.randn(K + 1, VOCAB, generator=gen) * 1.5  # [K + 1, V]
    # [K, V] far from the target, but close enough that some requests reach every position
    draft_logits = 0.5 * target_logits[:K] + torch.randn(K, VOCAB, generator=gen) * 1.2
    state = SamplingState(params, [1, 2], [], frozenset(), None)
    p = sampling_probs(target_logits, [state] * (K + 1))  # [K + 1, V] the processed target
    q = sampling_probs(draft_logits, [state] * K)  # [K, V] processed the same way
    torch.manual_seed(seed)
    drafts = torch.multinomial(q, N, replacement=True).T  # [N, K]
    reqs = [VerifyRequest(SamplingState(params, [1, 2], [], frozenset(), None), d.tolist(), q)
            for d in drafts]
    logits = target_logits.repeat(N, 1)  # [N * (K + 1), V]
    emitted, _ = verify(Sampler(), logits, reqs)
    return emitted, p


def _pvalues(emitted: list[list[int]], p: torch.Tensor) -> list[float]:
    out = []
    for j in range(K + 1):
        toks = torch.tensor([e[j] for e in emitted if len(e) > j])
        assert len(toks) > 200, f"too few samples reach position {j}"
        out.append(chi2_pvalue(torch.bincount(toks, minlength=VOCAB).double(), p[j].double()))
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.9),
], ids=["plain", "temp-topk-topp"])
def test_emitted_tokens_follow_target(params: SamplingParams) -> None:
    emitted, p = _run(params)
    lengths = torch.tensor([len(e) for e in emitted]).float()
    assert 1.2 < lengths.mean() < K + 1  # some drafts accepted, some rejected
    assert min(_pvalues(emitted, p)) > 1e-3


@pytest.mark.parametrize("wrong", ["always_accept", "resample_from_p"])
def test_wrong_rules_fail_the_test(wrong: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if wrong == "always_accept":
        monkeypatch.setattr(verify_mod, "acceptance_probs", lambda pd, qd: torch.ones_like(pd))
    else:
        monkeypatch.setattr(verify_mod, "residual", lambda p, q: p.clone())
    emitted, p = _run(SamplingParams(temperature=1.0))
    assert min(_pvalues(emitted, p)) < 1e-6


def test_greedy_is_exact_argmax_matching() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(K + 1, VOCAB, generator=gen)  # [K + 1, V]
    best = logits.argmax(dim=-1).tolist()
    greedy = SamplingParams(temperature=0.0)
    wrong = (best[1] + 1) % VOCAB
    reqs = [VerifyRequest(SamplingState(greedy, [1], [], frozenset(), None), best[:K]),
            VerifyRequest(SamplingState(greedy, [1], [], frozenset(), None), [best[0], wrong, best[2]])]
    emitted, _ = verify(Sampler(), torch.cat([logits, logits]), reqs)
    assert emitted == [best, best[:2]]


def test_seeded_rows_are_reproducible() -> None:
    a, _ = _run(SamplingParams(temperature=1.0, seed=5), seed=0)
    b, _ = _run(SamplingParams(temperature=1.0, seed=5), seed=0)
    assert a == b
