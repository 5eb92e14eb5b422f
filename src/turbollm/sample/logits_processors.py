"""Logit processors: pure functions of logits `[rows, vocab]` and host-side settings.

Contracts shared by every function here:
- Device-agnostic (CPU and CUDA) and free of host syncs: host values reach the device through
  `to_device`, a non-blocking copy, and nothing reads a device value back.
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
    rows, a search without a sort and without a host sync.
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


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p[i] times the row's top probability.

    Done in log space without a softmax: p_i < min_p * p_max  <=>  l_i - l_max < log(min_p).
    A row with min_p 0 has threshold -inf and keeps everything.
    """
    log_min_p = [math.log(m) if m > 0 else _NEG_INF for m in min_p]
    threshold = to_device(log_min_p, torch.float32, logits.device)[:, None]  # [num_rows, 1]
    top = logits.amax(dim=-1, keepdim=True)  # [num_rows, 1]
    return logits.masked_fill(logits - top < threshold, _NEG_INF)
