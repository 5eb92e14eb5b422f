"""How many draft tokens each request verifies per step (plain Python, CPU).

Owned by the scheduler. Each step `choose` gets the requests ready to decode and returns K
per request (0: a plain decode). `observe` learns from every step's result:

- per request, the acceptance rate of its drafts (decayed counts, so it follows a request
  whose text turns from copying to free writing);
- per step, measured wall times: the target's step seconds by total scheduled tokens (plain
  decode steps and speculative steps in separate tables, since on a GPU the former replay
  CUDA graphs) and the draft's seconds per forward by batch size.

The choice maximizes predicted tokens per second for the whole step. With a1 the rate at
which a request's first draft is accepted and b the rate at which a draft following an
accepted one is, its k-th draft is emitted with probability a1 b^(k-1) (the marginal gain), so
for a threshold t every request takes the drafts whose gain is >= t; each threshold gives
expected tokens / predicted seconds, and the best one wins unless a plain decode step is
predicted faster. Costs come from measurements only: with no speculative measurement yet the
policy speculates once to get one; every `refresh_steps` a plain step refreshes the baseline
at the current batch size, and a speculative step re-tests a policy that stopped
speculating (each costs at most one step in `refresh_steps`); sizes beyond the largest
measured one are extrapolated from the last measured slope (so a larger K is tried once and
then judged on its real cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from turbollm.config import SpeculativeConfig

_DECAY = 0.8
"""Weight of a request's past drafts per new observation."""
_PRIOR = (0.5, 1.0)
"""(accepted, trials) pseudo-counts: a new request starts at acceptance 0.5."""
_POOLED_DECAY = 0.98
"""Weight of the pooled past per new observation (a window of ~50 verifications)."""
_EMA = 0.3
"""Weight of a new time measurement in its bucket's average."""
_THRESHOLDS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


@dataclass
class _Acceptance:
    """Decayed counts of one request's verifications. Acceptance is bursty (an n-gram match
    or an easy stretch of text accepts a run of drafts), so two rates are kept: of the first
    draft, and of a draft whose predecessor was accepted."""

    first: float = _PRIOR[0]
    first_n: float = _PRIOR[1]
    cont: float = _PRIOR[0]
    cont_n: float = _PRIOR[1]
    decay: float = _DECAY

    def observe(self, drafted: int, accepted: int) -> None:
        d = self.decay
        self.first = d * self.first + (accepted > 0)
        self.first_n = d * self.first_n + 1
        self.cont = d * self.cont + max(0, accepted - 1)
        self.cont_n = d * self.cont_n + min(accepted, drafted - 1)

    @property
    def rates(self) -> tuple[float, float]:
        """(P(first draft accepted), P(next draft accepted | previous accepted))."""
        return min(self.first / self.first_n, 0.99), min(self.cont / self.cont_n, 0.99)


class CostTable:
    """Exponential averages of measured (size, seconds), one per power-of-two size bucket."""

    def __init__(self) -> None:
        self.points: dict[int, tuple[float, float]] = {}
        """bucket -> (average size, average seconds)."""
        self.last_step: dict[int, int] = {}

    @staticmethod
    def bucket(n: int) -> int:
        return max(0, math.ceil(math.log2(max(n, 1))))

    def observe(self, n: int, seconds: float, step: int) -> None:
        b = self.bucket(n)
        old = self.points.get(b)
        if old is None:
            self.points[b] = (float(n), seconds)
        else:
            self.points[b] = ((1 - _EMA) * old[0] + _EMA * n, (1 - _EMA) * old[1] + _EMA * seconds)
        self.last_step[b] = step

    def predict(self, n: int) -> float | None:
        """Seconds for size n, linear between measured points, flat below the smallest;
        above the largest, the slope of the last two (flat with one point: optimistic, so the
        policy tries the larger size once and learns its real cost). None: nothing measured."""
        if not self.points:
            return None
        pts = sorted(self.points.values())
        if n <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / max(x1 - x0, 1e-9)
        if len(pts) == 1:
            return pts[0][1]
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return y1 + max(0.0, (y1 - y0) / max(x1 - x0, 1e-9)) * (n - x1)


@dataclass
class SpecCounters:
    """Totals since start over verified request-steps with at least one draft (host side)."""

    num_verified: int = 0
    """Request-steps that verified >= 1 draft token (one target pass each)."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0
    """Accepted drafts + the one token each verification adds (bonus or resampled)."""
    drafted_by_position: list[int] = field(default_factory=list)
    """[i]: request-steps that proposed a draft at position i + 1."""
    accepted_by_position: list[int] = field(default_factory=list)
    """[i]: of those, request-steps whose draft i + 1 was accepted."""

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.num_verified += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.num_emitted_tokens += accepted + 1
        grow = drafted - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += i < accepted

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per target pass of a speculating request (bonus included)."""
        return self.num_emitted_tokens / self.num_verified if self.num_verified else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_position, self.drafted_by_position)]

    def copy(self) -> SpecCounters:
        return SpecCounters(self.num_verified, self.num_draft_tokens, self.num_accepted_tokens,
                            self.num_emitted_tokens, list(self.drafted_by_position),
                            list(self.accepted_by_position))

    def as_dict(self) -> dict[str, object]:
        return {"num_verified": self.num_verified, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "num_emitted_tokens": self.num_emitted_tokens,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
                "acceptance_by_position": self.acceptance_by_position}


