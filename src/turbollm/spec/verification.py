"""Verification of draft tokens: exact rejection sampling against the target (worker side).

For a request with drafts d_1..d_k the target scored k + 1 positions in one forward; row j
holds the logits for output position j (rows 0..k-1 check d_{j+1}, row k gives the bonus).
Each row is processed exactly as the sampler would at that position (min_tokens, penalties
over the outputs so far plus the preceding drafts, temperature, top-k, top-p, min-p) into p;
the draft's q was processed the same way by the proposer (one-hot for deterministic drafts).

Draft d_j is accepted with probability min(1, p(d_j) / q(d_j)); at the first rejection the
token is drawn from norm(max(0, p - q)) and the request stops there; if every draft is
accepted a bonus token is drawn from p of row k. The emitted tokens then follow p exactly.
Greedy requests have one-hot p, so this reduces to exact argmax matching (no randomness
decides anything). Seeded requests draw their uniforms and race noise from generators keyed
by (seed, output position), so they are reproducible and independent of the batch.

Host syncs: one, the final `.tolist()` carrying every row's decision, token and logprobs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from turbollm.core.plan import TokenLogprobs
from turbollm.sample.logits_processors import to_device
from turbollm.sample.sampler import (
    Sampler,
    SamplingState,
    _prompt_ids,
    gather_logprobs,
    sampling_probs,
    unpack_logprobs,
)

SALT_ACCEPT = 0x5EC0_0001
"""Salt of the uniforms that accept or reject drafts (see Sampler._exponentials)."""
SALT_DRAFT = 0x5EC0_0002
"""Salt of the draft model's own sampling noise."""


@dataclass
class VerifyRequest:
    """One speculating request's drafts (host side, but `draft_probs` on the device)."""

    sampling: SamplingState
    draft_ids: list[int]
    draft_probs: torch.Tensor | None = None
    """[k, vocab] float32 q of each draft, None for deterministic drafts (one-hot q)."""


def row_states(state: SamplingState, draft_ids: list[int], num_rows: int) -> list[SamplingState]:
    """The sampling state as seen at each of `num_rows` positions: the outputs so far followed
    by the drafts before that position (for penalties, min_tokens and seeded noise)."""
    base = state.output_token_ids
    return [dataclasses.replace(state, output_token_ids=base + draft_ids[:j]) for j in range(num_rows)]


def acceptance_probs(p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """min(1, p / q) for each draft token ([rows] float32); q > 0 wherever a draft was drawn."""
    return (p_draft / q_draft.clamp_min(1e-30)).clamp(max=1.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) [rows, vocab] (unnormalized: the exponential race does not need it)."""
    return (p - q).clamp_min(0.0)


def verify(
    sampler: Sampler, logits: torch.Tensor, requests: list[VerifyRequest]
) -> tuple[list[list[int]], list[list[TokenLogprobs] | None]]:
    """Emitted tokens (accepted drafts + one more) and their logprobs, per request.

    logits: [sum(k_i + 1), vocab] target logits, request i's k_i + 1 rows consecutive.
    """
    device = logits.device
    states: list[SamplingState] = []
    drafts: list[int] = []  # per row: the draft it checks, or -1 for a bonus row
    q_parts: list[torch.Tensor] = []
    for r in requests:
        k = len(r.draft_ids)
        if r.sampling.params.repetition_penalty != 1.0:
            _prompt_ids(r.sampling, device)  # cache the prompt upload once for every row view
        states += row_states(r.sampling, r.draft_ids, k + 1)
        drafts += [*r.draft_ids, -1]
        q_parts.append(_q_rows(r, logits.shape[1], device))
    p = sampling_probs(logits, states)  # [rows, vocab]
    q = torch.cat(q_parts)  # [rows, vocab], zero on bonus rows
    draft_t = to_device([max(d, 0) for d in drafts], torch.long, device)  # [rows]
    p_d = p.gather(1, draft_t[:, None])[:, 0]  # [rows]
    q_d = q.gather(1, draft_t[:, None])[:, 0]  # [rows]
    uniforms = _uniforms(sampler, p, states)  # [rows]
    accept = uniforms < acceptance_probs(p_d, q_d)  # [rows] (bonus rows: q_d = 0 -> 1 unused)
    # Rejected rows draw from the residual, bonus rows from p (q is zero there, so the
    # residual *is* p). If p <= q everywhere numerically, fall back to p.
    res = residual(p, q)  # [rows, vocab]
    empty = res.sum(dim=-1, keepdim=True) <= 0  # [rows, 1]
    res = torch.where(empty, p, res)
    fresh = res.div_(sampler._exponentials(res, states)).argmax(dim=-1)  # [rows]
    is_draft = to_device([d >= 0 for d in drafts], torch.bool, device)  # [rows]
    take_draft = accept & is_draft  # [rows]
    emitted = torch.where(take_draft, draft_t, fresh)  # [rows] the token each row would emit
    parts = [take_draft.to(torch.float64), emitted.to(torch.float64)]
    lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    max_k = max((states[i].params.logprobs or 0 for i in lp_rows), default=0)
    if lp_rows:
        parts.append(gather_logprobs(logits, emitted, lp_rows, max_k).flatten())
    host = torch.cat(parts).tolist()  # the one host sync
    return _unpack(requests, host, len(states), lp_rows, max_k)


def _q_rows(r: VerifyRequest, vocab: int, device: torch.device) -> torch.Tensor:
    """q for a request's k + 1 rows [k + 1, vocab]: the draft's, one-hot, and a zero bonus row."""
    k = len(r.draft_ids)
    q = torch.zeros(k + 1, vocab, dtype=torch.float32, device=device)
    if r.draft_probs is not None:
        q[:k] = r.draft_probs
    elif k:
        q[torch.arange(k, device=device), to_device(r.draft_ids, torch.long, device)] = 1.0
    return q


def _uniforms(sampler: Sampler, p: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One U(0, 1) per row, seeded rows from their own (seed, position) stream: exp(-E) of
    an Exp(1) draw is uniform, so the sampler's noise machinery serves with its own salt."""
    noise = sampler._exponentials(p[:, :1], states, salt=SALT_ACCEPT)  # [rows, 1]
    return torch.exp(-noise[:, 0])


def _unpack(
    requests: list[VerifyRequest], host: list[float], num_rows: int, lp_rows: list[int], max_k: int
) -> tuple[list[list[int]], list[list[TokenLogprobs] | None]]:
    take = host[:num_rows]
    tokens = [int(t) for t in host[num_rows : 2 * num_rows]]
    width = 2 + 2 * max_k
    lp_at = {row: j for j, row in enumerate(lp_rows)}
    out_tokens: list[list[int]] = []
    out_lps: list[list[TokenLogprobs] | None] = []
    row = 0
    for r in requests:
        k = len(r.draft_ids)
        n = next((j for j in range(k) if not take[row + j]), k) + 1  # accepted + the next one
        out_tokens.append(tokens[row : row + n])
        if r.sampling.params.logprobs is None:
            out_lps.append(None)
        else:
            lps = []
            for j in range(row, row + n):
                base = 2 * num_rows + lp_at[j] * width
                lps.append(unpack_logprobs(host[base : base + width], tokens[j],
                                           r.sampling.params.logprobs, max_k))
            out_lps.append(lps)
        row += k + 1
    return out_tokens, out_lps


__all__ = ["SALT_ACCEPT", "SALT_DRAFT", "VerifyRequest", "acceptance_probs", "residual", "row_states",
           "verify"]