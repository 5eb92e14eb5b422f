"""Logit processors: pure functions of logits `[rows, vocab]` and host-side settings.

Contracts shared by every function here:
- Device-agnostic (CPU and CUDA) and free of host syncs: host values reach the device through
  `to_device`, a non-blocking copy, and nothing reads a device value back. The one exception,
  `apply_top_p_candidates`, says so; the sampler calls it on the CPU only.
- Out-of-place: the input is never modified. The sampler's input logits belong to the model
  runner (and may be its CUDA-graph output buffer), so the sampler must not write to them.
- Masked tokens get -inf, so a later softmax gives them probability exactly 0.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from itertools import chain

import torch

_NEG_INF = float("-inf")


def to_device(
    values: Sequence[int | float | bool], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A host list as a 1-D tensor on `device`, without a host sync.

    `torch.tensor(values, device="cuda")` copies from pageable memory and then waits for the
    stream; staging in pinned memory and copying with `non_blocking=True` does not wait.
    """
    return _upload(torch.tensor(values, dtype=dtype), device)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to CUDA through pinned memory, non-blocking (no host sync)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def mask_tokens(logits: torch.Tensor, rows: list[int], token_ids: list[int]) -> torch.Tensor:
    """A copy of `logits` [num_rows, vocab] with -inf at each (rows[j], token_ids[j])."""
    device = logits.device
    index = (to_device(rows, torch.long, device), to_device(token_ids, torch.long, device))
    return logits.index_put(index, torch.full((), _NEG_INF, dtype=logits.dtype, device=device))


