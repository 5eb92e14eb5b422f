"""quantization_ignore: decoder linears a quantized model keeps dense (models/build.py
keep_dense_linears, QuantPlan.keep_dense), on tiny random models on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from tests_support import run_prefill
from turbollm.config import QuantizationConfig
from turbollm.models.build import build_model
from turbollm.models.loader import resolve_model
from turbollm.quant import methods
from turbollm.quant.checkpoint import save_quantized
from turbollm.quant.plan import QuantPlan, resolve_quantization

CPU = torch.device("cpu")
IDS = list(range(5, 40))


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "quant_method")}


def test_every_linear_kept_dense_is_the_dense_model(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-qwen2")  # merged q/k/v with biases
    src = resolve_model(path)
    dense = run_prefill(build_model(src, CPU, torch.float32), IDS)
    plan = resolve_quantization("int4", 32, None, CPU, ignore="*")
    model = build_model(src, CPU, torch.float32, quantization=plan)
    assert all(m.quant_method is None for m in _linears(model).values())
    assert torch.equal(run_prefill(model, IDS), dense)


def test_matching_linears_stay_dense_the_rest_quantized(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    src = resolve_model(path)
    dense_model = build_model(src, CPU, torch.float32)
    plan = resolve_quantization("int8", 128, None, CPU, ignore="model.layers.1.*, *.down_proj")
    assert plan is not None and plan.keep_dense == ("model.layers.1.*", "*.down_proj")
    assert "dense: model.layers.1.*,*.down_proj" in plan.describe()
    model = build_model(src, CPU, torch.float32, quantization=plan)
    kept = {n for n, m in _linears(model).items() if m.quant_method is None}
    assert kept == {"model.layers.1.self_attn.qkv_proj", "model.layers.1.self_attn.o_proj",
                    "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj",
                    "model.layers.0.mlp.down_proj"}
    dense_params = dict(dense_model.named_parameters())
    for n in kept:  # the dense weights are the checkpoint's, loaded through the usual loaders
        assert torch.equal(dict(model.named_parameters())[f"{n}.weight"], dense_params[f"{n}.weight"])
    assert isinstance(_linears(model)["model.layers.0.self_attn.qkv_proj"].quant_method,
                      type(methods.Int8Config().linear_method(False)))
    want = run_prefill(model, IDS)
    full = run_prefill(build_model(src, CPU, torch.float32, quantization=QuantPlan(methods.Int8Config(), False)), IDS)
    assert not torch.equal(want, full)
    # Saved, the checkpoint lists the dense linears and reloads to identical logits.
    save_quantized(model, methods.Int8Config(), str(tmp_path), src.arch.to_hf_config())
    qcfg = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert sorted(qcfg["keep_dense"]) == sorted(kept)
    qsrc = resolve_model(str(tmp_path))
    reloaded = build_model(qsrc, CPU, torch.float32, quantization=resolve_quantization(None, 128, qsrc.quantization_config, CPU))
    assert torch.equal(run_prefill(reloaded, IDS), want)


def test_bad_ignore_options_are_clear_errors(tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_checkpoint("tiny-llama")
    src = resolve_model(path)
    plan = resolve_quantization("fp8", 128, None, CPU, ignore="model.layers.7.*")
    with pytest.raises(ValueError, match=r"'model.layers.7.\*' matches no quantized linear"):
        build_model(src, CPU, torch.float32, quantization=plan)
    with pytest.raises(ValueError, match="needs a quantization method"):
        QuantizationConfig(quantization_ignore="*.down_proj")
    with pytest.raises(ValueError, match="applies when quantizing a float checkpoint at load"):
        resolve_quantization("gguf", 128, None, CPU, ignore="*.down_proj")
    with pytest.raises(ValueError, match="applies when quantizing a float checkpoint at load"):
        resolve_quantization(None, 128, {"quant_method": "turbollm", "method": "int8"}, CPU, ignore="*")
