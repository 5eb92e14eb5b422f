"""Sampler tests: every behaviour is checked against an independent reference on random logits.

Each test runs on the CPU and, where one is present, on a CUDA device (the `cuda` cases carry
the `gpu` marker). Random draws use fixed seeds, so the statistical checks are deterministic.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from turbollm.sample import Sampler, SamplingState
from turbollm.sample.logits_processors import apply_penalties
from turbollm.sampling_params import SamplingParams


_HAS_CUDA = torch.cuda.is_available()


def make_state(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: set[int] | None = None,
    seed: int | None = None,
    **params: object,
) -> SamplingState:
    return SamplingState(
        params=SamplingParams(**params),  # type: ignore[arg-type]
        prompt_token_ids=list(prompt or [1, 2, 3]),
        output_token_ids=list(output or []),
        eos_token_ids=frozenset(eos if eos is not None else {0}),
        seed=seed,
    )


def randn(rows: int, vocab: int, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(rows, vocab, device=device) * scale  # [rows, vocab]


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(device: torch.device, dtype: torch.dtype) -> None:
    logits = randn(16, 1000, device).to(dtype)  # [16, 1000]
    before = logits.clone()
    out = Sampler()(logits, [make_state(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16
    assert all(type(t) is int for t in out.token_ids)
    assert torch.equal(logits, before)  # the input is never modified


def test_empty_batch(device: torch.device) -> None:
    out = Sampler()(torch.empty(0, 10, device=device), [])
    assert out.token_ids == [] and out.logprobs == []


# ----------------------------------------------------------------------------- distribution


def _chi_square(counts: Counter[int], probs: list[float], n: int) -> float:
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs))


# chi-square(7 degrees of freedom) exceeds this with probability 1e-4.
_CHI2_7DF_P1E4 = 29.88


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_matches_softmax(device: torch.device, seeded: bool) -> None:
    vocab, n, temperature = 8, 4000, 0.5
    row = torch.randn(vocab, device=device) * 1.5  # [vocab]
    logits = row.expand(n, vocab).contiguous()  # [n, vocab]
    states = [
        make_state(temperature=temperature, seed=(1000 + i if seeded else None)) for i in range(n)
    ]
    counts = Counter(Sampler()(logits, states).token_ids)
    expected = torch.softmax(row.double() / temperature, dim=-1).tolist()
    assert _chi_square(counts, expected, n) < _CHI2_7DF_P1E4
    # The check has power: the untempered distribution is clearly rejected.
    wrong = torch.softmax(row.double(), dim=-1).tolist()
    assert _chi_square(counts, wrong, n) > 4 * _CHI2_7DF_P1E4


# ----------------------------------------------------------------------------- filters


def _allowed(logits: list[float], p: SamplingParams) -> set[int]:
    """Reference top-k -> top-p -> min-p in float64, written straight from the definitions."""
    scaled = [x / p.temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[: p.top_k] if p.top_k > 0 else order
    if p.top_p < 1.0:
        z = sum(math.exp(scaled[i]) for i in keep)
        mass, nucleus = 0.0, []
        for i in keep:
            if mass >= p.top_p:
                break
            nucleus.append(i)
            mass += math.exp(scaled[i]) / z
        keep = nucleus
    if p.min_p > 0.0:
        top = max(scaled[i] for i in keep)
        keep = [i for i in keep if math.exp(scaled[i] - top) >= p.min_p]
    return set(keep)


_FILTERS = [
    dict(top_k=5),
    dict(top_k=1),
    dict(top_p=0.6),
    dict(top_p=0.05),
    dict(min_p=0.2),
    dict(top_k=10, top_p=0.8, min_p=0.05),
    dict(temperature=0.5, top_p=0.9),
    dict(temperature=1.5, top_k=20, min_p=0.1),
    dict(),  # unfiltered, shares the batch with the others
]


def test_filters_never_emit_disallowed_tokens(device: torch.device) -> None:
    vocab, reps = 64, 300
    base = randn(len(_FILTERS), vocab, device, scale=2.0)  # [num_settings, vocab]
    settings = [_FILTERS[i % len(_FILTERS)] for i in range(reps * len(_FILTERS))]
    logits = base.repeat(reps, 1)  # [reps * num_settings, vocab]
    states = [make_state(**s) for s in settings]
    tokens = Sampler()(logits, states).token_ids

    emitted: dict[int, set[int]] = {}
    for row, token in enumerate(tokens):
        emitted.setdefault(row % len(_FILTERS), set()).add(token)
    for k, params in enumerate(_FILTERS):
        allowed = _allowed(base[k].tolist(), SamplingParams(**params))  # type: ignore[arg-type]
        assert emitted[k] <= allowed, (params, emitted[k] - allowed)
        if len(allowed) > 2:
            assert len(emitted[k]) > 1, params  # really sampled, not collapsed to argmax
    assert emitted[1] == {int(base[1].argmax())}  # top_k=1 is greedy
    assert len(emitted[len(_FILTERS) - 1]) > 10  # the unfiltered row roams the vocab


# ----------------------------------------------------------------------------- seeds


def test_seeded_rows_are_reproducible_and_batch_independent(device: torch.device) -> None:
    vocab = 1000
    target = randn(1, vocab, device, scale=0.1)  # [1, vocab]: nearly flat, so tokens spread
    sampler = Sampler()

    def seeded_token(position: int, seed: int, row: int, batch: int) -> int:
        others = randn(batch, vocab, device)  # [batch, vocab]
        others[row] = target[0]
        # Neighbours: greedy, unseeded and seeded-with-another-seed rows.
        states = [
            make_state(temperature=0.0) if i % 3 == 0 else make_state(seed=[None, 7][i % 3 - 1])
            for i in range(batch)
        ]
        states[row] = make_state(output=[5] * position, seed=seed, top_p=0.99)
        return sampler(others, states).token_ids[row]

    for position in range(5):
        alone = seeded_token(position, seed=1234, row=0, batch=1)
        assert seeded_token(position, seed=1234, row=0, batch=1) == alone
        assert seeded_token(position, seed=1234, row=3, batch=6) == alone
        assert seeded_token(position, seed=1234, row=5, batch=9) == alone

    # A fresh sampler (a request resumed after preemption, a restarted worker) agrees.
    fresh = Sampler()(target, [make_state(output=[5] * 3, seed=1234, top_p=0.99)]).token_ids
    assert fresh == [seeded_token(3, seed=1234, row=0, batch=1)]

    # Different seeds, and different positions of one seed, give different tokens.
    assert len({seeded_token(0, seed=s, row=0, batch=1) for s in range(10)}) > 5
    assert len({seeded_token(p, seed=1234, row=0, batch=1) for p in range(10)}) > 5
    # Negative and large seeds are accepted.
    seeded_token(0, seed=-(2**63 - 1), row=0, batch=2)
    seeded_token(0, seed=2**63 - 1, row=0, batch=2)


def test_unseeded_rows_vary(device: torch.device) -> None:
    logits = randn(8, 1000, device, scale=0.1)  # [8, 1000]
    states = [make_state() for _ in range(8)]
    sampler = Sampler()
    draws = {tuple(sampler(logits, states).token_ids) for _ in range(4)}
    assert len(draws) == 4


# ----------------------------------------------------------------------------- penalties


def _penalize_reference(logits: list[float], state: SamplingState) -> list[float]:
    out = list(logits)
    p = state.params
    for t in set(state.prompt_token_ids) | set(state.output_token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t, count in Counter(state.output_token_ids).items():
        out[t] -= p.frequency_penalty * count + p.presence_penalty
    return out


def _random_penalty_states(n: int, vocab: int, gen: torch.Generator) -> list[SamplingState]:
    states = []
    for i in range(n):
        ids = lambda k: torch.randint(0, vocab, (k,), generator=gen).tolist()  # noqa: E731
        params = dict(
            repetition_penalty=[1.0, 1.3, 0.8, 2.0][i % 4],
            presence_penalty=[0.0, 0.5, -1.0][i % 3],
            frequency_penalty=[0.0, 0.7, -0.3, 2.0][i % 4 if i % 5 else 0],
            temperature=0.0,
        )
        states.append(make_state(prompt=ids(i % 7 + 1), output=ids(i % 11), **params))
    return states


def test_penalties_match_reference(device: torch.device) -> None:
    vocab, n = 40, 24
    gen = torch.Generator().manual_seed(3)
    states = _random_penalty_states(n, vocab, gen)
    logits = randn(n, vocab, device, scale=3.0)  # [n, vocab]
    got = apply_penalties(
        logits,
        prompt_ids=[torch.tensor(s.prompt_token_ids, device=device) for s in states],
        output_ids=[s.output_token_ids for s in states],
        repetition=[s.params.repetition_penalty for s in states],
        presence=[s.params.presence_penalty for s in states],
        frequency=[s.params.frequency_penalty for s in states],
    )
    want = [_penalize_reference(row, s) for row, s in zip(logits.tolist(), states)]
    torch.testing.assert_close(got.cpu(), torch.tensor(want), rtol=1e-5, atol=1e-5)

    # Through the sampler (greedy rows, some without penalties, so the row-subset path runs):
    # the chosen token is the argmax of the reference-penalized logits.
    for i in range(0, n, 4):
        states[i] = make_state(temperature=0.0, output=[int(logits[i].argmax())] * 3)
    sampler = Sampler()
    tokens = sampler(logits, states).token_ids
    want = [_penalize_reference(row, s) for row, s in zip(logits.tolist(), states)]
    assert tokens == [max(range(vocab), key=row.__getitem__) for row in want]
    # The second step reads the prompts from the sampler's per-state device cache.
    assert all(s.prompt_ids_device is not None for s in states if s.params.repetition_penalty != 1)
    assert sampler(logits, states).token_ids == tokens
    assert tokens != logits.argmax(dim=-1).tolist()  # the penalties did change some choices


# ----------------------------------------------------------------------------- min_tokens


def test_min_tokens_masks_eos_and_stop_ids(device: torch.device) -> None:
    vocab, eos, stop = 20, 3, 7
    logits = randn(1, vocab, device)  # [1, vocab]
    logits[0, eos] = 30.0
    logits[0, stop] = 29.0

    def choose(produced: int, temperature: float, n: int = 1) -> list[int]:
        state = lambda: make_state(  # noqa: E731
            output=[9] * produced, eos={eos}, min_tokens=4, stop_token_ids=[stop],
            temperature=temperature,
        )
        return Sampler()(logits.expand(n, vocab), [state() for _ in range(n)]).token_ids

    masked = logits[0].clone()  # [vocab]
    masked[[eos, stop]] = float("-inf")
    for produced in range(4):
        assert choose(produced, 0.0) == [int(masked.argmax())]
        tokens = choose(produced, 1.0, n=200)
        assert eos not in tokens and stop not in tokens
    assert choose(4, 0.0) == [eos]
    assert choose(10, 0.0) == [eos]

    # Masking is per row: a row past min_tokens, or with another eos, is untouched.
    states = [
        make_state(output=[9], eos={eos}, min_tokens=4, temperature=0.0),
        make_state(output=[9] * 4, eos={eos}, min_tokens=4, temperature=0.0),
        make_state(output=[9], eos={11}, min_tokens=4, temperature=0.0),
    ]
    assert Sampler()(logits.expand(3, vocab), states).token_ids == [stop, eos, eos]


# ----------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(device: torch.device, dtype: torch.dtype) -> None:
    vocab = 100
    states = [
        make_state(temperature=0.0, logprobs=0),
        make_state(temperature=0.0, logprobs=5, repetition_penalty=1.5, output=[1, 2]),
        make_state(logprobs=20, temperature=1.3, top_p=0.9),
        make_state(logprobs=None),
        make_state(logprobs=1, seed=5, presence_penalty=2.0, output=[4, 4]),
        make_state(logprobs=3, temperature=2.0),
    ]
    logits = randn(len(states), vocab, device, scale=2.0).to(dtype)  # [num_reqs, vocab]
    out = Sampler()(logits, states)
    ref = torch.log_softmax(logits.float(), dim=-1).cpu()  # [num_reqs, vocab]
    for i, (state, token, lp) in enumerate(zip(states, out.token_ids, out.logprobs)):
        if state.params.logprobs is None:
            assert lp is None
            continue
        assert lp is not None and lp.token_id == token
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=1e-5)
        assert lp.rank == 1 + int((ref[i] > ref[i, token]).sum())
        k = state.params.logprobs
        assert len(lp.top) == k
        # Compare values, not ids: bfloat16 logits tie often, and ties may come in any order.
        values = [v for _, v in lp.top]
        assert values == pytest.approx(ref[i].topk(k).values.tolist(), abs=1e-5)
        assert len({t for t, _ in lp.top}) == k
        for t, v in lp.top:
            assert v == pytest.approx(ref[i, t].item(), abs=1e-5)
    # Greedy rows rank first; the penalized greedy row still reports its raw logprob.
    assert out.logprobs[0] is not None and out.logprobs[0].rank == 1


# ----------------------------------------------------------------------------- mixed batch


def test_mixed_batch_bfloat16(device: torch.device) -> None:
    vocab = 300
    states = [
        make_state(temperature=0.0),
        make_state(temperature=0.8, top_k=50),
        make_state(seed=42, top_p=0.9, logprobs=2),
        make_state(temperature=0.0, logprobs=4, frequency_penalty=1.0, output=[1, 1, 2]),
        make_state(seed=7, min_p=0.1, min_tokens=2, eos={0, 1}),
        make_state(repetition_penalty=1.2, logprobs=0),
    ]
    logits = randn(len(states), vocab, device, scale=2.0).to(torch.bfloat16)  # [num_reqs, vocab]
    out = Sampler()(logits, states)
    assert len(out.token_ids) == len(out.logprobs) == len(states)
    assert all(type(t) is int and 0 <= t < vocab for t in out.token_ids)
    assert out.token_ids[0] == int(logits[0].float().argmax())
    assert [lp is not None for lp in out.logprobs] == [False, False, True, True, False, True]
    assert out.token_ids[4] not in (0, 1)

    # The same call on the exact float32 values gives the same greedy and seeded tokens.
    again = Sampler()(logits.float(), states)
    for i in (0, 2, 3, 4):
        assert again.token_ids[i] == out.token_ids[i]


# ----------------------------------------------------------------------------- host syncs


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """The host-sync warnings CUDA's sync debug mode raises while fn runs (warm fn up first:
    lazy initialisation may sync)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_one_host_sync_per_call() -> None:
    device = torch.device("cuda")
    states = [
        make_state(temperature=0.0, logprobs=3, min_tokens=3, repetition_penalty=1.1),
        make_state(top_k=20, top_p=0.8, min_p=0.05, seed=3, presence_penalty=0.5, output=[1]),
        make_state(temperature=0.7),
    ]
    logits = randn(len(states), 500, device).to(torch.bfloat16)  # [num_reqs, vocab]
    sampler = Sampler()
    for batch in (states, [make_state(temperature=0.0)] * 3):
        sampler(logits, batch)  # warm up (lazy CUDA init may sync)
        syncs = host_syncs(lambda: sampler(logits, batch))
        assert len(syncs) == 1, syncs
