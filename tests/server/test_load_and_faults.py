"""Faults and load against real servers: clients that vanish mid-stream, and 64 concurrent
requests on a KV budget too small for them (preemption)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from serverutil import ServerProcess, metric

pytestmark = pytest.mark.slow
PROMPT = "Write a long story about a dragon who learns to read. It begins in a small village where"


def _engine_idle(server: ServerProcess) -> tuple[bool, str]:
    page = httpx.get(server.base_url + "/metrics", headers=server.headers, timeout=10).text
    vals = [metric(page, f"turbollm:{n}") for n in
            ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
    return vals == [0.0, 0.0, 0.0], str(vals)


async def _read_then_drop(server: ServerProcess, chunks: int) -> int:
    """Open a stream, read `chunks` data frames, then close the connection mid-stream."""
    got = 0
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got >= chunks:
                        break
    return got


def _generated(server: ServerProcess) -> float:
    page = httpx.get(server.base_url + "/metrics", headers=server.headers, timeout=10).text
    return metric(page, "turbollm:generation_tokens_total")


def _wait_idle(server: ServerProcess, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    idle, vals = _engine_idle(server)
    while not idle and time.monotonic() < deadline:
        time.sleep(0.1)
        idle, vals = _engine_idle(server)
    assert idle, f"running, waiting, KV usage {within_s} s after the disconnect: {vals}"


def test_disconnected_streams_are_aborted_and_free_their_blocks(shared_server: ServerProcess) -> None:
    before = _generated(shared_server)

    async def run() -> list[int]:
        return await asyncio.gather(*[_read_then_drop(shared_server, 3) for _ in range(10)])

    assert asyncio.run(run()) == [3] * 10
    _wait_idle(shared_server, 5.0)
    # Left alone they would have generated 10 x 400 tokens (far more than 5 s on a CPU).
    assert _generated(shared_server) - before < 10 * 400 / 2


def test_disconnected_plain_request_is_aborted(shared_server: ServerProcess) -> None:
    before = _generated(shared_server)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(shared_server.base_url + "/v1/completions", content=body, timeout=1.0,
                   headers={**shared_server.headers, "Content-Type": "application/json"})
    _wait_idle(shared_server, 5.0)
    assert _generated(shared_server) - before < 400


def test_64_identical_greedy_requests_under_a_tiny_kv_budget(start_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = start_server("--num-blocks", "20", "--max-model-len", "256")
    # 19 prompt tokens + 16 new ones cross into a third 16-token block, so running requests keep
    # asking for blocks the 20 cannot give 64 of them: preemptions must happen.
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(64)])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    texts = {r.json()["choices"][0]["text"] for r in responses}
    assert len(texts) == 1
    assert all(r.json()["usage"]["completion_tokens"] == 16 for r in responses)
    single = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()
    assert single["choices"][0]["text"] in texts
    page = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert metric(page, "turbollm:num_preemptions_total") > 0
    assert _engine_idle(server)[0]
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
