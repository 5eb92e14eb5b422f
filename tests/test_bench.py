"""The benchmark drivers run end to end on a tiny preset (numbers are not checked: timing is
for benchmarks, not tests; the structure and the roofline arithmetic are)."""

from __future__ import annotations

import json

import pytest

from turbollm.bench.latency import step_bytes
from turbollm.cli import main
from turbollm.engine.llm import LLM


def test_bench_latency_writes_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", "tiny-llama", "--device", "cpu", "--batch-sizes", "1,3",
               "--input-len", "9", "--output-len", "5", "--output-json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert [r["batch"] for r in rep["rows"]] == [1, 3] and rep["copy_bandwidth_gb_s"] > 0
    for r in rep["rows"]:
        assert r["decode_tok_s_total"] == pytest.approx(r["batch"] * r["decode_tok_s_per_seq"])
        assert 0 < r["roofline_fraction"] and r["ttft_ms"] > 0


def test_step_bytes_counts_weights_and_kv() -> None:
    llm = LLM("tiny-llama", device="cpu", num_blocks=16)
    arch = llm.engine.model_info.arch
    params = sum(p.numel() for p in llm.engine.executor.runner.model.parameters())
    kv_tok = 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * 4
    untied = 0 if arch.tie_word_embeddings else (arch.vocab_size - 2) * arch.hidden_size * 4
    assert step_bytes(llm, 2, 10.0) == params * 4 - untied + 2 * 10.0 * kv_tok


def test_bench_throughput_compares_dummy_preset_with_transformers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "thr.json"
    rc = main(["bench", "throughput", "--model", "tiny-llama", "--device", "cpu", "--dataset", "random",
               "--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--hf-batch-sizes", "2,4",
               "--hf-single-prompts", "2", "--repeats", "1", "--output-json", str(out)])
    assert rc == 0
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"turbollm", "hf one-at-a-time", "hf static batch 2", "hf static batch 4"}
    assert all(r["output_tokens"] == r["num_prompts"] * 6 for r in runs.values())
    assert all(0.0 <= r["greedy_match"] <= 1.0 for n, r in runs.items() if n != "turbollm")


def test_bench_latency_quantized_counts_packed_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "lat-q.json"
    rc = main(["bench", "latency", "--model", "tiny-llama", "--device", "cpu", "--batch-sizes", "1",
               "--input-len", "6", "--output-len", "3", "--quantization", "int4", "--group-size", "32",
               "--output-json", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["quantization"] == "int4 g32"
    dense = LLM("tiny-llama", device="cpu", num_blocks=16)
    q = LLM("tiny-llama", device="cpu", num_blocks=16, quantization="int4", group_size=32)
    # int4 linears: 0.5 byte per weight + fp32 scale and zero per 32 weights, vs 4 bytes
    layer = q.engine.executor.runner.model.model.layers[0].mlp.down_proj
    assert layer.qweight.numel() * 2 == 64 * 128
    assert step_bytes(q, 1, 8.0) < step_bytes(dense, 1, 8.0)


def test_bench_throughput_refuses_hf_compare_when_quantized(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "throughput", "--model", "tiny-llama", "--device", "cpu", "--quantization", "int8",
               "--num-prompts", "2"])
    assert rc == 2 and "--compare none" in capsys.readouterr().err


def test_transformers_twin_rebuilt_after_the_engine_has_the_same_dummy_weights() -> None:
    import torch

    from turbollm.bench.throughput import _hf_model_alone, _weights_checksum

    llm = LLM("tiny-llama", device="cpu", num_blocks=16)
    ex = llm.engine.executor
    ours = ex.runner.model
    check = _weights_checksum(ours)
    hf = _hf_model_alone(ex.source, torch.float32, torch.device("cpu"), llm.engine.config.model.seed, check)
    theirs = dict(hf.named_parameters())
    compared = 0
    for name, t in ours.hf_state_dict():
        if name in theirs:
            assert torch.equal(theirs[name], t), name
            compared += 1
    assert compared == len(theirs)
    with pytest.raises(RuntimeError, match="differ"):
        _hf_model_alone(ex.source, torch.float32, torch.device("cpu"), llm.engine.config.model.seed + 1, check)