def ids_to_device(token_ids: list[int], device: torch.device) -> torch.Tensor:
    """Token ids as a 1-D int64 tensor on `device`, without a host sync.

    Goes through `array`, several times faster than `torch.tensor(list)` for long lists.
    """
    if not token_ids:
        return torch.empty(0, dtype=torch.long, device=device)
    return _upload(torch.frombuffer(array("q", token_ids), dtype=torch.long), device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[torch.Tensor],
    output_ids: list[list[int]],
    repetition: list[float],
    presence: list[float],
    frequency: list[float],
) -> torch.Tensor:
    """Repetition, then presence and frequency penalties; `logits` is float32 [num_rows, vocab].

    Repetition (Hugging Face semantics) applies to every token in the row's prompt or output:
    a positive logit is divided by the penalty, a negative one multiplied by it. Presence and
    frequency (OpenAI semantics) apply to output tokens only:
    `logit -= presence * (count > 0) + frequency * count`.

    prompt_ids: per row, a 1-D int64 tensor on the logits' device (the sampler caches these,
    since prompts do not change; an empty one for a row whose repetition penalty is 1).
    output_ids: per row, the host list of tokens generated so far.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    counts = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)  # [num_rows, vocab]
    out_lengths = [len(ids) for ids in output_ids]
    if sum(out_lengths):
        flat_out = ids_to_device(list(chain.from_iterable(output_ids)), device)  # [num_out]
        out_index = _flat_index(flat_out, out_lengths, vocab)  # [num_out]
        # Float sums of ones are exact, so the atomic adds' order cannot change the result.
        ones = torch.ones(out_index.shape[0], dtype=torch.float32, device=device)  # [num_out]
        counts.view(-1).index_add_(0, out_index, ones)
    in_output = counts > 0  # [num_rows, vocab]
    seen = in_output.clone()  # [num_rows, vocab]
    prompt_lengths = [ids.shape[0] for ids in prompt_ids]
    if sum(prompt_lengths):
        prompt_index = _flat_index(torch.cat(prompt_ids), prompt_lengths, vocab)  # [num_prompt]
        seen.view(-1).index_fill_(0, prompt_index, True)

    rep = to_device(repetition, torch.float32, device)[:, None]  # [num_rows, 1]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)  # [num_rows, vocab]
    logits = torch.where(seen, penalized, logits)  # [num_rows, vocab]

    pres = to_device(presence, torch.float32, device)[:, None]  # [num_rows, 1]
    freq = to_device(frequency, torch.float32, device)[:, None]  # [num_rows, 1]
    return logits - freq * counts - pres * in_output.to(torch.float32)  # [num_rows, vocab]


def _flat_index(flat_ids: torch.Tensor, lengths: list[int], vocab: int) -> torch.Tensor:
    """`row * vocab + token` for row-concatenated ids [total] with per-row `lengths`: [total].

    The row index is expanded on the device; `output_size` spares `repeat_interleave` the
    host sync it would otherwise need to size its output.
    """
    device = flat_ids.device
    rows = torch.arange(len(lengths), dtype=torch.long, device=device)  # [num_rows]
    repeats = to_device(lengths, torch.long, device)  # [num_rows]
    row_of = rows.repeat_interleave(repeats, output_size=flat_ids.shape[0])  # [total]
    return row_of * vocab + flat_ids


def apply_temperature(logits: torch.Tensor, temperature: list[float]) -> torch.Tensor:
    """`logits` [num_rows, vocab] divided row-wise by temperature (every value > 0)."""
    temp = to_device(temperature, torch.float32, logits.device)[:, None]  # [num_rows, 1]
    return logits / temp


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits; 0 keeps the whole row.

    Every k must be in [0, vocab]. Tokens tied with the k-th value are kept too. Uses `topk`
    with the batch's largest k rather than a full-vocab sort.
    """
    device = logits.device
    max_k = max(top_k)
    top_values = logits.topk(max_k, dim=-1).values  # [num_rows, max_k], best first
    kth = to_device([max(k, 1) - 1 for k in top_k], torch.long, device)[:, None]  # [num_rows, 1]
    threshold = top_values.gather(1, kth)  # [num_rows, 1]
    disabled = to_device([k == 0 for k in top_k], torch.bool, device)[:, None]  # [num_rows, 1]
    threshold = threshold.masked_fill(disabled, _NEG_INF)  # [num_rows, 1]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest best-first set of tokens whose mass reaches top_p[i].

    A token is kept when the probability of the tokens strictly better than it is below
    top_p, so the top token (preceded by mass 0) always survives. Sorts the full row: call it
    only on rows with top_p < 1. On a GPU the sampler runs kernels/top_p.py instead for many
    rows, a search without a sort and without a host sync; on the CPU it runs
    `apply_top_p_candidates`, which sorts only the rows that topk cannot settle.
    """
    # Stable: tied tokens keep index order, so the cut through a tie is the same in any batch.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [num_rows, vocab]
    probs = sorted_logits.softmax(dim=-1)  # [num_rows, vocab]
    mass_before = probs.cumsum(dim=-1) - probs  # [num_rows, vocab]; exactly 0 at the top token
    p = to_device(top_p, torch.float32, logits.device)[:, None]  # [num_rows, 1]
    drop_sorted = mass_before >= p  # [num_rows, vocab], in sorted order
    # `order` is a permutation per row, so the scatter writes every slot of the empty tensor.
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)  # [num_rows, vocab]
    return logits.masked_fill(drop, _NEG_INF)


TOP_P_CANDIDATES = 1024
"""Tokens per row `apply_top_p_candidates` takes with `topk`. A row whose nucleus needs more (a
flat distribution) goes to the full sort. On an H100, 256 and 4096 decided no more rows for less."""


def apply_top_p_candidates(
    logits: torch.Tensor, top_p: list[float], num_candidates: int = TOP_P_CANDIDATES, exact: bool = True
) -> torch.Tensor:
    """`apply_top_p`'s result, cutting among each row's `num_candidates` best tokens (topk).

    A row the candidates decide (`_top_p_candidates`) equals `apply_top_p`'s in any batch. The
    others are redone by `apply_top_p` on the sub-batch of those rows. On CPU that equals the
    full batch's result too. On CUDA the full sort's cumsum picks its kernel by row count
    (CUB's device scan for one row), so its float32 rounding, and with it a cut that falls
    within rounding of top_p (e.g. 0.999999, deep in the tail), can depend on the number of
    rows: as it already does when the sampler's top-p sub-batch changes size.

    `exact=False` decides every row whose candidates hold its nucleus, also where a token's
    mass before it lies within float32 rounding of top_p: such a token may then fall on the
    other side than in the full sort, whose own rounding is no truer (the candidate masses are
    float64). The sampler runs it so on the CPU (sampler.CPU_TOP_P_CANDIDATES).

    float32 only: other dtypes, and vocabularies of at most `num_candidates` tokens, go
    straight to the full sort.

    Host sync: one, the `.tolist()` of the per-row decided flags, to learn which rows need the
    full sort; the exception to this module's no-sync rule. So the sampler takes it on the CPU
    only, where it costs nothing: there `topk` of 1,024 out of 49,152 takes ~0.12 ms against
    ~4 ms for the stable sort (one thread; docs/performance.md). On an H100
    (bench/scripts/gpu_top_p.py, bench/results/top-p-*.json) it beats the sort only at about
    256 rows of 128k with peaked rows (2.3x); it loses on smaller batches (launch-bound; CUDA's
    `topk` itself sorts when there are at most 10 rows of 100k+) and on flat rows (all fall
    back). And its sync stalls the overlapped engine: Llama-3-8B decode (dummy weights) ran
    4-14% slower with it at batch 64 and 256, even with 94% of rows decided.
    """
    num_rows, vocab = logits.shape
    if num_rows == 0 or vocab <= num_candidates or logits.dtype != torch.float32:
        return apply_top_p(logits, top_p)
    p = to_device(top_p, torch.float32, logits.device)[:, None]  # [num_rows, 1]
    out, decided = _top_p_candidates(logits, p, num_candidates, exact)
    redo = [i for i, ok in enumerate(decided.tolist()) if not ok]  # the host sync
    if not redo:
        return out
    if len(redo) == num_rows:
        return apply_top_p(logits, top_p)
    index = to_device(redo, torch.long, logits.device)  # [num_redo]
    sub = apply_top_p(logits.index_select(0, index), [top_p[i] for i in redo])
    return out.index_copy_(0, index, sub)


def top_p_mass_tolerance(vocab: int, device: torch.device) -> float:
    """How near top_p a cut may fall before the candidate path defers to the full sort.

    The full sort's float32 softmax normalizer carries rounding error that depends on the
    sorted order, so the candidate path cannot reproduce it; within this margin only the full
    sort can say on which side of top_p a token falls. The softmax sums a row in float32
    accumulators that each add `terms` values in sequence: one per vector lane on CPU (at
    least 4 lanes), one per thread on CUDA (min(vocab, 1024) threads). A sequential float32 sum
    of n terms is off by at most n units of 2**-24 of the total, and so is every mass it
    divides; 64 more units cover the reduction tree, the exps, the division and the cumsum
    (float32 on CUDA, at most 1024 / 32 + 10 roundings per candidate). CUDA takes twice that:
    its kernels' shapes were read from PyTorch's source, not derived. Worst measured, on
    tie-heavy rows: 0.21 of the tolerance on CPU (AVX-512), 0.11 on an H100
    (tests/sample/test_top_p.py; bench/scripts/gpu_top_p.py --probe).
    """
    if device.type == "cuda":
        return 2 * (vocab / 1024 + 64) * 2.0**-24
    return (vocab / 4 + 64) * 2.0**-24


def _top_p_candidates(
    logits: torch.Tensor, p: torch.Tensor, num_candidates: int, exact: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p cut among each row's `num_candidates` best tokens; no host sync.

    logits: float32 [num_rows, vocab]; p: float32 [num_rows, 1]. Returns the filtered logits
    [num_rows, vocab] and `decided` [num_rows] bool; where False, the row's result may differ
    from `apply_top_p`'s and the caller must use that instead.

    Why a decided row matches the full sort. Let v_min be the smallest candidate value and g
    the number of candidates above it. `topk` returns every token above v_min, so candidates
    0..g-1, put in the full sort's order (value descending, then index ascending), are exactly
    its first g positions, with the same mass before each. Its position g is the first token
    tied at v_min, preceded by the mass of those g. Which tied tokens `topk` picked is
    unspecified, so a row is decided only when:
    - every position before g is further than the tolerance from top_p, so float32 rounding in
      the full sort cannot move it across the cut; and
    - position g is dropped by more than the tolerance, so the tie group and everything below
      it are dropped too (the full sort's mass before is non-decreasing up to rounding far
      below the tolerance); or v_min is -inf (rows after top-k): then every finite token is a
      candidate, and the others are -inf whether kept or dropped; and
    - the row's normalizer is finite (not for NaN or +inf logits, nor an all -inf row).
    With `exact=False` the tolerance is 0: a row is decided when its candidates hold the cut.
    """
    vocab = logits.shape[1]
    tol = top_p_mass_tolerance(vocab, logits.device) if exact else 0.0
    # topk's order among tied values is unspecified: sort the candidates by token id, then
    # stably by value, which is the full sort's order.
    values, ids = logits.topk(num_candidates, dim=-1, sorted=False)  # [num_rows, C]
    ids, by_id = ids.sort(dim=-1)  # [num_rows, C]
    values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)  # [num_rows, C], best first

    # The whole row's softmax normalizer, without a sort: sum of exp(x - max).
    top = values[:, :1]  # [num_rows, 1]; the row max
    total = (logits - top).exp().sum(dim=-1, keepdim=True)  # [num_rows, 1]
    # float64 from here: the candidate path's own rounding stays far below the tolerance.
    probs = (values - top).exp().double() / total.double()  # [num_rows, C]
    mass_before = probs.cumsum(dim=-1) - probs  # [num_rows, C]
    p64 = p.double()  # [num_rows, 1]

    v_min = values[:, -1:]  # [num_rows, 1]
    above = values > v_min  # [num_rows, C]; True at positions 0..g-1
    g = above.sum(dim=-1, keepdim=True)  # [num_rows, 1]
    clear = (mass_before - p64).abs() > tol  # [num_rows, C]; False where NaN
    tie_dropped = mass_before.gather(1, g) > p64 + tol  # [num_rows, 1]
    decided = (
        (clear | ~above).all(dim=-1)
        & (tie_dropped | (v_min == _NEG_INF)).squeeze(1)
        & torch.isfinite(total).squeeze(1)
    )  # [num_rows]

    keep = above & (mass_before < p64)  # [num_rows, C]
    kept_values = values.masked_fill(~keep, _NEG_INF)  # [num_rows, C]
    out = torch.full_like(logits, _NEG_INF).scatter_(1, ids, kept_values)  # [num_rows, vocab]
    return out, decided


