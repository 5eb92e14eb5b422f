"""The sampler: one step's logits `[num_reqs, vocab]` to token ids and logprobs (vLLM semantics).

Ownership: the worker owns each request's `SamplingState` (host side, kept between steps; it
appends every sampled token to `output_token_ids`). The `Sampler` is stateless apart from a
cached torch.Generator per device; it reads the logits on their device (GPU, or CPU in tests),
never writes to them, and returns a `SamplerOutput` of plain Python values.

Order of work (each stage skipped when no row needs it):
  raw logprobs (log_softmax of the input) -> min_tokens mask -> penalties
  -> greedy rows: argmax
  -> other rows: temperature -> top-k -> top-p -> min-p -> exponential race.

Host syncs: exactly one per call, the `.tolist()` at the end that brings back token ids and
logprobs together; `Sampler.sample` stops just before it and leaves the packed result on the
device (the worker copies it back asynchronously when steps overlap). Everything before it is queued on the device; host lists reach the
device through non-blocking pinned copies (see `logits_processors.to_device`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from turbollm.core.plan import TokenLogprobs
from turbollm.kernels import top_p as top_p_kernel
from turbollm.sample.logits_processors import (
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_top_p_candidates,
    ids_to_device,
    mask_tokens,
    to_device,
)
from turbollm.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingState:
    """Per-request sampling state the worker keeps between steps (host side)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Every token sampled so far; the worker appends each new one."""
    eos_token_ids: frozenset[int]
    """Masked (with params.stop_token_ids) until params.min_tokens outputs exist."""
    seed: int | None
    """params.seed, or a seed the engine assigned (n > 1 children); None: the global RNG."""
    num_pending: int = 0
    """Tokens already sampled on the device but not yet appended to output_token_ids (the
    worker's overlapped steps); they count as outputs for min_tokens and seeds."""
    prompt_ids_device: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """Sampler-owned cache: prompt_token_ids on the logits' device [num_prompt_tokens], made on
    first use by a repetition penalty so long prompts are uploaded once, not every step."""


@dataclass
class SamplerOutput:
    """One step's result, on the host."""

    token_ids: list[int]
    """[num_reqs]: the token chosen for each row."""
    logprobs: list[TokenLogprobs | None]
    """[num_reqs]: None where params.logprobs is None."""
    extra: list[float] = field(default_factory=list)
    """The caller's `extra` tensor, brought back in the same host sync ([] when not given)."""


@dataclass
class SamplerDraft:
    """A sampling call up to (not including) its host sync. Lives on the logits' device."""

    token_ids: torch.Tensor  # [num_reqs] int64 chosen tokens (the next step may read them here)
    packed: torch.Tensor  # [num_reqs + lp rows * (2 + 2 * max_k) + num_extra] float64
    lp_rows: list[int]
    """Rows that asked for logprobs."""
    lp_ks: list[int]
    """Top alternatives each of those rows asked for."""
    max_k: int
    num_extra: int

    def unpack(self, host: list[float]) -> SamplerOutput:
        """The SamplerOutput from the host copy of `packed`."""
        num_reqs = self.token_ids.shape[0]
        out_ids = [int(t) for t in host[:num_reqs]]
        logprobs: list[TokenLogprobs | None] = [None] * num_reqs
        width = 2 + 2 * self.max_k
        for j, (i, k) in enumerate(zip(self.lp_rows, self.lp_ks, strict=True)):
            row = host[num_reqs + j * width : num_reqs + (j + 1) * width]
            logprobs[i] = unpack_logprobs(row, out_ids[i], k, self.max_k)
        extra = host[len(host) - self.num_extra :] if self.num_extra else []
        return SamplerOutput(token_ids=out_ids, logprobs=logprobs, extra=extra)


class Sampler:
    """Turns logits into tokens. Call it with the logits of the positions that sample."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState], extra: torch.Tensor | None = None
    ) -> SamplerOutput:
        """Sample one token per row; logprobs come from the raw (unprocessed) distribution.

        logits: [num_reqs, vocab], any float dtype (processing runs in float32). Row i belongs
        to states[i]. The input tensor is not modified. `extra` [num_extra] float64, on the
        logits' device, rides along in this call's one host sync and comes back as
        SamplerOutput.extra (the worker's prompt logprobs use it).
        """
        draft = self.sample(logits, states, extra)
        return draft.unpack(draft.packed.tolist())  # the one host sync of this call

    def sample(
        self, logits: torch.Tensor, states: list[SamplingState], extra: torch.Tensor | None = None
    ) -> SamplerDraft:
        """Like __call__, but stops before the host sync: everything the host needs is packed
        into one float64 device tensor (the caller copies it back, e.g. asynchronously)."""
        dev = logits.device
        if not states:
            empty = torch.empty(0, dtype=torch.float64, device=dev)
            return SamplerDraft(torch.empty(0, dtype=torch.long, device=dev), empty, [], [], 0, 0)
        processed = _process(logits, states)  # [num_reqs, vocab]
        token_ids = self._choose(processed, states)  # [num_reqs] int64
        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        max_k = max((states[i].params.logprobs or 0 for i in lp_rows), default=0)
        # float64 holds token ids, ranks and float32 logprobs exactly, so one tensor carries
        # everything across.
        parts = [token_ids.to(torch.float64)]
        if lp_rows:
            # [num_lp_rows, 2 + 2 * max_k]
            parts.append(gather_logprobs(logits, token_ids, lp_rows, max_k).flatten())
        if extra is not None:
            parts.append(extra)
        packed = torch.cat(parts) if len(parts) > 1 else parts[0]  # [num_reqs + ...]
        ks = [states[i].params.logprobs or 0 for i in lp_rows]
        num_extra = extra.numel() if extra is not None else 0
        return SamplerDraft(token_ids, packed, lp_rows, ks, max_k, num_extra)

    def warm_up(self, vocab: int, device: torch.device) -> None:
        """Compile, before serving, the Triton kernel sampling may launch on `device` (the top-p
        search that `nucleus_by_search` picks for many rows), for logits rows of `vocab`, so no
        step waits on its JIT compile. Nothing to do off the GPU."""
        if device.type == "cuda" and top_p_kernel.HAS_TRITON:
            logits = torch.zeros(1, vocab, device=device)  # [1, vocab] float32, like _nucleus's rows
            top_p_kernel.top_p_filter(logits, torch.full((1,), 0.9, device=device))

    def _choose(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Greedy rows take the argmax, the others are sampled: [num_reqs] int64 on the device."""
        sample_rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if not sample_rows:
            # Fast path: argmax of bf16/fp16 values equals argmax of their exact float32 copies.
            return logits.argmax(dim=-1)
        logits = logits.float()
        if len(sample_rows) == len(states):
            return self._sample(logits, states)
        greedy = logits.argmax(dim=-1)  # [num_reqs]
        index = to_device(sample_rows, torch.long, logits.device)  # [num_sampled]
        sub = logits.index_select(0, index)  # [num_sampled, vocab]
        sampled = self._sample(sub, [states[i] for i in sample_rows])  # [num_sampled]
        return greedy.index_copy(0, index, sampled)

    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race: [n, vocab] -> [n]."""
        probs = filter_logits(logits, states).softmax(dim=-1)  # [n, vocab]
        # Exponential race: argmax(p / E), E ~ Exp(1) i.i.d., picks token i with probability p_i.
        return probs.div_(self._exponentials(probs, states)).argmax(dim=-1)  # [n]

    def _exponentials(
        self, probs: torch.Tensor, states: list[SamplingState], salt: int = 0
    ) -> torch.Tensor:
        """Exp(1) noise shaped like `probs` [n, vocab].

        Unseeded rows share one batched draw from the default generator. A seeded row draws
        its own vector from a generator seeded by (seed, position), so its token depends only
        on its seed, its position and its probabilities, never on the batch around it. A
        non-zero `salt` gives an independent stream (speculative decoding's draft sampling
        and acceptance tests use their own).
        """
        seeded = [j for j, s in enumerate(states) if s.seed is not None]
        noise = torch.empty_like(probs)  # [n, vocab]
        if len(seeded) < len(states):
            _exponential_(noise)
        if seeded:
            gen = self._generator(probs.device)
            vocab = probs.shape[1]
            for j in seeded:
                state = states[j]
                assert state.seed is not None
                gen.manual_seed(_step_seed(state.seed ^ salt, len(state.output_token_ids) + state.num_pending))
                # A fresh contiguous buffer, so the draw cannot depend on the row's offset.
                row = torch.empty(vocab, dtype=probs.dtype, device=probs.device)  # [vocab]
                noise[j] = _exponential_(row, gen)
        return noise

    def _generator(self, device: torch.device) -> torch.Generator:
        """One reusable generator per device, re-seeded for each seeded row."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen


def filter_logits(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on float32 logits [n, vocab] (sampled rows)."""
    vocab = logits.shape[1]
    params = [s.params for s in states]
    if any(p.temperature != 1.0 for p in params):
        logits = apply_temperature(logits, [p.temperature for p in params])  # [n, vocab]
    top_k = [p.top_k if p.top_k < vocab else 0 for p in params]
    if any(top_k):
        logits = apply_top_k(logits, top_k)  # [n, vocab]
    p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if p_rows:
        # Only rows that use top-p pay for the nucleus (search kernel, candidates or sort: _nucleus).
        top_p = [params[j].top_p for j in p_rows]
        logits = _on_rows(logits, p_rows, lambda x: _nucleus(x, top_p))  # [n, vocab]
    if any(p.min_p > 0.0 for p in params):
        logits = apply_min_p(logits, [p.min_p for p in params])  # [n, vocab]
    return logits


def sampling_probs(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The distribution the sampler draws each row's token from: float32 [n, vocab].

    Exactly the sampler's processing (min_tokens mask, penalties, then temperature, top-k,
    top-p, min-p and softmax); a greedy row is one-hot at the sampler's argmax. Speculative
    decoding verifies draft tokens against these (target and draft alike).
    """
    processed = _process(logits, states)  # [n, vocab]
    n, vocab = processed.shape
    probs = torch.zeros(n, vocab, dtype=torch.float32, device=logits.device)  # [n, vocab]
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    sample = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy:
        index = to_device(greedy, torch.long, logits.device)  # [num_greedy]
        top = processed.index_select(0, index).argmax(dim=-1)  # [num_greedy]
        probs[index, top] = 1.0
    if sample:
        index = to_device(sample, torch.long, logits.device)  # [num_sampled]
        sub = processed.index_select(0, index).float()  # [num_sampled, vocab]
        sub = filter_logits(sub, [states[i] for i in sample]).softmax(dim=-1)
        probs.index_copy_(0, index, sub)
    return probs


def _process(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """min_tokens masking, then penalties. Returns the input itself when no row needs either."""
    mask_rows: list[int] = []
    mask_ids: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_token_ids) + s.num_pending < s.params.min_tokens:
            banned = s.eos_token_ids | s.params.stop_token_set
            mask_rows.extend([i] * len(banned))
            mask_ids.extend(banned)
    if mask_rows:
        logits = mask_tokens(logits.float(), mask_rows, mask_ids)  # [num_reqs, vocab]

    pen_rows = [i for i, s in enumerate(states) if _uses_penalties(s.params)]
    if pen_rows:
        pen = [states[i] for i in pen_rows]
        no_prompt = torch.empty(0, dtype=torch.long, device=logits.device)
        prompts = [
            _prompt_ids(s, logits.device) if s.params.repetition_penalty != 1.0 else no_prompt
            for s in pen
        ]

        def penalize(x: torch.Tensor) -> torch.Tensor:
            return apply_penalties(
                x,
                prompt_ids=prompts,
                output_ids=[s.output_token_ids for s in pen],
                repetition=[s.params.repetition_penalty for s in pen],
                presence=[s.params.presence_penalty for s in pen],
                frequency=[s.params.frequency_penalty for s in pen],
            )

        logits = _on_rows(logits.float(), pen_rows, penalize)  # [num_reqs, vocab]
    return logits


def _prompt_ids(state: SamplingState, device: torch.device) -> torch.Tensor:
    """The state's prompt ids on `device` [num_prompt_tokens], uploaded once and cached."""
    cached = state.prompt_ids_device
    if cached is None or cached.device != device:
        cached = state.prompt_ids_device = ids_to_device(state.prompt_token_ids, device)
    return cached


def needs_host_tokens(p: SamplingParams) -> bool:
    """Whether sampling for p reads the output token ids themselves (penalties do), so a step
    cannot be queued before the previous step's tokens reach the host."""
    return _uses_penalties(p)


def _uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _exponential_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill t with Exp(1) draws, in place. On the CPU as -log(U), U uniform on [0, 1): ~5x
    faster there than `exponential_` (a row of 49,152: 0.19 against 1.0 ms on one thread). A
    float32 U is 0 with odds 2**-24 a draw; its +inf only drops that token from the race."""
    if t.device.type == "cpu":
        return t.uniform_(generator=generator).log_().neg_()
    return t.exponential_(generator=generator)


def nucleus_by_search(num_rows: int, vocab: int) -> bool:
    """Whether top-p over `num_rows` rows of `vocab` takes the search kernel rather than the sort
    (on a GPU). The kernel gives each row one program, so it pays once there are many rows.
    H100 (bench/results/top-p-kernel-h100-2026-11-27.json, kernel / sort time):
    - vocab 32000: 1.4x slower at 1 row, 1.31x faster at 64, 2.4x faster at 256;
    - vocab 128256: 3.9x slower at 1 row, even at 64, 2.2x faster at 256."""
    return num_rows >= (64 if vocab <= 65536 else 128)


CPU_TOP_P_CANDIDATES = 4096
"""Candidates a row on the CPU (`apply_top_p_candidates`): `topk` of 4,096 out of 49,152 costs
about what 1,024 does (~0.1 ms on one thread), and on the embedded SmolLM2's held-out logits
it holds the nucleus of every row at temperature 1, top_p 0.95 (1,024: 79% of rows)."""


def _nucleus(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Top-p on float32 rows [n, vocab], keeping the sort's tokens up to the rounding of a mass
    that lands on p: on a GPU the sort-free Triton search (kernels/top_p.py) where it pays
    (`nucleus_by_search`), else `apply_top_p`'s full sort; on the CPU the `topk` candidates
    (`apply_top_p_candidates`, not exact: its host sync costs nothing there, and it sorts only
    rows whose nucleus the candidates do not hold)."""
    if not logits.is_cuda:
        return apply_top_p_candidates(logits, top_p, CPU_TOP_P_CANDIDATES, exact=False)
    if top_p_kernel.HAS_TRITON and nucleus_by_search(*logits.shape):
        return top_p_kernel.top_p_filter(logits, to_device(top_p, torch.float32, logits.device))
    return apply_top_p(logits, top_p)


def _on_rows(
    logits: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `fn` to the given rows of `logits` [n, vocab] only; out-of-place."""
    if len(rows) == logits.shape[0]:
        return fn(logits)
    index = to_device(rows, torch.long, logits.device)  # [num_rows]
    return logits.index_copy(0, index, fn(logits.index_select(0, index)))


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: list[int] | None, max_k: int
) -> torch.Tensor:
    """Raw logprob, rank and top-max_k of the chosen tokens, packed as float64.

    logits: the unprocessed input [num_reqs, vocab]; token_ids: [num_reqs]; rows: which rows
    to keep (None: all). Returns [len(rows), 2 + 2 * max_k]: logprob, rank, max_k top
    logprobs (best first), their ids. log_softmax runs in float32. Rank is 1 + the number of
    tokens strictly more likely than the chosen one. Read a row back with `unpack_logprobs`.
    """
    if rows is not None and len(rows) < logits.shape[0]:
        index = to_device(rows, torch.long, logits.device)  # [num_lp_rows]
        logits = logits.index_select(0, index)  # [num_lp_rows, vocab]
        token_ids = token_ids.index_select(0, index)  # [num_lp_rows]
    raw = logits.float().log_softmax(dim=-1)  # [num_lp_rows, vocab]
    chosen = raw.gather(1, token_ids[:, None])  # [num_lp_rows, 1]
    rank = (raw > chosen).sum(dim=-1, keepdim=True) + 1  # [num_lp_rows, 1]
    parts = [chosen.to(torch.float64), rank.to(torch.float64)]
    if max_k > 0:
        top_lp, top_ids = raw.topk(max_k, dim=-1)  # [num_lp_rows, max_k] each
        parts += [top_lp.to(torch.float64), top_ids.to(torch.float64)]
    return torch.cat(parts, dim=1)  # [num_lp_rows, 2 + 2 * max_k]


def unpack_logprobs(row: list[float], token_id: int, k: int, max_k: int) -> TokenLogprobs:
    """One host row of `gather_logprobs` (width 2 + 2 * max_k) as TokenLogprobs with k top."""
    top_lp, top_ids = row[2 : 2 + max_k], row[2 + max_k :]
    return TokenLogprobs(
        token_id=token_id,
        logprob=row[0],
        rank=int(row[1]),
        top=[(int(top_ids[r]), top_lp[r]) for r in range(k)],
    )


def _step_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed from (request seed, output position): splitmix64, twice.

    Mixing (rather than seed + position) keeps neighbouring seeds' streams unrelated.
    """
    return _mix64((_mix64(seed & _MASK64) + position) & _MASK64)


def _mix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)

