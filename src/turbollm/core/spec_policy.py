"""How many draft tokens each request verifies per step (plain Python, CPU).

Owned by the scheduler. Each step `choose` gets the requests ready to decode and returns K
per request (0: a plain decode). `observe_request` and `observe_step` learn from every
step's result:

- per request, the acceptance rate of its drafts (decayed counts, so it follows a request
  whose text turns from copying to free writing) and the share of planned draft slots the
  proposer filled (an n-gram with no match proposes nothing, and an empty slot costs
  nothing);
- per request, with a draft model, how many of its positions the draft's cache holds: a
  request that has not speculated lately makes the draft first catch up on its prompt or
  recent tokens (a prefill of the draft), a cost the step must be charged;
- per step, measured wall times: the target's step seconds by total scheduled tokens (plain
  decode steps and speculative steps in separate tables, since on a GPU the former replay
  CUDA graphs) and the draft's seconds per forward by the tokens that forward ran.

The choice maximizes predicted tokens per second for the whole step. With a1 the rate at
which a request's first draft is accepted and b the rate at which a draft following an
accepted one is, its k-th draft is emitted with probability a1 b^(k-1) (the marginal gain), so
for a threshold t every request takes the drafts whose gain is >= t; each option gives
expected tokens / predicted seconds, and the best one wins unless a plain decode step is
predicted faster. Predicted seconds are the target's at the expected verified tokens (never
less than a measured plain step of as many tokens) plus every draft forward, the first one
running each speculating request's catch-up tokens. A catch-up is paid once and serves the
request's later steps, so the part beyond one token per request is spread over the steps it
may still take (at most `refresh_steps`, the horizon over which the policy re-judges
itself); and since it is sunk if the judgement was wrong, requests whose draft cache is not
current join at most as many per step as already speculate (speculation widens by
doubling, see `_with_catch_up_limit`).

Costs come from measurements only. The first speculative step is a probe: one request, the
one whose draft has least to catch up, with at most two drafts (repeated while no probe has
drafted anything: an n-gram without a match costs nothing). A policy that judged
speculation not worth it re-tests it with the same kind of probe, but only once the
predicted extra cost of the probe fits an exploration budget that grows by 1% of every plain
step's time and empties at each probe, so re-testing costs ~1% of plain decoding (of the
≤ 5% that adaptive speculation may lose to plain decoding at worst, the rest is room for
noise in the measurements it decides from). Every `refresh_steps` a plain step refreshes
the baseline at the current batch size. Sizes beyond the largest measured one are
extrapolated from the measured slope (the target's plain-step slope while only one
speculative size is known; proportional to size with no slope at all), so a larger step is
never predicted cheaper than what was measured.
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
"""Weight of a new time measurement in its bucket's average (1/count for a bucket's first
few, so one noisy first measurement does not linger)."""
_THRESHOLDS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01)
"""Candidate cut-offs of a draft's emission chance; measured costs choose among them (an
n-gram draft on a weight-bound step costs ~1-3% of the step, so low ones can pay)."""
_EXPLORE_SHARE = 0.01
"""Re-testing a judgement against speculation may cost this share of plain-step time."""
_PROBE_K = 2
"""Drafts of a probe: two measure both acceptance rates and, with a draft model, both kinds
of draft forward (the catch-up and a single-token one)."""


@dataclass
class _Acceptance:
    """Decayed counts of one request's verifications. Acceptance is bursty (an n-gram match
    or an easy stretch of text accepts a run of drafts), so two rates are kept: of the first
    draft, and of a draft whose predecessor was accepted; and the share of planned draft
    slots that got a draft (the rates are of drafts that exist)."""

    first: float = _PRIOR[0]
    first_n: float = _PRIOR[1]
    cont: float = _PRIOR[0]
    cont_n: float = _PRIOR[1]
    fill: float = 1.0
    fill_n: float = 1.0
    decay: float = _DECAY

    def observe(self, planned: int, drafted: int, accepted: int) -> None:
        d = self.decay
        if planned:
            self.fill = d * self.fill + drafted / planned
            self.fill_n = d * self.fill_n + 1
        if not drafted:
            return
        self.first = d * self.first + (accepted > 0)
        self.first_n = d * self.first_n + 1
        self.cont = d * self.cont + max(0, accepted - 1)
        self.cont_n = d * self.cont_n + min(accepted, drafted - 1)

    @property
    def rates(self) -> tuple[float, float]:
        """(P(first draft accepted), P(next draft accepted | previous accepted))."""
        return min(self.first / self.first_n, 0.99), min(self.cont / self.cont_n, 0.99)

    @property
    def fill_rate(self) -> float:
        """Expected share of planned draft slots the proposer fills."""
        return min(self.fill / self.fill_n, 1.0)

    def copy_rates(self) -> _Acceptance:
        """A new request's start: these rates, weighted as one observation."""
        (a1, b), f = self.rates, self.fill_rate
        return _Acceptance(a1, 1.0, b, 1.0, f, 1.0)


