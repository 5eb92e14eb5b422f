"""`turbollm bench serve`: a load generator for any OpenAI-compatible server.

Sends streaming /v1/completions requests (Poisson arrivals at each given rate, or all at
once for `inf`, optionally under a concurrency cap) and measures, per request, the time to
first token (TTFT), the time per output token after the first (TPOT), the gaps between
streamed chunks (ITL) and the end-to-end latency. Reports mean/p50/p99 of each, request and
output-token throughput, and goodput (requests/s meeting the SLOs given). Random prompts
are token-id lists, so their length is exact on any server that accepts token-id prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from turbollm.bench.report import write_json


@dataclass
class RequestResult:
    """What one request measured (seconds)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def _prompts(args: argparse.Namespace, rng: random.Random) -> list[str | list[int]]:
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as fh:
            lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
        if not lines:
            raise ValueError(f"{args.prompt_file} has no prompts")
        return [lines[i % len(lines)] for i in range(args.num_prompts)]
    return [[rng.randrange(1000, 10000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]


async def _one(client: httpx.AsyncClient, model: str, prompt: str | list[int], out_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last = t0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    res.error = str(msg["error"].get("message"))
                    return res
                now = time.perf_counter()
                if msg.get("choices") and msg["choices"][0].get("text"):
                    if res.ttft == 0.0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if msg.get("usage"):
                    res.output_tokens = int(msg["usage"]["completion_tokens"])
        res.e2e = time.perf_counter() - t0
        res.ok = res.ttft > 0.0
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run_rate(args: argparse.Namespace, model: str, prompts: list[str | list[int]],
                    rate: float, rng: random.Random) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(args.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or len(prompts))
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=600, limits=limits) as c:
        async def limited(p: str | list[int]) -> RequestResult:
            async with sem:
                return await _one(c, model, p, args.output_len)

        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
    s = sorted(values)
    return {"mean_ms": 1000 * statistics.fmean(s), "p50_ms": 1000 * s[len(s) // 2],
            "p99_ms": 1000 * s[min(len(s) - 1, int(0.99 * len(s)))]}


def summarize(results: list[RequestResult], duration: float, rate: float,
              slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> dict[str, Any]:
    """The report of one rate: latency statistics, throughput and goodput."""
    ok = [r for r in results if r.ok]
    good = [r for r in ok if (slo_ttft_ms is None or 1000 * r.ttft <= slo_ttft_ms)
            and (slo_tpot_ms is None or 1000 * r.tpot <= slo_tpot_ms)]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "request_rate": rate if rate != float("inf") else "inf",
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": tokens / duration,
        "goodput": len(good) / duration,
        "ttft": _stats([r.ttft for r in ok]), "tpot": _stats([r.tpot for r in ok if r.output_tokens > 1]),
        "itl": _stats([x for r in ok for x in r.itl]), "e2e": _stats([r.e2e for r in ok]),
    }


def _plot(reports: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from e
    finite = [r for r in reports if r["request_rate"] != "inf"]
    xs = [r["request_rate"] for r in finite]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("ttft", "tpot", "e2e"):
        ax.plot(xs, [r[key]["p50_ms"] for r in finite], marker="o", label=f"{key} p50")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run every rate in turn; print a table; write JSON and the plot if asked."""
    if args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        raise ValueError("--num-prompts, --output-len and --input-len must be >= 1")
    if any(r <= 0 for r in args.request_rate):
        raise ValueError("--request-rate values must be > 0 (inf: all at once)")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers,
                                    timeout=30).json()["data"][0]["id"]
    rng = random.Random(args.seed)
    prompts = _prompts(args, rng)
    reports = []
    for rate in args.request_rate:
        results, duration = asyncio.run(_run_rate(args, model, prompts, rate, rng))
        rep = summarize(results, duration, rate, args.slo_ttft_ms, args.slo_tpot_ms)
        reports.append(rep)
        print(f"rate {rep['request_rate']}: {rep['completed']} ok, {rep['failed']} failed, "
              f"{rep['request_throughput']:.2f} req/s, {rep['output_token_throughput']:.1f} tok/s, "
              f"goodput {rep['goodput']:.2f} req/s | TTFT p50 {rep['ttft']['p50_ms']:.0f} ms "
              f"p99 {rep['ttft']['p99_ms']:.0f} | TPOT p50 {rep['tpot']['p50_ms']:.1f} ms "
              f"| ITL p50 {rep['itl']['p50_ms']:.1f} ms | E2E p50 {rep['e2e']['p50_ms']:.0f} ms")
    out = {"base_url": args.base_url, "model": model, "args": {k: v for k, v in vars(args).items()
           if k not in ("func", "api_key")}, "results": reports}
    if args.output_json:
        write_json(args.output_json, out)
    if args.plot:
        _plot(reports, args.plot)
    return 0 if all(r["failed"] == 0 for r in reports) else 1


__all__ = ["RequestResult", "run_bench_serve", "summarize"]