@dataclass
class Candidate:
    """A request ready to decode and the most draft tokens it may take this step."""

    request_id: str
    max_k: int


class SpecPolicy:
    """Adaptive K (see the module docstring); with adaptive off, every request gets its max."""

    def __init__(self, config: SpeculativeConfig, uses_draft_model: bool, refresh_steps: int = 50) -> None:
        self.config = config
        self.uses_draft_model = uses_draft_model
        self.refresh_steps = refresh_steps
        self.acceptance: dict[str, _Acceptance] = {}
        self.pooled = _Acceptance(decay=_POOLED_DECAY)
        """Every request's verifications: the prior of a request that has none yet, so a
        useless draft is not retried on every new request, and a good one starts at once."""
        self.plain = CostTable()
        """Target seconds of decode-only steps without speculation, by batch size."""
        self.spec = CostTable()
        """Target seconds of decode-only speculative steps, by tokens verified."""
        self.draft = CostTable()
        """Draft seconds per draft forward, by number of speculating requests."""
        self.step = 0
        self.last_spec_step = 0
        self.counters = SpecCounters()

    # ---- learning ------------------------------------------------------------------------
    def observe_request(self, request_id: str, drafted: int, accepted: int) -> None:
        self.counters.record(drafted, accepted)
        if drafted:
            acc = self.acceptance.get(request_id)
            if acc is None:
                a1, b = self.pooled.rates
                acc = self.acceptance[request_id] = _Acceptance(a1, 1.0, b, 1.0)
            acc.observe(drafted, accepted)
            self.pooled.observe(drafted, accepted)

    def observe_step(self, num_reqs: int, num_tokens: int, speculative: bool, max_k: int,
                     step_seconds: float, draft_seconds: float) -> None:
        """One decode-only step's measured times (steps with prompt chunks are not fed)."""
        self.step += 1
        if step_seconds <= 0:
            return
        if not speculative:
            self.plain.observe(num_reqs, step_seconds, self.step)
            return
        self.last_spec_step = self.step
        self.spec.observe(num_tokens, step_seconds - draft_seconds, self.step)
        if self.uses_draft_model and max_k > 0:
            self.draft.observe(num_reqs, draft_seconds / max_k, self.step)

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)

    def rates(self, request_id: str) -> tuple[float, float]:
        acc = self.acceptance.get(request_id)
        return (acc or self.pooled).rates

    # ---- choosing ------------------------------------------------------------------------
    def choose(self, cands: list[Candidate]) -> dict[str, int]:
        """K per candidate request (0: plain decode); see the module docstring."""
        cands = [c for c in cands if c.max_k > 0]
        if not cands:
            return {}
        if not self.config.speculative_adaptive:
            return {c.request_id: c.max_k for c in cands}
        b = len(cands)
        plain = self.plain.predict(b)
        bucket = CostTable.bucket(b)
        if plain is None or self.step - self.plain.last_step.get(bucket, -10**9) >= self.refresh_steps:
            return {}  # measure (or refresh) the plain-decode cost at this batch size
        rates = [self.rates(c.request_id) for c in cands]
        best_ks: list[int] = []
        best = b / plain
        # A stale judgement is re-tested: speculation's cost and the requests' acceptance
        # are only measured while speculating, so a policy that stopped would never resume.
        explore = self.step - self.last_spec_step >= self.refresh_steps
        fallback: tuple[float, list[int]] = (0.0, [])
        for t in _THRESHOLDS:
            ks = [min(c.max_k, _drafts_above(r, t)) for c, r in zip(cands, rates, strict=True)]
            total = sum(ks)
            if total == 0:
                continue
            seconds = self._predict_spec(b + total, ks)
            if seconds is None:
                return {c.request_id: k for c, k in zip(cands, ks, strict=True)}  # explore
            tokens = sum(_expected_tokens(r, k) for r, k in zip(rates, ks, strict=True))
            if tokens / seconds > best:
                best, best_ks = tokens / seconds, ks
            if tokens / seconds > fallback[0]:
                fallback = (tokens / seconds, ks)
        if not best_ks and explore:
            best_ks = fallback[1] or [min(c.max_k, 1) for c in cands]
        if not best_ks:
            return {}
        return {c.request_id: k for c, k in zip(cands, best_ks, strict=True) if k}

    def _predict_spec(self, num_tokens: int, ks: list[int]) -> float | None:
        target = self.spec.predict(num_tokens)
        if target is None:
            return None
        if not self.uses_draft_model:
            return target
        draft = 0.0
        for depth in range(1, max(ks) + 1):
            n = sum(1 for k in ks if k >= depth)
            per = self.draft.predict(n)
            if per is None:
                return None
            draft += per
        return target + draft


def _drafts_above(rates: tuple[float, float], threshold: float) -> int:
    """The largest k whose k-th draft is emitted with chance a1 * b^(k-1) >= threshold."""
    a1, b = rates
    if a1 < threshold:
        return 0
    if b <= 0.0:
        return 1
    return 1 + int(math.log(threshold / a1) / math.log(b) + 1e-9)


def _expected_tokens(rates: tuple[float, float], k: int) -> float:
    """Tokens a step emits with k drafts (bonus included): 1 + sum of a1 * b^(i-1)."""
    a1, b = rates
    return 1.0 + sum(a1 * b**i for i in range(k))
