"""Prometheus metrics for /metrics (prometheus-client, one registry per app).

Scheduler state (running, waiting, KV usage, preemptions) is read at scrape time from the
AsyncEngine's latest stats snapshot, so it is never stale by more than one step. Token
counters and latency histograms are fed by a RequestTracker per engine request, on the
event loop. Times are time.monotonic seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from turbollm.core.scheduler import SchedulerStats
from turbollm.core.spec_policy import SpecCounters
from turbollm.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Scheduler gauges, read from a stats snapshot when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], SchedulerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("turbollm:num_requests_running", "Requests running in the engine "
                                "(n > 1 counts each completion).", value=s.num_running)
        yield GaugeMetricFamily("turbollm:num_requests_waiting", "Requests waiting to be scheduled.",
                                value=s.num_waiting)
        yield GaugeMetricFamily("turbollm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use "
                                "(0 to 1).", value=s.kv_cache_usage)
        yield CounterMetricFamily("turbollm:num_preemptions", "Preemptions since start.",
                                  value=s.num_preemptions)
        if s.spec is not None:
            yield from _spec_metrics(s.spec)


def _spec_metrics(c: SpecCounters) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Speculative decoding: acceptance, tau (tokens per target pass) and acceptance by position."""
    yield CounterMetricFamily("turbollm:spec_decode_num_drafts", "Request-steps that verified at "
                              "least one draft token.", value=c.num_verified)
    yield CounterMetricFamily("turbollm:spec_decode_num_draft_tokens", "Draft tokens proposed.",
                              value=c.num_draft_tokens)
    yield CounterMetricFamily("turbollm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                              value=c.num_accepted_tokens)
    yield CounterMetricFamily("turbollm:spec_decode_num_emitted_tokens", "Tokens emitted by "
                              "verifications (accepted + bonus or resampled).", value=c.num_emitted_tokens)
    yield GaugeMetricFamily("turbollm:spec_decode_acceptance_rate", "Accepted / proposed draft "
                            "tokens since start.", value=c.acceptance_rate)
    yield GaugeMetricFamily("turbollm:spec_decode_mean_accepted_length", "tau: tokens emitted per "
                            "target pass of a speculating request (bonus included).",
                            value=c.mean_accepted_length)
    by_pos = GaugeMetricFamily("turbollm:spec_decode_acceptance_by_position", "Acceptance rate of "
                               "the draft token at each position (1-based).", labels=["position"])
    for i, rate in enumerate(c.acceptance_by_position):
        by_pos.add_metric([str(i + 1)], rate)
    yield by_pos


class ServerMetrics:
    """All metrics of one server."""

    def __init__(self, stats: Callable[[], SchedulerStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        r = self.registry
        self.prompt_tokens = Counter("turbollm:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("turbollm:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("turbollm:request_success", "Finished engine requests by finish "
                                "reason.", ["finished_reason"], registry=r)
        self.ttft = Histogram("turbollm:time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("turbollm:inter_token_latency_seconds", "Time between successive "
                             "token deliveries of one request.", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("turbollm:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("turbollm:request_queue_time_seconds", "Arrival to the start of the "
                               "step that produced the first output.", buckets=_LATENCY_BUCKETS,
                               registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrival: float) -> RequestTracker:
        return RequestTracker(self, arrival)


class RequestTracker:
    """Latency and token accounting for one engine request (loop thread)."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._m = metrics
        self.arrival = arrival
        self._last: float | None = None
        self._tokens = 0
        self._prompt_counted = False

    def on_output(self, out: RequestOutput, first_step_start: float | None = None) -> None:
        """Account for a cumulative output; call for every output of the request, in order."""
        now = time.monotonic()
        if not self._prompt_counted:
            self._prompt_counted = True
            self._m.prompt_tokens.inc(len(out.prompt_token_ids))
            if first_step_start is not None:
                self._m.queue.observe(max(0.0, first_step_start - self.arrival))
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self._tokens
        if new > 0:
            self._m.generation_tokens.inc(new)
            if self._last is None:
                self._m.ttft.observe(now - self.arrival)
            else:
                self._m.itl.observe(now - self._last)
            self._last = now
            self._tokens = total
        if out.finished:
            self._m.e2e.observe(now - self.arrival)
            for c in out.outputs:
                self._m.requests.labels(finished_reason=c.finish_reason or "abort").inc()