class CostTable:
    """Exponential averages of measured (size, seconds), one per power-of-two size bucket."""

    def __init__(self) -> None:
        self.points: dict[int, tuple[float, float]] = {}
        """bucket -> (average size, average seconds)."""
        self.counts: dict[int, int] = {}
        self.last_step: dict[int, int] = {}

    @staticmethod
    def bucket(n: int) -> int:
        return max(0, math.ceil(math.log2(max(n, 1))))

    def observe(self, n: int, seconds: float, step: int) -> None:
        b = self.bucket(n)
        old = self.points.get(b, (0.0, 0.0))
        self.counts[b] = count = self.counts.get(b, 0) + 1
        w = max(_EMA, 1 / count)
        self.points[b] = ((1 - w) * old[0] + w * n, (1 - w) * old[1] + w * seconds)
        self.last_step[b] = step

    def slope(self) -> float | None:
        """Seconds per unit of size between the two largest measured sizes (None: < 2 points)."""
        pts = sorted(self.points.values())
        if len(pts) < 2:
            return None
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return max(0.0, (y1 - y0) / max(x1 - x0, 1e-9))

    def lower_bound(self, n: float) -> float:
        """Seconds size n costs at least, by measurements only: the prediction within the
        measured sizes, the largest size's seconds beyond them (0.0: nothing measured)."""
        if not self.points:
            return 0.0
        x1, y1 = max(self.points.values())
        return y1 if n >= x1 else self.predict(n) or 0.0

    def predict(self, n: float, slope: float | None = None) -> float | None:
        """Seconds for size n, linear between measured points, flat below the smallest, and
        never above a measured larger size (a size the policy then avoids is never measured
        again, so a high outlier would otherwise stay). Above the largest: the slope of the
        two largest; with one point, `slope` if given (a related table's measured slope),
        else proportional to size (no economy of scale assumed, so a size never measured is
        not predicted cheap). None: nothing measured."""
        if not self.points:
            return None
        pts = sorted(self.points.values())
        if n <= pts[0][0]:
            return min(y for _, y in pts)
        for i, ((x0, y0), (x1, y1)) in enumerate(zip(pts, pts[1:])):
            if n <= x1:
                y = y0 + (y1 - y0) * (n - x0) / max(x1 - x0, 1e-9)
                return min(y, *(y2 for _, y2 in pts[i + 1:]))
        x1, y1 = pts[-1]
        own = self.slope()
        if own is not None:
            return y1 + own * (n - x1)
        if slope is not None:
            return y1 + slope * (n - x1)
        return y1 * n / max(x1, 1e-9)


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
    num_tokens: int = 1
    """Tokens known (prompt + outputs): a draft model must have seen all but the last."""
    room: int = 0
    """Tokens it may still emit after this step's first (max_tokens, context); 0: unknown."""


