"""Quantized models end to end: options, checkpoints that reload to identical logits, the
embedded SmolLM2 generating coherent text in int8 / int4."""

from __future__ import annotations

import json

import pytest
import torch

from tests_support import run_prefill
from turbollm.compress.quantize import quantize_model
from turbollm.config import EngineConfig, QuantizationConfig
from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model
from turbollm.quant import methods
from turbollm.quant.checkpoint import save_quantized
from turbollm.quant.plan import QuantPlan, resolve_quantization

CPU = torch.device("cpu")


@pytest.mark.parametrize("kwargs,msg", [
    ({"quantization": "int3"}, "quantization must be one of none, int8, int4, fp8, gguf; got 'int3'"),
    ({"group_size": 100}, "group_size must be one of 32, 64, 128; got 100"),
])
def test_bad_options_are_clear_errors(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        QuantizationConfig(**kwargs)
    with pytest.raises(ValueError, match=msg):
        EngineConfig.from_flat(**kwargs)


@pytest.mark.parametrize("method,bits,msg", [
    ("rtn", 3, "--bits 3 is not supported by --method rtn; use 4 or 8"),
    ("awq", 8, "--bits 8 is not supported by --method awq; use 4"),
    ("fp8", 4, "--bits 4 is not supported by --method fp8; use 8"),
    ("hqq", 4, "--method must be one of rtn, awq, gptq, fp8; got 'hqq'"),
])
def test_quantize_cli_rejects_bad_method_bits(method: str, bits: int, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        methods.method_for_cli(method, bits, 128)


def test_group_size_policy_and_errors() -> None:
    """A layer whose width G does not divide takes the largest power of two in 32..G that
    does (SmolLM2's 576 at G = 128 -> 64); a width no such group divides is refused by name."""
    from turbollm.engine.llm import LLM
    from turbollm.quant import grids

    assert grids.group_size_for(576, 128) == 64 and grids.group_size_for(1536, 128) == 128
    with pytest.raises(ValueError, match="qkv_proj's 80 input columns have no group size in 32..128"):
        grids.group_size_for(80, 128, "qkv_proj")
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128; got 96"):
        LLM("tiny-llama", quantization="int4", group_size=96, device="cpu")
    llm = LLM("tiny-llama", load_format="dummy", quantization="int4", group_size=128, device="cpu")
    qkv = llm.engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.scales.shape[1] == 64 // 64  # tiny-llama's hidden size 64 -> one group of 64


def test_fp8_needs_a_gpu_with_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"fp8.*compute capability >= 8.9.*A100 has 8.0"):
        methods.check_device_support(methods.Fp8Config(), torch.device("cuda"))
    methods.check_device_support(methods.Fp8Config(), CPU)  # CPU: simulated, allowed
    methods.check_device_support(methods.Int4Config(), torch.device("cuda"))


def test_quantized_checkpoint_refuses_another_method(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    model, src = quantize_model(path, methods.Int8Config(), "rtn", device="cpu", dtype="float32")
    save_quantized(model, methods.Int8Config(), str(tmp_path), src.arch.to_hf_config())
    qsrc = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="already quantized \\(int8\\); quantization='int4'"):
        resolve_quantization("int4", 32, qsrc.quantization_config, CPU)
    assert resolve_quantization("int8", 32, qsrc.quantization_config, CPU) is not None


@pytest.mark.parametrize("config,bound", [(methods.Int8Config(), 0.03), (methods.Int4Config(32), 0.4),
                                          (methods.Int4Config(64), 0.4), (methods.Fp8Config(), 0.1)],
                         ids=["int8", "int4-g32", "int4-g64", "fp8"])
def test_saved_checkpoint_reloads_to_identical_logits(config, bound, tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-qwen2")  # biases on q/k/v too
    src = resolve_model(path)
    ids = list(range(5, 50))
    dense = run_prefill(build_model(src, CPU, torch.float32), ids)
    live = build_model(src, CPU, torch.float32, quantization=QuantPlan(config, prequantized=False))
    want = run_prefill(live, ids)
    save_quantized(live, config, str(tmp_path), src.arch.to_hf_config())
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["method"] == config.name
    qsrc = resolve_model(str(tmp_path))
    plan = resolve_quantization(None, 128, qsrc.quantization_config, CPU)
    assert plan is not None and plan.prequantized and plan.config == config
    got = run_prefill(build_model(qsrc, CPU, torch.float32, quantization=plan), ids)
    assert torch.equal(got, want)
    # quantization really changed the model, within a scheme-sized error (random tiny weights
    # N(0, 0.08): int4 moves the logits by ~20%, fp8 ~5%, int8 ~1%)
    rel = ((want - dense).norm() / dense.norm()).item()
    assert 1e-6 < rel < bound


def test_quantized_linears_store_packed_tensors() -> None:
    src = resolve_model("tiny-llama")
    m = build_model(src, CPU, torch.float32, quantization=QuantPlan(methods.Int4Config(32), prequantized=False))
    layer = m.model.layers[0].mlp.gate_up_proj  # type: ignore[union-attr,index]
    assert not hasattr(layer, "weight")
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (256, 32)
    assert layer.scales.shape == layer.zeros.shape == (256, 2)
    assert m.lm_head.weight.dtype == torch.float32  # LM head and embeddings stay dense


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_embedded_quantized_generates_coherent_text(quantization: str) -> None:
    from turbollm.engine.llm import LLM
    from turbollm.sampling_params import SamplingParams

    llm = LLM(quantization=quantization, group_size=64)
    outs = llm.chat([[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Name three colors."}]],
                    SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text
    colors = {"red", "blue", "green", "yellow", "orange", "purple", "black", "white"}
    assert len({c for c in colors if c in outs[1].outputs[0].text.lower()}) >= 2
