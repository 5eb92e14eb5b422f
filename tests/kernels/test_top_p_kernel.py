"""top_p_filter (kernels/top_p.py) against the full-sort reference (sample.logits_processors.apply_top_p).

CPU: Triton's interpreter, small vocabularies; GPU: real vocabularies. The kernel sums the mass
above a value in another order than the reference's cumsum, so only a token whose preceding
mass lies within rounding of p may land on the other side: every other token must match.
"""

from __future__ import annotations

import pytest
import torch

from turbollm.kernels.top_p import top_p_filter
from turbollm.sample.logits_processors import apply_top_p, near_top_p

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
_NEG_INF = float("-inf")
_TIE_MARGIN = 1e-5  # |mass before - p| below this: either side is a correct rounding


def _ambiguous(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """[rows, vocab] bool: tokens whose mass before them is within _TIE_MARGIN of their row's p."""
    return near_top_p(logits, top_p, _TIE_MARGIN)


def _check(logits: torch.Tensor, top_p: list[float]) -> int:
    """Asserts the kernel's kept set equals the reference's outside ambiguous tokens, and kept
    tokens keep their logits; returns how many tokens were ambiguous."""
    ref = apply_top_p(logits, top_p)
    got = top_p_filter(logits, torch.tensor(top_p, dtype=torch.float32, device=logits.device))
    amb = _ambiguous(logits, top_p)
    differ = (ref == _NEG_INF) != (got == _NEG_INF)
    assert not (differ & ~amb).any(), f"{int((differ & ~amb).sum())} tokens differ outside rounding of p"
    kept = got != _NEG_INF
    torch.testing.assert_close(got[kept], logits[kept], rtol=0, atol=0)
    return int(amb.sum())


def _rows(kind: str, rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, vocab, generator=g)
    if kind == "flat":
        return x
    if kind == "peaked":
        return x * 6
    if kind == "ties":  # few distinct values, -0.0 among them
        return (x * 2).round() * torch.where(torch.rand(rows, vocab, generator=g) < 0.5, 1.0, -1.0)
    if kind == "topk":  # after top-k: all but 20 tokens -inf
        keep = x.topk(20, dim=-1).indices
        return torch.full_like(x, _NEG_INF).scatter_(1, keep, x.gather(1, keep) * 3)
    if kind == "one_hot":  # one token carries almost all the mass
        x[:, vocab // 3] += 40
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("vocab", [7, 50, 1000, 2500])
@pytest.mark.parametrize("kind", ["flat", "peaked", "ties", "topk", "one_hot"])
def test_top_p_filter_matches_full_sort(vocab: int, kind: str) -> None:
    if kind == "topk" and vocab < 20:
        pytest.skip("top-k 20 needs 20 tokens")
    g = torch.Generator().manual_seed(vocab * 7 + len(kind))
    top_ps = [0.01, 0.3, 0.5, 0.9, 0.95, 0.999]
    logits = _rows(kind, len(top_ps), vocab, g).to(DEVICE)
    ambiguous = _check(logits, top_ps)
    assert ambiguous <= len(top_ps)  # at most about one boundary token a row


def test_top_p_filter_keeps_tied_tokens_in_index_order() -> None:
    """Tokens tied at the cut: the first ones by index are kept, as in the stable sort."""
    logits = torch.tensor([[1.0, 3.0, 1.0, 1.0, 3.0, 1.0, -2.0, 1.0]], device=DEVICE)
    probs = logits.softmax(-1)[0]
    p = float(2 * probs[1] + 2.5 * probs[0])  # the two 3.0s, then 2.5 of the tied 1.0s
    got = top_p_filter(logits, torch.tensor([p], device=DEVICE))
    assert (got[0] != _NEG_INF).tolist() == [True, True, True, True, True, False, False, False]
    assert _check(logits, [p]) == 0


def test_top_p_filter_rejects_bad_inputs() -> None:
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        top_p_filter(x.double(), torch.tensor([0.5, 0.5], device=DEVICE))
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(x, torch.tensor([0.5], device=DEVICE))
    assert top_p_filter(x[:0], torch.empty(0, device=DEVICE)).shape == (0, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_gpu_top_p_filter_real_vocab(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    top_ps = [0.5, 0.9, 0.95, 0.99] * 4
    for kind in ("flat", "peaked", "ties", "topk"):
        logits = _rows(kind, len(top_ps), vocab, g).cuda()
        _check(logits, top_ps)


def test_sampler_takes_the_search_only_for_many_rows() -> None:
    from turbollm.sample.sampler import nucleus_by_search

    assert not nucleus_by_search(1, 32000) and nucleus_by_search(64, 32000)
    assert not nucleus_by_search(64, 128256) and nucleus_by_search(256, 128256)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_sampler_nucleus_uses_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's top-p on 64 CUDA rows goes through the kernel and keeps the sort's tokens."""
    from turbollm.sample import sampler

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 32000, generator=g) * 4).cuda()
    top_ps = [0.5, 0.9, 0.95, 0.99] * 16
    calls = []
    real = top_p_filter

    def spy(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return real(x, p)

    monkeypatch.setattr(sampler.top_p_kernel, "top_p_filter", spy)
    got = sampler._nucleus(logits, top_ps)
    assert calls == [(64, 32000)]
    amb = _ambiguous(logits, top_ps)
    ref = apply_top_p(logits, top_ps)
    assert not (((ref == _NEG_INF) != (got == _NEG_INF)) & ~amb).any()


def _compiled_variants(fn: object) -> int:
    """Compiled specializations of a Triton kernel over all devices (Triton 3.6's JITFunction
    keeps (kernel_cache, ...) per device in `device_caches`)."""
    return sum(len(cache[0]) for cache in fn.device_caches.values())  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [32000, 49159])
def test_gpu_sampler_warm_up_compiles_what_sampling_runs(vocab: int) -> None:
    """After Sampler.warm_up, the sampler's top-p on many rows meets no new compile."""
    from turbollm.kernels import top_p as top_p_module
    from turbollm.sample import sampler

    sampler.Sampler().warm_up(vocab, torch.device("cuda"))
    warmed = _compiled_variants(top_p_module._top_p_kernel)
    assert warmed >= 1
    logits = (torch.randn(64, vocab, generator=torch.Generator().manual_seed(vocab)) * 4).cuda()
    sampler._nucleus(logits, [0.9] * 64)
    torch.cuda.synchronize()
    assert _compiled_variants(top_p_module._top_p_kernel) == warmed