@dataclass
class _Option:
    """One candidate set of Ks and what it is predicted to give."""

    ks: list[int]
    tokens: float
    seconds: float


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
        self.draft_valid: dict[str, int] = {}
        """request_id -> positions the draft model's cache holds (absent: none)."""
        self.plain = CostTable()
        """Target seconds of decode-only steps without speculation, by batch size."""
        self.spec = CostTable()
        """Target seconds of decode-only speculative steps, by tokens verified (with an n-gram
        proposer, its lookups included)."""
        self.draft = CostTable()
        """Draft-model seconds per forward, by tokens in the forward."""
        self.step = 0
        self.explore_budget = 0.0
        """Seconds the policy may spend on its next probe (see the module docstring)."""
        self.drafts_measured = False
        """Whether a speculative step that verified drafts has been measured."""
        self.counters = SpecCounters()

    # ---- learning ------------------------------------------------------------------------
    def observe_request(self, request_id: str, planned: int, drafted: int, accepted: int,
                        draft_valid: int = 0) -> None:
        """A verification: `planned` draft slots, `drafted` filled, `accepted` of them; with a
        draft model, `draft_valid` positions of the request are in its cache now."""
        self.counters.record(drafted, accepted)
        acc = self.acceptance.get(request_id)
        if acc is None:
            acc = self.acceptance[request_id] = self.pooled.copy_rates()
        acc.observe(planned, drafted, accepted)
        self.pooled.observe(planned, drafted, accepted)
        if self.uses_draft_model and drafted:
            self.draft_valid[request_id] = draft_valid

    def observe_step(self, num_reqs: int, num_tokens: int, speculative: bool,
                     step_seconds: float, draft_seconds: float = 0.0,
                     draft_forwards: list[tuple[int, float]] | None = None) -> None:
        """One decode-only step's measured times (steps with prompt chunks are not fed):
        the step's seconds, of them the draft model's, and (tokens, seconds) of each draft
        forward."""
        self.step += 1
        if step_seconds <= 0:
            return
        if not speculative:
            self.plain.observe(num_reqs, step_seconds, self.step)
            self.explore_budget += _EXPLORE_SHARE * step_seconds
            return
        self.drafts_measured |= num_tokens > num_reqs
        if not self.uses_draft_model:
            self.spec.observe(num_tokens, step_seconds, self.step)
            return
        self.spec.observe(num_tokens, step_seconds - draft_seconds, self.step)
        for n, seconds in draft_forwards or []:
            self.draft.observe(n, seconds, self.step)

    def draft_lost(self, request_id: str) -> None:
        """The request's draft cache is gone (preempted): it catches up from scratch."""
        self.draft_valid.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)
        self.draft_valid.pop(request_id, None)

    def rates(self, request_id: str) -> tuple[float, float]:
        """(a1, b) of the request's filled drafts (see the module docstring)."""
        acc = self.acceptance.get(request_id)
        return (acc or self.pooled).rates

    def _gain_rates(self, request_id: str) -> tuple[float, float, float]:
        """(P(first slot drafted and accepted), b, fill rate)."""
        acc = self.acceptance.get(request_id) or self.pooled
        (a1, b), f = acc.rates, acc.fill_rate
        return f * a1, b, f

    def catch_up(self, cand: Candidate) -> int:
        """Tokens the draft's first forward runs for this request (its last one included)."""
        if not self.uses_draft_model:
            return 0
        return max(1, cand.num_tokens - self.draft_valid.get(cand.request_id, 0))

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
        rates = [self._gain_rates(c.request_id) for c in cands]
        catch = [self.catch_up(c) for c in cands]
        if not self.drafts_measured:
            self.explore_budget = 0.0
            return self._probe(cands, catch)  # a free probe (see the module docstring)
        best: _Option | None = None
        for t in _THRESHOLDS:
            ks = [min(c.max_k, _drafts_above(r[:2], t)) for c, r in zip(cands, rates, strict=True)]
            for opt in self._with_catch_up_limit(ks, catch):
                if any(opt):
                    o = self._option(cands, rates, catch, opt)
                    if best is None or o.tokens / o.seconds > best.tokens / best.seconds:
                        best = o
        if best is not None and best.tokens / best.seconds > b / plain:
            return {c.request_id: k for c, k in zip(cands, best.ks, strict=True) if k}
        # Speculation is judged not worth it; acceptance and costs are only measured while
        # speculating, so a judgement never re-tested would be final. Probe within budget.
        probe = self._probe(cands, catch)
        ks = [probe.get(c.request_id, 0) for c in cands]
        extra = self._option(cands, rates, catch, ks, amortize=False).seconds - plain
        if extra > self.explore_budget:
            return {}
        self.explore_budget = 0.0
        return probe

    def _with_catch_up_limit(self, ks: list[int], catch: list[int]) -> list[list[int]]:
        """Options for one threshold's Ks. A request whose draft cache is current (catch-up
        <= 2: what one verification leaves) keeps its K; requests that would first need a
        catch-up join at most as many per step as already speculate with a current cache
        (at least one), least catch-up first. A catch-up is paid at once and only repaid over
        later steps, so speculation widens by doubling, each step judged on costs measured
        at about its size, and a wrong judgement sinks at most what the last step invested.
        Also the option of the current ones only. An n-gram has no catch-up: Ks as given."""
        if not self.uses_draft_model:
            return [ks]
        warm = [k if n <= 2 else 0 for k, n in zip(ks, catch, strict=True)]
        cold = sorted((n, i) for i, (k, n) in enumerate(zip(ks, catch, strict=True)) if k and n > 2)
        if not cold:
            return [ks]
        grown = list(warm)
        for _, i in cold[: max(1, sum(1 for k in warm if k))]:
            grown[i] = ks[i]
        return [grown, warm]

    def _probe(self, cands: list[Candidate], catch: list[int]) -> dict[str, int]:
        """The cheapest informative speculative step: the request with least catch-up."""
        i = min(range(len(cands)), key=lambda j: catch[j])
        return {cands[i].request_id: min(cands[i].max_k, _PROBE_K)}

    def _option(self, cands: list[Candidate], rates: list[tuple[float, float, float]],
                catch: list[int], ks: list[int], amortize: bool = True) -> _Option:
        """Expected tokens and predicted seconds of a step with these Ks (with `amortize`
        off, catch-up counted in full: a probe's pays for nothing later)."""
        tokens = sum(_expected_tokens(r[:2], k) for r, k in zip(rates, ks, strict=True))
        verified = len(cands) + sum(r[2] * k for r, k in zip(rates, ks, strict=True))
        seconds = self.spec.predict(verified, self.plain.slope())
        assert seconds is not None
        # A speculative step does at least a plain step's work on as many tokens (and runs
        # eagerly where plain steps replay graphs): two noisy tables must not make it cheaper.
        seconds = max(seconds, self.plain.lower_bound(verified))
        if self.uses_draft_model:
            seconds += self._draft_seconds(cands, rates, catch, ks, amortize)
        return _Option(ks, tokens, seconds)

    def _draft_seconds(self, cands: list[Candidate], rates: list[tuple[float, float, float]],
                       catch: list[int], ks: list[int], amortize: bool) -> float:
        """Draft forwards of a step: the first runs every speculating request's catch-up,
        the others one token per request still drafting. The first forward's cost beyond
        one token per request is spread over each request's remaining steps."""
        live = [i for i, k in enumerate(ks) if k]
        steady = self._draft(len(live))
        now = self._draft(sum(catch[i] for i in live))
        excess = sum(catch[i] - 1 for i in live)
        if excess > 0 and amortize:
            share = 0.0
            for i in live:
                steps = cands[i].room / _expected_tokens(rates[i][:2], ks[i])
                share += (catch[i] - 1) / min(self.refresh_steps, max(1.0, steps))
            now = steady + max(0.0, now - steady) * share / excess
        return now + sum(self._draft(sum(1 for k in ks if k >= depth))
                         for depth in range(2, max(ks) + 1))

    def _draft(self, tokens: int) -> float:
        seconds = self.draft.predict(tokens)
        assert seconds is not None
        return seconds


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