def near_top_p(logits: torch.Tensor, top_p: list[float], margin: float) -> torch.Tensor:
    """[rows, vocab] bool: tokens whose mass before them (float64, in the full sort's order)
    lies within `margin` of their row's top_p. There, top-p filters that round differently
    (`apply_top_p`, kernels/top_p.py, `apply_top_p_candidates(exact=False)`) may disagree; the
    tests compare them everywhere else."""
    sorted_logits, order = logits.double().sort(dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(dim=-1)  # [rows, vocab]
    before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, dtype=torch.float64, device=logits.device)[:, None]  # [rows, 1]
    near_sorted = (before - p).abs() < margin
    return torch.empty_like(near_sorted).scatter_(1, order, near_sorted)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p[i] times the row's top probability.

    Done in log space without a softmax: p_i < min_p * p_max  <=>  l_i - l_max < log(min_p).
    A row with min_p 0 has threshold -inf and keeps everything.
    """
    log_min_p = [math.log(m) if m > 0 else _NEG_INF for m in min_p]
    threshold = to_device(log_min_p, torch.float32, logits.device)[:, None]  # [num_rows, 1]
    top = logits.amax(dim=-1, keepdim=True)  # [num_rows, 1]
    return logits.masked_fill(logits - top < threshold, _NEG_INF)
