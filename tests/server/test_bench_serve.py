"""`turbollm bench serve` against a real server: every request completes and the report holds
the latency statistics, throughput and goodput."""

from __future__ import annotations

import json

import pytest
from serverutil import API_KEY, ServerProcess

from turbollm.cli import main

pytestmark = pytest.mark.slow


def test_bench_serve_reports_a_rate_sweep(shared_server: ServerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--base-url", shared_server.base_url, "--api-key", API_KEY,
               "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
               "--request-rate", "inf", "8", "--slo-ttft-ms", "60000", "--output-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["request_rate"] for r in report["results"]] == ["inf", 8.0]
    for r in report["results"]:
        assert r["completed"] == 4 and r["failed"] == 0
        assert r["output_token_throughput"] > 0 and r["goodput"] == pytest.approx(r["request_throughput"])
        for key in ("ttft", "tpot", "itl", "e2e"):
            assert r[key]["p50_ms"] > 0 and r[key]["p99_ms"] >= r[key]["p50_ms"]
    assert "api_key" not in report["args"]
